"""Our engine against transformers on the same weights: logits per step (teacher forcing on
the tokens we generated) and greedy tokens of the real SmolLM2 model."""

import pytest
import torch
import transformers

from pdserve.engine.engine import Engine
from pdserve.engine.model_source import resolve_model
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.hf_reference import hf_logits, hf_model, hf_model_sharing, rel_err

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, head_dim=16, max_position_embeddings=512)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=2),
    "llama3-rope": lambda: transformers.LlamaConfig(**TINY, num_key_value_heads=1, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**TINY, num_key_value_heads=4, sliding_window=4096),
}
# block size 16: prompts ending inside, exactly at and one past a block boundary, plus others
PROMPT_LENS = [15, 16, 17, 1, 40, 33]


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny_model_dir(request, tmp_path_factory):
    torch.manual_seed(1234)
    model = getattr(transformers, {"llama": "LlamaForCausalLM", "llama3-rope": "LlamaForCausalLM",
                                   "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[request.param])(
        CONFIGS[request.param]())
    with torch.no_grad():  # larger weights than the default init, so logits are not near-uniform
        for p in model.parameters():
            if p.dim() > 1 or "bias" in "".join(n for n, q in model.named_parameters() if q is p):
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="200KB")  # sharded: several safetensors + index
    return path


def test_logits_match_transformers_per_step(tiny_model_dir):
    assert len(list(tiny_model_dir.glob("*.safetensors"))) > 1
    engine = Engine(model=str(tiny_model_dir), keep_logits=True, block_size=16, num_kv_blocks=64,
                    max_num_batched_tokens=24)  # small budget: prompts are prefilled in chunks
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    results = engine.generate(prompts, params)
    assert engine.stats()["num_free_blocks"] == 64

    hf = hf_model(engine.source, engine.model_config)
    for prompt, result in zip(prompts, results):
        assert len(result.logits) == 8
        ref = hf_logits(hf, prompt + result.token_ids[:-1])[len(prompt) - 1:]
        for step, (ours, theirs) in enumerate(zip(result.logits, ref)):
            err = rel_err(ours, theirs)
            assert err < 1e-4, f"prompt of {len(prompt)}, step {step}: relative error {err:.2e}"
        assert result.token_ids == ref.argmax(-1).tolist()
    # the oracle the GPU benchmark builds over our (dummy) weights is the same model
    shared = hf_model_sharing(engine.runner.model, engine.model_config)
    assert rel_err(hf_logits(shared, prompts[4]), hf_logits(hf, prompts[4])) < 1e-6


CHATS = [
    "What is the capital of France? Answer in two sentences.",
    "Write a short poem about the ocean.",
    "Explain what a hash function is to a ten year old.",
    "List three tips for staying healthy.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def smollm2():
    return Engine(model="smollm2-135m", max_num_batched_tokens=64)


def test_smollm2_greedy_matches_transformers_generate(smollm2):
    tok = smollm2.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    ours = smollm2.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    hf = hf_model(resolve_model("smollm2-135m"), smollm2.model_config)
    hf.generation_config.eos_token_id = None  # like ignore_eos: both run the full 40 tokens
    for prompt, result in zip(prompts, ours):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=0)
        theirs = out[0, len(prompt):].tolist()
        assert len(result.token_ids) == 40
        assert result.token_ids == theirs, (tok.decode(result.token_ids), tok.decode(theirs))
    assert "Paris" in ours[0].text

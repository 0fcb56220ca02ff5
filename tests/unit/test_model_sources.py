"""Model sources: the GGUF reader and tokenizer against the `gguf` package and transformers,
dummy presets of real shapes, clear errors, and the torch-free modules staying torch-free."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from pdserve.engine.gguf_file import read_gguf
from pdserve.engine.gguf_weights import dequantize, unpermute_rope_rows
from pdserve.engine.model import LlamaForCausalLM
from pdserve.engine.model_source import resolve_model
from pdserve.engine.presets import PRESETS

SMOLLM2 = resolve_model("smollm2-135m")


def test_gguf_reader_matches_the_gguf_package():
    import gguf
    from gguf.quants import dequantize as gguf_dequantize
    ours = read_gguf(SMOLLM2.path)
    theirs = gguf.GGUFReader(str(SMOLLM2.path))
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):  # the reader's own pseudo-fields, not metadata
            assert ours.fields[key] == field.contents(), key
    assert len(ours.tensors) == len(theirs.tensors)
    types = set()
    for t, ref in zip(ours.tensors, theirs.tensors):
        assert t.name == ref.name and t.shape == tuple(int(d) for d in reversed(ref.shape))
        if t.ggml_type not in types or t.name.startswith("blk.0."):
            types.add(t.ggml_type)
            expected = gguf_dequantize(ref.data, ref.tensor_type).reshape(t.shape)
            assert torch.equal(dequantize(t), torch.from_numpy(expected.astype(np.float32))), t.name
    assert types >= {0, 3, 8}  # F32, Q4_1, Q8_0


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(6 * 8, 5)
    heads = 6
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, dim // n_head // 2, ...).swapaxes(1, 2)
    permuted = w.reshape(heads, 2, w.shape[0] // heads // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_rope_rows(permuted, heads), w)


def test_gguf_tokenizer_matches_transformers():
    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(str(SMOLLM2.path.parent), gguf_file=SMOLLM2.path.name)
    ours = SMOLLM2.tokenizer()
    texts = ["Hello world! 12345 and 3.14", "  spaces\n\nnew lines\ttabs ", "café naïve 日本語 🎉",
             "<|im_start|>user\nhi<|im_end|>\n", "It's don't I'll we've", "x" * 300, ""]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=True), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    for conversation in (messages, messages[1:]):
        assert ours.apply_chat_template(conversation) == theirs.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("preset,num_params", [
    ("llama3-8b", 8_030_261_248), ("llama3.2-1b", 1_235_814_400), ("smollm2-135m", 134_515_008)])
def test_presets_have_the_real_parameter_counts(preset, num_params):
    with torch.device("meta"):
        model = LlamaForCausalLM(PRESETS[preset], max_positions=16)
    assert sum(p.numel() for p in model.parameters()) == num_params


def test_dummy_weights_are_the_same_on_every_load():
    from pdserve.engine.engine import Engine
    a = Engine(model="dummy:tiny", num_kv_blocks=8).runner.model.state_dict()
    b = Engine(model="dummy:tiny", num_kv_blocks=8).runner.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,match", [
    ("dummy:nope", "preset"), ("/no/such/dir", "not a Hugging Face directory"), ("", "not a")])
def test_unknown_models_are_clear_errors(name, match):
    with pytest.raises(ValueError, match=match):
        resolve_model(name)


def test_router_side_modules_do_not_import_torch():
    """The router, the gateway and what they use from the engine run without torch; the CLI
    imports it only in the subcommands that run a model."""
    code = ("import sys; import pdserve.engine.block_hash, pdserve.engine.tokenizer, "
            "pdserve.engine.sampling_params, pdserve.engine.request, pdserve.engine.config, "
            "pdserve.engine.model_source, pdserve.engine.block_pool, pdserve.engine.kv_cache_manager, "
            "pdserve.engine.gguf_file, pdserve.router.node, pdserve.router.gateway, pdserve.cli; "
            "from pdserve.engine.model_source import resolve_model; resolve_model('smollm2-135m').tokenizer(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)

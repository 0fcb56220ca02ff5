"""Hugging Face transformers as the oracle: the same weights in its own model classes.

For tests and benchmarks only (it needs the `test` extra: transformers).
"""

from __future__ import annotations

import torch
import transformers

from .config import ModelConfig
from .model_source import ModelSource
from .weights import iter_weights

_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM")}


def hf_config(cfg: ModelConfig):
    config_cls = getattr(transformers, _CLASSES[cfg.model_type][0])
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **vars(cfg.rope_scaling)}
    return config_cls(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids) or None, pad_token_id=0)


def hf_model(source: ModelSource, cfg: ModelConfig):
    """The transformers model with exactly the weights our loader reads from `source`."""
    model = getattr(transformers, _CLASSES[cfg.model_type][1])(hf_config(cfg))
    state = dict(iter_weights(source, cfg))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


def hf_model_sharing(model, cfg: ModelConfig):
    """The transformers model over our model's own weight tensors (q/k/v and gate/up are views
    of our fused ones): no second copy, so it works for `dummy:` weights and large models."""
    config = hf_config(cfg)
    with torch.device("meta"):
        hf = getattr(transformers, _CLASSES[cfg.model_type][1])(config)
    state = dict(_unfused(model))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    rotary = hf.model.rotary_emb  # its inv_freq is a buffer, not a weight: built anew on the device
    hf.model.rotary_emb = type(rotary)(config=config).to(next(model.parameters()).device)
    return hf.eval()


def _unfused(model):
    """(Hugging Face name, tensor) for each of our parameters, fused ones split into views."""
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for name, param in model.named_parameters():
        fused = next((f for f in parts if f".{f}." in name), None)
        if fused is None:
            yield name, param.data
            continue
        sizes = model.get_submodule(name.rsplit(".", 2)[0]).shard_sizes
        offset = 0
        for part, size in zip(parts[fused], sizes):
            yield name.replace(fused, part), param.data.narrow(0, offset, size)
            offset += size


@torch.inference_mode()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Logits [len(token_ids), vocab] of one unpadded sequence."""
    return model(torch.tensor([token_ids])).logits[0].float()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).norm() / ref.norm())

"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a paged KV cache.

Q, K and V are one fused projection and so are gate and up; `load_weights` maps checkpoint
names (q_proj, k_proj, v_proj, gate_proj, up_proj) onto their slices.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .attention import AttentionMetadata
from .config import ModelConfig
from .layers import RMSNorm, RotaryEmbedding, StepRope, silu_and_mul

KVCache = tuple[torch.Tensor, torch.Tensor]  # each [num_blocks, block_size, num_kv_heads, head_dim]

# checkpoint name fragment -> (fused parameter fragment, shard index)
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5
        self.shard_sizes = (cfg.q_size, cfg.kv_size, cfg.kv_size)

    def forward(self, rope: StepRope, hidden, kv_cache: KVCache, meta: AttentionMetadata, backend):
        cfg = self.cfg
        q, k, v = self.qkv_proj(hidden).split(self.shard_sizes, dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        q, k = rope.apply(q, k)
        o = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(o.reshape(-1, cfg.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.shard_sizes = (cfg.intermediate_size, cfg.intermediate_size)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope, hidden, residual, kv_cache, meta, backend):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, kv_cache, meta, backend)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta, backend, layer_hook=None):
        hidden, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.for_step(positions, hidden.dtype)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            hidden, residual = layer(rope, hidden, residual, kv_cache, meta, backend)
            if layer_hook is not None:
                layer_hook(i)  # layer i's K/V of this step are in the cache (the prefill node sends them)
        hidden, _ = self.norm(hidden, residual)
        return hidden  # [num_tokens, hidden_size]


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg, max_positions)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids, positions, kv_caches, meta, backend, layer_hook=None) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, backend, layer_hook)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return hidden @ weight.t()  # [num_rows, vocab_size]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies checkpoint tensors (Hugging Face names) into the parameters, fusing
        q/k/v and gate/up. Raises if a parameter is left unset or a name is unknown."""
        params = dict(self.named_parameters())
        rows_loaded = dict.fromkeys(params, 0)
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.cfg.tie_word_embeddings):
                continue
            target, rows = self._resolve(name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in this model")
            param = params[target]
            dest = param if rows is None else param.narrow(0, *rows)
            if dest.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape "
                                 f"{tuple(dest.shape)}")
            dest.copy_(tensor)
            rows_loaded[target] += dest.shape[0]
        missing = [n for n, p in params.items() if rows_loaded[n] != p.shape[0]]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def _resolve(self, name: str) -> tuple[str, tuple[int, int] | None]:
        """Checkpoint name -> (parameter name, (row offset, row count) or None)."""
        for fragment, (fused, shard) in _FUSED.items():
            if f".{fragment}." in name:
                target = name.replace(fragment, fused)
                module = self.get_submodule(target.rsplit(".", 2)[0])
                sizes = module.shard_sizes
                return target, (sum(sizes[:shard]), sizes[shard])
        return name, None

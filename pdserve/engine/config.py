"""Model and engine configuration: frozen dataclasses, torch-free.

`ModelConfig` describes a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2). It is
built from a Hugging Face config.json dict, from GGUF metadata, or from a preset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k and v projections
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, weights_id: str = "") -> str:
        """A short stable id of this architecture plus its weights' identity.

        It roots every block hash and namespaces the Redis index, so nodes serving the same
        weights agree on it and nodes serving different ones never share cache entries.
        """
        blob = json.dumps(self.to_dict(), sort_keys=True) + "|" + weights_id
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Builds the config from a Hugging Face config.json (transformers 4.x or 5.x keys)."""
        model_type = d.get("model_type", "llama")
        num_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or rope
        eos = d.get("eos_token_id")
        use_window = d.get("use_sliding_window", model_type == "mistral")
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or hidden // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=_parse_rope_scaling(scaling),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(d.get("attention_bias")),  # Qwen2: always
            sliding_window=d.get("sliding_window") if use_window else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
        )


def _parse_rope_scaling(d: dict | None) -> RopeScaling | None:
    if not d:
        return None
    rope_type = d.get("rope_type") or d.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: llama3)")
    return RopeScaling(
        factor=float(d["factor"]),
        low_freq_factor=float(d["low_freq_factor"]),
        high_freq_factor=float(d["high_freq_factor"]),
        original_max_position_embeddings=int(d["original_max_position_embeddings"]),
    )


@dataclass(frozen=True)
class EngineConfig:
    """How one engine instance runs: model, device, cache and batching limits."""

    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    attention_backend: str = "auto"  # auto: torch on CPU, triton on CUDA
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float | None = None  # None: 1 GiB on CPU, from gpu_memory_utilization on CUDA
    gpu_memory_utilization: float = 0.9  # CUDA: share of the GPU for weights, activations and KV
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs
    max_graph_batch_size: int = 256  # CUDA: decode batches up to this replay graphs, larger run eagerly
    async_scheduling: bool = True  # launch a decode step before reading the previous one's tokens
    max_model_len: int | None = None  # None: the model's, capped at 8192
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # the token budget of one step (chunked prefill)
    enable_prefix_caching: bool = True
    seed: int = 0  # dummy weights and requests without a seed
    num_threads: int | None = None  # CPU: torch's intra-op threads (None: torch's default, every core)
    keep_logits: bool = False  # debug/tests: return each sampled row's logits
    kv_cache_shared: bool = False  # CPU: the KV pool in a memfd, for the ipc connector's senders on this host

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.max_graph_batch_size < 1:
            raise ValueError(f"max_graph_batch_size must be >= 1, got {self.max_graph_batch_size}")

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


def default_max_model_len(model: ModelConfig, requested: int | None) -> int:
    """The context limit: what was asked for, else the model's capped at 8192, never past the
    model's positions or its sliding window (which this engine does not implement)."""
    limit = model.max_position_embeddings
    if model.sliding_window:
        limit = min(limit, model.sliding_window)
    if requested is None:
        return min(limit, 8192)
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's limit of {limit} tokens")
    return requested


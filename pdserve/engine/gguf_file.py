"""Reading a GGUF file (torch-free): metadata, the model config it describes, tensor names.
The weights themselves are dequantized in `gguf_weights.py`."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .config import ModelConfig

_ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
          11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), the reverse of GGUF's listing
    ggml_type: int
    data: np.ndarray  # the raw uint8 bytes, memory-mapped


@dataclass(frozen=True)
class GGUFFile:
    fields: dict
    tensors: list[GGUFTensor]


@lru_cache(maxsize=4)
def read_gguf(path: Path) -> GGUFFile:
    """Parses a GGUF (v2/v3) file: metadata into Python values, tensors as memory-mapped bytes.
    (gguf.GGUFReader does the same but takes seconds on a 49k-token vocabulary.)"""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    r = _Cursor(memoryview(buf))
    if r.take(4) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    version, num_tensors, num_fields = r.scalar("<I"), r.scalar("<Q"), r.scalar("<Q")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    fields = {}
    for _ in range(num_fields):
        key = r.string()
        fields[key] = r.value(r.scalar("<I"))
    infos = []
    for _ in range(num_tensors):
        name = r.string()
        dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
        infos.append((name, tuple(reversed(dims)), r.scalar("<I"), r.scalar("<Q")))
    align = fields.get("general.alignment", 32)
    data_start = -(-r.pos // align) * align
    tensors = []
    for name, shape, ggml_type, offset in infos:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        nbytes = int(np.prod(shape)) // block * block_bytes
        start = data_start + offset
        tensors.append(GGUFTensor(name, shape, ggml_type, buf[start:start + nbytes]))
    return GGUFFile(fields, tensors)


class _Cursor:
    def __init__(self, mem: memoryview):
        self.mem, self.pos = mem, 0

    def take(self, n: int) -> bytes:
        out = self.mem[self.pos:self.pos + n].tobytes()
        self.pos += n
        return out

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.mem, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"GGUF value type {vtype} is unknown")
        item_type, count = self.scalar("<I"), self.scalar("<Q")
        if item_type in _NUMPY:
            dtype = np.dtype(_NUMPY[item_type])
            items = np.frombuffer(self.mem, dtype, count, self.pos).tolist()
            self.pos += count * dtype.itemsize
            return items
        return [self.value(item_type) for _ in range(count)]


def gguf_fields(path: Path) -> dict:
    """Every metadata field as a plain Python value (token lists included)."""
    return read_gguf(Path(path)).fields


def gguf_model_config(path: Path) -> ModelConfig:
    meta = gguf_fields(path)
    arch = meta["general.architecture"]
    if arch not in _ARCH_TO_MODEL_TYPE:
        raise ValueError(f"{path.name}: GGUF architecture {arch!r} is not supported")
    tensor_names = {t.name for t in read_gguf(path).tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path.name}: GGUF RoPE frequency tensors (Llama 3.1 scaling) are not "
                         "supported; use the Hugging Face directory")
    num_heads = meta[f"{arch}.attention.head_count"]
    hidden = meta[f"{arch}.embedding_length"]
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        model_type=_ARCH_TO_MODEL_TYPE[arch],
        vocab_size=meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=meta[f"{arch}.feed_forward_length"],
        num_layers=meta[f"{arch}.block_count"],
        num_heads=num_heads,
        num_kv_heads=meta.get(f"{arch}.attention.head_count_kv", num_heads),
        head_dim=meta.get(f"{arch}.attention.key_length", hidden // num_heads),
        rms_norm_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=meta.get(f"{arch}.context_length", 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(eos,) if eos is not None else (),
    )


def hf_tensor_name(gguf_name: str) -> str:
    base, _, kind = gguf_name.rpartition(".")  # kind: weight | bias
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in _LAYER_NAMES:
            raise ValueError(f"GGUF tensor {gguf_name!r} is not supported")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    if base not in _TOP_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} is not supported")
    return f"{_TOP_NAMES[base]}.{kind}"

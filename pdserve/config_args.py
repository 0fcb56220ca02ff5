"""Command-line flags and PDSERVE_* environment variables for a config dataclass.

Every field `foo_bar` becomes `--foo-bar`, defaulting to `$PDSERVE_FOO_BAR` when set, else to
the dataclass default. Precedence: flag > environment > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
SECRETS = {"api_key"}


def add_config_args(parser: argparse.ArgumentParser, cls, help_texts: dict[str, str] | None = None,
                    exclude: tuple[str, ...] = ()) -> None:
    help_texts = help_texts or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        parse = _parser_for(f.type)
        env = f"PDSERVE_{f.name.upper()}"
        default = f.default
        if env in os.environ:
            try:
                default = parse(os.environ[env])
            except (ValueError, argparse.ArgumentTypeError) as e:
                parser.error(f"${env}: {e}")
        shown = "<set>" if f.name in SECRETS and default is not None else default  # never print a secret
        help_text = f"{help_texts.get(f.name, '')} (env {env}; default {shown})".strip()
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=parse, default=default,
                            metavar=f.name.upper(), help=help_text)


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass from parsed args (excluded fields keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _parser_for(type_name: str):
    base = type_name.replace(" | None", "").strip()
    optional = "None" in type_name
    convert = {"int": int, "float": float, "str": str, "bool": _bool}[base]

    def parse(text: str):
        if optional and text.lower() in ("", "none"):
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base}, got {text!r}") from None

    return parse


def _bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")

"""Encoder options on the command line, shared by ``extract`` and ``finetune``: ``--encoder-opt key=value``
(repeatable, typed by the encoder's config dataclass) and the old per-encoder flags it replaced, which keep
working as hidden aliases that say once what they now mean."""

from __future__ import annotations

from typing import Any

import typer

from abawfeat.cli._common import err_console
from abawfeat.errors import ConfigError

ENCODER_OPT_HELP = (
    "An option of the encoder, key=value (repeat it for several); `abawfeat encoders` lists each encoder's "
    "options, e.g. --encoder-opt clip_model=ViT-B-16."
)


def encoder_opt_option() -> Any:
    return typer.Option(None, "--encoder-opt", help=ENCODER_OPT_HELP, metavar="KEY=VALUE")


def deprecated_note(flag: str, replacement: str) -> None:
    """One line on stderr (rank 0 only under torchrun): the old spelling still works and what it now means."""
    from abawfeat.utils.dist import dist_info

    if not dist_info().is_main:
        return
    err_console.print(f"note: {flag} is deprecated; it now means {replacement}", markup=False,
                      highlight=False, soft_wrap=True)


def encoder_opts(items: list[str] | None, legacy: dict[str, tuple[str, str | None]]) -> dict[str, str]:
    """``--encoder-opt`` items as {key: text}, plus the old flags that were given: ``legacy`` maps a flag
    (``--clip-model``) to (encoder option, its text or None when the flag was not given)."""
    from abawfeat.encoders import parse_options

    options = parse_options(items or [])
    for flag, (key, value) in legacy.items():
        if value is None:
            continue
        if key in options:
            raise ConfigError(f"{flag} and --encoder-opt {key} both set {key}; give it once")
        deprecated_note(flag, f"--encoder-opt {key}={value}")
        options[key] = value
    return options

"""Encoder options on the command line, shared by ``extract`` and ``finetune``: ``--encoder-opt key=value``
(repeatable, typed by the encoder's config dataclass), a few flags that are short for an option of that name
(``--layer 9`` is ``--encoder-opt layer=9``), and the old per-encoder flags it replaced, which keep working as
hidden aliases that say once what they now mean."""

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


# Flags that are short for the encoder option of the same meaning, whichever encoder has it (the speech
# encoders' hidden layer and pooling window, docs/audio.md): each forwards its text to --encoder-opt, so an
# encoder with such an option needs no CLI code, and one without it refuses it as it refuses the option.
OPTION_FLAGS: dict[str, tuple[str, str]] = {
    "--layer": ("layer", "Hidden state N to cache (audio encoders: 0 = transformer input, default: the "
                "middle one; dinov2: 0 = patch embeddings, default: the last block). Short for "
                "--encoder-opt layer=N."),
    "--layers": ("layers", "a:b caches the mean of hidden states a to b, both included (audio encoders). "
                 "Short for --encoder-opt layers=a:b."),
    "--window-ms": ("window_ms", "Pooling window centred on each frame's timestamp, in ms (audio encoders; "
                    "default 500). Short for --encoder-opt window_ms=W."),
}


def option_flag(flag: str) -> Any:
    """The typer option of one of ``OPTION_FLAGS``; its value is text, typed by the encoder's config."""
    return typer.Option(None, flag, help=OPTION_FLAGS[flag][1], metavar="VALUE")


def deprecated_note(flag: str, replacement: str) -> None:
    """One line on stderr (rank 0 only under torchrun): the old spelling still works and what it now means."""
    from abawfeat.utils.dist import dist_info

    if not dist_info().is_main:
        return
    err_console.print(f"note: {flag} is deprecated; it now means {replacement}", markup=False,
                      highlight=False, soft_wrap=True)


def encoder_opts(items: list[str] | None, legacy: dict[str, tuple[str, str | None]],
                 flags: dict[str, str | None] | None = None) -> dict[str, str]:
    """``--encoder-opt`` items as {key: text}, plus the short flags and the old flags that were given:
    ``flags`` maps one of ``OPTION_FLAGS`` to its text (None: not given), ``legacy`` maps an old flag
    (``--clip-model``) to (encoder option, its text or None when the flag was not given)."""
    from abawfeat.encoders import parse_options

    options = parse_options(items or [])
    for flag, value in (flags or {}).items():
        if value is None:
            continue
        key = OPTION_FLAGS[flag][0]
        if key in options:
            raise ConfigError(f"{flag} and --encoder-opt {key} both set {key}; give it once")
        options[key] = value
    for flag, (key, value) in legacy.items():
        if value is None:
            continue
        if key in options:
            raise ConfigError(f"{flag} and --encoder-opt {key} both set {key}; give it once")
        deprecated_note(flag, f"--encoder-opt {key}={value}")
        options[key] = value
    return options

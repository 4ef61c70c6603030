"""``abawfeat encoders``: the encoder registry and the named weights, as tables or JSON."""

from __future__ import annotations

import json

import typer

from abawfeat.cli import app
from abawfeat.cli._common import console, guarded


def _fmt(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:.3f}" for v in values)


@app.command("encoders")
@guarded
def encoders_command(
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON on stdout."),
) -> None:
    """List the registered encoders (modality: face crops or audio, feature size, input, normalisation,
    weights, options) and every encoder's named weights."""
    # Imported here, not at module level: torch and open_clip would slow down every `abawfeat --help`.
    from abawfeat.encoders import list_encoders, list_named_weights
    from abawfeat.encoders.weights import cached_path

    infos = list_encoders()
    named = [
        {**{k: getattr(w, k) for k in ("name", "encoder", "url", "num_class", "description")},
         "cached": cached_path(w).is_file(), "path": str(cached_path(w))}
        for w in list_named_weights()
    ]
    if as_json:
        typer.echo(json.dumps({"encoders": [i.as_dict() for i in infos], "named_weights": named}, indent=2))
        return

    from rich.table import Table

    table = Table(title="Encoders", title_justify="left")
    for column in ("name", "dim", "input", "mean / std", "resize", "default weights", "logits"):
        table.add_column(column, overflow="fold", no_wrap=column != "default weights")
    for info in infos:
        audio = info.modality == "audio"  # input_size is then the sample rate, and nothing is normalised
        table.add_row(
            info.name,
            str(info.feature_dim),
            # The modality, then what it reads: crops of this size, or audio at this sample rate.
            f"audio\n{info.input_size / 1000:g} kHz" if audio else f"{info.modality}\n{info.input_size} px",
            "-" if audio else f"{_fmt(info.mean)}\n{_fmt(info.std)}",
            info.interpolation,
            info.weights,
            str(len(info.logit_names)) if info.logit_names else "-",
        )
    console.print(table)
    # Plain lines rather than tables: option defaults, paths and addresses are long and must stay copyable.
    console.print("Options (--encoder-opt KEY=VALUE; --weights, --random-init and --seed set the others)",
                  style="bold", markup=False, highlight=False)
    for info in infos:
        for key, text in info.options.items():
            console.print(f"  {info.name:<8} {key}: {text}", markup=False, highlight=False, soft_wrap=True)
    console.print("Named weights (--weights NAME; downloaded on first use when online)", style="bold",
                  markup=False, highlight=False)
    for w in named:
        state = "cached" if w["cached"] else "not cached"
        console.print(f"  {w['name']} ({w['encoder']}): {w['description']}; {state}: {w['path']}",
                      markup=False, highlight=False, soft_wrap=True)
        console.print(f"    source: {w['url'] or 'none known: put the file there by hand'}", markup=False,
                      highlight=False, soft_wrap=True)

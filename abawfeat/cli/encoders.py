"""``abawfeat encoders``: the encoder registry and the named weights, as tables or JSON."""

from __future__ import annotations

import json

import typer
from rich.text import Text

from abawfeat.cli import app
from abawfeat.cli._common import console, guarded


def _fmt(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:.3f}" for v in values)


@app.command("encoders")
@guarded
def encoders_command(
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON on stdout."),
) -> None:
    """List the registered stage-one encoders (feature size, input size, normalisation, weights)."""
    # Imported here, not at module level: torch and open_clip would slow down every `abawfeat --help`.
    from abawfeat.encoders import NAMED_WEIGHTS, list_encoders
    from abawfeat.encoders.weights import cached_path

    infos = list_encoders()
    named = [
        {**{k: getattr(w, k) for k in ("name", "encoder", "url", "num_class", "description")},
         "cached": cached_path(w).is_file(), "path": str(cached_path(w))}
        for w in NAMED_WEIGHTS.values()
    ]
    if as_json:
        typer.echo(json.dumps({"encoders": [i.as_dict() for i in infos], "named_weights": named}, indent=2))
        return

    from rich.table import Table

    table = Table(title="Encoders", title_justify="left")
    for column in ("name", "dim", "input", "mean / std", "resize", "default weights", "logits"):
        table.add_column(column, overflow="fold", no_wrap=column != "default weights")
    for info in infos:
        table.add_row(
            info.name,
            str(info.feature_dim),
            str(info.input_size),
            f"{_fmt(info.mean)}\n{_fmt(info.std)}",
            info.interpolation,
            info.weights,
            str(len(info.logit_names)) if info.logit_names else "-",
        )
    console.print(table)
    # Plain lines rather than a table: paths and addresses are long and must stay copyable.
    console.print(Text.assemble(("Named weights", "bold"),
                                " (--weights NAME; downloaded on first use when online)"))
    for w in named:
        state = "cached" if w["cached"] else "not cached"
        console.print(f"  {w['name']:<11} {w['encoder']}, {w['num_class']} classes, {state}: {w['path']}",
                      highlight=False, soft_wrap=True)
        console.print(f"  {'':<11} source: {w['url']}", highlight=False, soft_wrap=True)

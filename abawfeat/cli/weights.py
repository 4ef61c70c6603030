"""``abawfeat weights import FORMAT FILE --out NEW.pt``: published weights in foreign formats, converted once
into a weights file an encoder reads without unpickling objects (abawfeat/encoders/hsemotion.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from abawfeat.cli import app
from abawfeat.cli._common import console, guarded

weights_app = typer.Typer(help="Convert published weights into files the encoders read.",
                          no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("import")
@guarded
def import_command(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="The file's format: hsemotion (HSEmotion / "
                              "EmotiEffLib's pickled timm models, e.g. enet_b0_8_best_afew.pt)."),
    file: Path = typer.Argument(..., help="The published file, or an HSEmotion model name (enet_b0_8_va_mtl, "
                                "enet_b2_8, ...): from ~/.cache/abawfeat/weights/hsemotion/, downloaded "
                                "there when online."),
    out: Path = typer.Option(..., "--out", help="The weights file to write (never overwritten); then "
                             "`abawfeat extract --backbone timm --weights NEW.pt`."),
    model: str = typer.Option(None, "--model", help="The timm model name, when neither the file nor its "
                              "name says it (enet_b0_* is efficientnet_b0, enet_b2_* efficientnet_b2)."),
    image_size: int = typer.Option(None, "--image-size", help="Input size the weights were trained at "
                                   "(default: HSEmotion's, 224 for B0 models, 260 for the others)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON on stdout."),
) -> None:
    """Convert a whole pickled model into a state dict plus its timm model name, outputs and preprocessing.
    The pickle is read with an allow-list of the classes such a file holds (timm and torch.nn modules,
    tensors), which are never run; a file naming anything else is refused."""
    from abawfeat.encoders.hsemotion import IMPORTERS
    from abawfeat.errors import ConfigError

    if fmt not in IMPORTERS:
        raise ConfigError(f"unknown weights format {fmt!r}: use one of {', '.join(IMPORTERS)}")
    summary = IMPORTERS[fmt](file, out, model=model, image_size=image_size)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    pre = summary["preprocess"]
    console.print(f"wrote {summary['out']}: timm {summary['model']}, {summary['parameters']:,} parameters, "
                  f"{summary['num_classes']} outputs ({', '.join(summary['logit_names'])}), input "
                  f"{pre['size']} px {pre['interpolation']}", soft_wrap=True)
    console.print(f"use it with: abawfeat extract --backbone timm --weights {summary['out']}", soft_wrap=True)

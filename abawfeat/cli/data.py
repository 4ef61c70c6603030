"""``abawfeat data ...``: inspect an Aff-Wild2 tree before spending hours on it (see docs/data.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from abawfeat.cli import app
from abawfeat.cli._common import console, guarded, warn_line
from abawfeat.tasks import single, single_tasks

data_app = typer.Typer(
    help="Inspect an Aff-Wild2 tree: annotations, crops, test lists.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")



def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _note(text: str, style: str = "") -> None:
    # soft_wrap: one line per note even when stdout is a pipe, so grep finds the whole sentence. Text, not
    # markup: a folder named `aw[v2]` must print as such.
    from rich.text import Text

    console.print(Text(text, style=style), soft_wrap=True)


@data_app.command("summary")
@guarded
def summary(
    data: Path = typer.Option(
        ..., "--data", help="Data root: holds the annotations folder and cropped_aligned/."),
    annotations: Path | None = typer.Option(
        None, "--annotations", help="The annotations folder, when it is not (or not alone) under --data."),
    as_json: bool = typer.Option(
        False, "--json",
        help="Print only a JSON list of {task, split, videos, frames, valid_frames, usable_frames}."),
) -> None:
    """Videos and frames per task and split: annotated, with a valid label, and usable (valid with a crop)."""
    # Imported here so that `abawfeat --help` does not load numpy.
    from abawfeat.data import AffWild2

    dataset = AffWild2(data, annotations)
    # Every crop folder, listed with extract's rule, so that a name extract would refuse is refused here too.
    crops = dataset.crop_summary(progress=True)
    if not dataset.has_annotations:
        found = (f"{dataset.root}: no annotations folder (give one with --annotations); "
                 f"{_plural(crops['videos'], 'video')} with crops ({crops['crops']:,} crops): enough for "
                 "`abawfeat extract`, not for training or scoring")
        if as_json:
            warn_line(found)
            typer.echo(json.dumps(dataset.summary(), indent=2))
        else:
            _note(found)
        return
    if as_json:
        typer.echo(json.dumps(dataset.summary(progress=True), indent=2))
        return
    rows = dataset.summary(details=True, progress=True)
    _print_table(dataset, rows, dataset.test_summary(), crops)


def _print_table(dataset: Any, rows: list[dict[str, Any]], test_rows: list[dict[str, Any]],
                 crops: dict[str, int]) -> None:
    from rich.table import Table
    from rich.text import Text

    def cell(main: str, dim: str | None = None) -> Text:
        text = Text(main)
        if dim is not None:
            text.append(("\n" if main else "") + dim, style="dim")
        return text

    # The seed paper's Table 2: one row per task, "frames -> frames with valid labels" per split.
    table = Table(title=Text(f"{dataset.name}: frames → frames with valid labels"), title_justify="left")
    table.add_column("Task")
    for split in ("Train", "Validation", "Test"):
        table.add_column(split, justify="right")
    by_key = {(r["task"], r["split"]): r for r in rows}
    tests = {r["task"]: r for r in test_rows}
    for task, label in ((t.name, t.title) for t in single_tasks()):
        cells = []
        for split in ("train", "val"):
            r = by_key[(task, split)]
            cells.append(cell(f"{r['frames']:,} → {r['valid_frames']:,}",
                              f"{_plural(r['videos'], 'video')}, {r['usable_frames']:,} usable"))
        t = tests[task]
        if t["videos"] == 0:
            cells.append(cell("", "-"))
        elif t["frames"] is None:
            cells.append(cell("", f"no sample file\n{_plural(t['videos'], 'video')}"))
        else:
            cells.append(cell(f"{t['frames']:,} frames", _plural(t["videos"], "video")))
        table.add_row(label, *cells)
    console.print(table)
    _note("usable = valid label and a crop jpg; test frames = every frame of the organisers' sample file",
          style="dim")
    unannotated = ""
    if crops["unannotated"]:
        unannotated = f" ({crops['unannotated']:,} annotated for no task: test or unused)"
    _note(f"Crop folders: {_plural(crops['videos'], 'video')}, {crops['crops']:,} crops{unannotated}")

    def per_split(key: str) -> str:
        return ", ".join(f"{single(r['task']).title} {r['split']} {r[key]:,}" for r in rows if r[key])

    no_crop = sum(r["valid_without_crop"] for r in rows)
    detail = f" ({per_split('valid_without_crop')})" if no_crop else ""
    _note(f"Valid frames without a crop: {no_crop:,}{detail}")
    if no_crop:
        _note("  They count in the official metric: predictions are needed for them too "
              "(e.g. carry the previous frame's features forward).")
    past = sum(r["crops_past_end"] for r in rows)
    if past:
        _note(f"Crops past the last annotated frame (no label): {past:,} ({per_split('crops_past_end')})")
    missing = sum(r["videos_without_crops"] for r in rows)
    missing_test = sum(r["videos_without_crops"] for r in test_rows)
    if missing or missing_test:
        _note(f"Videos without a crop folder: {missing:,} annotated, {missing_test:,} test", style="yellow")
    bad = sum(r["out_of_range"] for r in rows)
    if bad:
        _note(f"Rows with out-of-range values (counted invalid): {bad:,} ({per_split('out_of_range')})",
              style="yellow")
    for split in ("train", "val"):
        if dataset.mtl_file(split) is not None:
            mtl = dataset.mtl_annotations(split)
            counts = ", ".join(f"{single(t).title} {int(v.sum()):,}" for t, v in mtl.valid.items())
            _note(f"Multi-task {split} ({mtl.path.name}): {len(mtl):,} images; valid {counts}")

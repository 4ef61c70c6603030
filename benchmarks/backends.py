"""Per-run overhead of each backend against the local one, and two local workers against one.

    .venv/bin/python benchmarks/backends.py              # on the demo (make demo); rewrites the doc
    .venv/bin/python benchmarks/backends.py --no-write    # measure and print only
    .venv/bin/python benchmarks/backends.py --tiny --no-write   # a smoke test of this script (a tiny world)

The grid: fc heads on the demo's DDAMFN cache, ``--cells`` cells (VA / EXPR / AU over seeds), ``--epochs``
epochs each, one pinned thread per cell. Each backend trains the same grid into a fresh folder:

- local, 1 job: the cells one after another in this process (the baseline);
- local, 2 jobs: two spawned worker processes (one fresh process per cell);
- submitit (its LocalExecutor: real job processes, as on Slurm minus the queue), one run per job and
  ``cells / 2`` runs per job;
- ray: a local 2-CPU cluster started for the grid (its start-up is counted: a user pays it once per grid).

Overhead per run = (backend wall - local 1-job wall) / cells, so it includes process start-up and imports,
which is what a backend costs; the metrics of every backend are checked equal to the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from perfdoc import write_section  # benchmarks/perfdoc.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def recipe(tmp: Path, data: Path, cache: Path, cells: int, epochs: int, backbone: str = "ddamfn") -> Path:
    seeds = list(range(max(1, cells // 3)))
    extra = cells - 3 * len(seeds)
    rows = [f'[[rows]]\nlabel = "Fc"\nbackbone = "{backbone}"\nhead = "fc"\ntasks = ["va", "expr", "au"]\n'
            f"seeds = {seeds}\n"]
    if extra > 0:
        rows.append(f'[[rows]]\nlabel = "Fc256"\nbackbone = "{backbone}"\nhead = "fc"\nhidden = 256\n'
                    f'tasks = {json.dumps(["va", "expr", "au"][:extra])}\n')
    path = tmp / "grid.toml"
    path.write_text(f"""[grid]
name = "backends"
title = "Backend benchmark"
data = "{data}"
out = "{tmp / 'unused'}"

[caches]
{backbone} = "{cache}"

[defaults]
epochs = {epochs}
threads = 1
plots = false
batch_size = 128

{chr(10).join(rows)}""")
    return path


def run(path: Path, out: Path, backend: str, **options: object) -> tuple[float, dict]:
    from abawfeat.ablate import run_ablation
    from abawfeat.backends import BackendOptions

    jobs = int(options.pop("jobs", 1))
    t0 = time.perf_counter()
    result = run_ablation(path, out=str(out), jobs=jobs, backend=backend,
                          options=BackendOptions(jobs=jobs, **options), log=lambda _m: None)
    wall = time.perf_counter() - t0
    bad = [c for c in result.cells if c.status != "trained"]
    if bad:
        raise SystemExit(f"{backend}: {len(bad)} cell(s) not trained: {bad[0].error}")
    return wall, {str(c.run_dir.relative_to(out)): c.metrics for c in result.cells}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="a tiny synthetic world (smoke test)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--skip", action="append", default=[], help="skip a backend (submitit, ray)")
    args = ap.parse_args()
    os.environ.setdefault("ABAWFEAT_NO_PROGRESS", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    tmp = Path(tempfile.mkdtemp(prefix="abawfeat-backends-"))
    try:
        if args.tiny:
            sys.path.insert(0, str(ROOT / "tests"))
            from worlds import build_world

            world = build_world(tmp / "world", n_train=4, n_val=2, n_test=1)
            data, cache = world.root, world.cache
            args.cells, args.epochs = min(args.cells, 4), min(args.epochs, 2)
        else:
            data, cache = ROOT / "demo" / "data", ROOT / "demo" / "cache" / "ddamfn.h5"
            if not cache.is_file():
                raise SystemExit(f"{cache}: missing; run `make demo` first (or pass --tiny)")
        path = recipe(tmp, data, cache, args.cells, args.epochs, "fake" if args.tiny else "ddamfn")
        results: dict[str, tuple[float, dict]] = {}
        plan = [("local, 1 job", "local", {}), ("local, 2 jobs", "local", {"jobs": 2})]
        if "submitit" not in args.skip:
            plan += [("submitit local, 1 run per job", "submitit", {"submitit_local": True}),
                     (f"submitit local, {max(1, args.cells // 2)} runs per job", "submitit",
                      {"submitit_local": True, "runs_per_job": max(1, args.cells // 2)})]
        if "ray" not in args.skip:
            try:
                import ray  # noqa: F401

                plan.append(("ray, local 2-CPU cluster", "ray", {"jobs": 2}))
            except ImportError:
                print("ray not installed: skipped (pip install '.[ray]')")
        for i, (label, backend, options) in enumerate(plan):
            results[label] = run(path, tmp / f"out-{i}", backend, **dict(options))
            print(f"{label}: {results[label][0]:.1f} s", flush=True)
        base_wall, base_metrics = results["local, 1 job"]
        for label, (_, metrics) in results.items():
            if metrics != base_metrics:
                raise SystemExit(f"{label}: metrics differ from the local backend's")
        lines = [f"Grid: {args.cells} fc cells x {args.epochs} epochs, one thread each, "
                 f"{'tiny test world' if args.tiny else 'demo data'}; {os.cpu_count()} cores, "
                 f"{platform.processor() or platform.machine()}; every backend's metrics equal the local "
                 "1-job run's. Command: `.venv/bin/python benchmarks/backends.py`.", "",
                 "| backend | wall (s) | vs local 1 job | overhead per run (s) |", "|---|---:|---:|---:|"]
        for label, (wall, _) in results.items():
            lines.append(f"| {label} | {wall:.1f} | {base_wall / wall:.2f}x | "
                         f"{(wall - base_wall) / args.cells:+.2f} |")
        text = "\n".join(lines)
        print(text)
        if not args.no_write and not args.tiny:
            write_section("backends", text)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

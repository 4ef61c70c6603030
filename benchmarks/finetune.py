"""End-to-end fine-tuning throughput (``abawfeat finetune``): training images per second, against a naive
baseline measured in the same run.

    .venv/bin/python benchmarks/finetune.py             # measure, print, rewrite docs/performance.md
    .venv/bin/python benchmarks/finetune.py --no-write  # measure and print only
    .venv/bin/python benchmarks/finetune.py --steps 2   # a quicker look

Data: a synthetic Aff-Wild2 tree from ``abawfeat.data.synth`` (112 x 112 JPEG crops). Weights: the
published-format DDAMFN checkpoint in tests/fixtures/ddamfn (same network and cost as the AffectNet weights).
Task VA, FC head, batch 32 frames, the whole backbone trainable (``--unfreeze-from conv1``): the most
expensive setting, what a first fine-tuning run does.

- baseline: the obvious loop: our DDAMFN + head, eager, fp32, NCHW, ``loss.backward(); optimizer.step()`` on
  tensors decoded beforehand (decoding is not even counted, which flatters it).
- ours: ``abawfeat.finetune``'s step (``FinetuneModel`` + ``Stepper``) fed by ``FrameSource`` (JPEG decoding
  and augmentation included, in the main process), channels_last, at fp32 and bf16 autocast; and bf16 with
  only the last blocks trainable (``--unfreeze-from conv_5``), which skips most of the backward pass.

Each measurement runs in its own subprocess (its own peak RSS); one warm-up step is not timed. The section
also converts the rates into the time of one epoch over the 8th ABAW VA training set (1,682,057 frames) and
compares it with a cached-feature FC head epoch (docs/performance.md, heads section / design notes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from perfdoc import DOC, write_section  # benchmarks/perfdoc.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "tests" / "fixtures" / "ddamfn" / "ddamfn_official_format_random.pth"
VA_TRAIN_FRAMES = 1_682_057
CACHED_FC_EPOCH_S = 2.0  # design notes: a plain PyTorch FC epoch over the cached VA-train frames


# ------------------------------------------------------------------------------------ measurements (child)


def _setup(spec: dict[str, Any]) -> tuple[Any, ...]:
    import numpy as np
    import torch

    from abawfeat.data import AffWild2
    from abawfeat.data.frames import AugmentConfig, FrameSource, FrameWindows, load_frames_split
    from abawfeat.encoders import build_encoder
    from abawfeat.finetune import FinetuneModel
    from abawfeat.heads import build_head

    torch.manual_seed(0)
    data = AffWild2(spec["data"])
    seqs, dirs = load_frames_split(data, ("va",), "train")
    encoder = build_encoder("ddamfn", weights=str(WEIGHTS))
    head = build_head("tasks", trunk="fc", in_dim=512, tasks=("va",), normalize=False)
    model = FinetuneModel(encoder, head, unfreeze_from=spec["unfreeze_from"],
                          channels_last=spec["channels_last"]).train()
    windows = FrameWindows(seqs, dirs, np.arange(seqs.n_rows)[:, None], ("va",), encoder.transform,
                           AugmentConfig(enabled=spec["augment"]))
    source = FrameSource(windows, batch_size=spec["batch"], seed=0, workers=0)
    return model, head, source


def measure_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from abawfeat.finetune import StepLoss, Stepper
    from abawfeat.train import build_objective

    model, head, source = _setup(spec)
    optimizer = torch.optim.AdamW([{"params": model.backbone_parameters(), "lr": 1e-4},
                                   {"params": list(head.parameters()), "lr": 1e-3}])
    step = Stepper(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                   torch.amp.GradScaler("cpu", enabled=False),
                   StepLoss({"va": build_objective("ccc", head, ("va",))}, ("va",)),
                   torch.device("cpu"), spec["precision"], grad_clip=1.0)
    def groups() -> Iterator[list[Any]]:
        epoch = 1
        while True:
            yield from source.batches(epoch)
            epoch += 1

    feed = groups()
    step(model, next(feed))  # warm-up: allocators, oneDNN kernel selection
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step(model, next(feed))  # decoding and augmenting the batch happen in next(): timed, as in a run
    seconds = time.perf_counter() - start
    images = spec["steps"] * spec["batch"]
    return {"images": images, "seconds": seconds, "ips": images / seconds, "rss_mb": _peak_mb()}


def measure_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from abawfeat.losses import ccc_loss

    model, head, source = _setup(spec)
    # Decoded before timing starts: the baseline is not charged for JPEG decoding.
    batches = [group[0] for group in itertools.islice(source.batches(1), spec["steps"] + 1)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds = 0.0
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        out = model(b.inputs, b.mask)
        loss = ccc_loss(out["va"], b.targets["va"], b.valid["va"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i:
            seconds += time.perf_counter() - t0
    images = (len(batches) - 1) * spec["batch"]
    return {"images": images, "seconds": seconds, "ips": images / seconds, "rss_mb": _peak_mb()}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ driver (parent)


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"measurement {spec['label']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_data(root: Path, frames_needed: int) -> Path:
    from abawfeat.data.synth import SynthConfig, generate

    out = root / "synth"
    generate(SynthConfig(videos=8, frames=max(20, frames_needed // 2), seed=0), out)
    return out


def plan(args: argparse.Namespace, data: Path) -> list[dict[str, Any]]:
    base = {"data": str(data), "batch": args.batch, "steps": args.steps, "augment": True}
    return [
        {**base, "label": "baseline: eager fp32 NCHW, all blocks", "kind": "baseline", "precision": "fp32",
         "channels_last": False, "unfreeze_from": "conv1", "augment": False},
        {**base, "label": "ours fp32, all blocks", "kind": "ours", "precision": "fp32",
         "channels_last": True, "unfreeze_from": "conv1"},
        {**base, "label": "ours bf16, all blocks", "kind": "ours", "precision": "bf16",
         "channels_last": True, "unfreeze_from": "conv1"},
        {**base, "label": "ours bf16, from conv_5", "kind": "ours", "precision": "bf16",
         "channels_last": True, "unfreeze_from": "conv_5"},
    ]


def _rate(ips: float) -> str:
    return f"{ips:.1f}" if ips < 10 else f"{ips:.0f}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 3600 else f"{seconds / 60:,.0f} min"


def summarise(results: list[dict[str, Any]], args: argparse.Namespace, command: str,
              load: tuple[float, float]) -> str:
    import torch

    base = results[0]["ips"]
    lines = [
        "## End-to-end fine-tuning",
        "",
        f"Command: `{command}` (torch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs). DDAMFN (published-format fixture weights) + FC head, task VA, "
        f"batch {args.batch} frames of 112 x 112, {args.steps} timed steps after one warm-up, each "
        f"configuration in its own process, best of {args.rounds} alternating rounds. Load average "
        f"{load[0]:.1f} before, {load[1]:.1f} after (on 2 cores: other jobs ran; they slow every row).",
        "",
        "| configuration | train images/s | vs baseline | one VA-train epoch (1.68 M frames) | peak RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['label']} | {_rate(r['ips'])} | {r['ips'] / base:.2f}x | "
                     f"{_hours(VA_TRAIN_FRAMES / r['ips'])} | {r['rss_mb']:,.0f} MB |")
    best = max(r["ips"] for r in results)
    full = {r["precision"]: r["ips"] for r in results
            if r["kind"] == "ours" and r["unfreeze_from"] == "conv1"}
    rate = max(full.values())
    lines += [
        "",
        f"Against cached features: a stage-two FC epoch over the same 1.68 M cached frames takes about "
        f"{CACHED_FC_EPOCH_S:.0f} s (design notes; heads section); one end-to-end epoch with the whole "
        f"backbone trainable at {_rate(rate)} images/s takes 1.68 M / {_rate(rate)} s = "
        f"{_hours(VA_TRAIN_FRAMES / rate)}, about {VA_TRAIN_FRAMES / rate / CACHED_FC_EPOCH_S:,.0f} times "
        "longer, plus a forward pass over the 383,814 VA-val crops after every epoch. bf16 vs fp32 with the "
        f"whole backbone trainable: {full.get('bf16', math.nan) / full.get('fp32', math.nan):.2f}x; "
        "training only the late blocks skips most of the backward pass. Even the fastest row "
        f"({_rate(best)} images/s) needs {_hours(VA_TRAIN_FRAMES / best)} per epoch: on this machine "
        "fine-tuning is for small subsets, smoke tests and the demo; real runs belong on GPUs "
        "(`torchrun --nproc-per-node N -m abawfeat finetune ...`, docs/finetune.md).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="frames per training step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per configuration (best kept)")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite docs/performance.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        result = (measure_baseline if spec["kind"] == "baseline" else measure_ours)(spec)
        print(json.dumps(result))
        return

    os.environ.setdefault("ABAWFEAT_NO_PROGRESS", "1")
    options = (("batch", args.batch), ("steps", args.steps), ("rounds", args.rounds))
    command = "python benchmarks/finetune.py" + "".join(
        f" --{k} {v}" for k, v in options if v != parser.get_default(k))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="abawfeat-bench-ft-") as tmp:
        data = make_data(Path(tmp), args.batch * (args.steps + 1))
        # Rounds alternate the configurations, so a change in machine load hits all of them; each keeps
        # its best round (throughput is only ever lowered by other jobs, never raised).
        results: dict[str, dict[str, Any]] = {}
        for r in range(args.rounds):
            for spec in plan(args, data):
                print(f"round {r + 1}: {spec['label']} ...", file=sys.stderr, flush=True)
                got = run_child(spec)
                print(f"  {got['ips']:.1f} images/s", file=sys.stderr, flush=True)
                if spec["label"] not in results or got["ips"] > results[spec["label"]]["ips"]:
                    results[spec["label"]] = {**spec, **got}
    text = summarise(list(results.values()), args, command, (load_before, os.getloadavg()[0]))
    print(text)
    print(json.dumps([{k: r[k] for k in ("label", "ips", "seconds", "images", "rss_mb")}
                      for r in results.values()]), file=sys.stderr)
    if not args.no_write:
        write_section("finetune", text)
        print(f"\nwrote the finetune section of {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

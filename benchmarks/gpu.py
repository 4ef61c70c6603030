"""Stage one on a GPU: frames/s and GPU utilisation of `extract`, eager and compiled, against the eager fp32
forward pass on the same GPU, and the GPU's features against the CPU's fp32 ones.

    .venv/bin/python benchmarks/gpu.py                      # on a CUDA machine: measure, print, rewrite the
                                                            # "gpu" section of docs/performance.md
    .venv/bin/python benchmarks/gpu.py --no-write           # measure and print only
    .venv/bin/python benchmarks/gpu.py --device cpu --videos 2 --frames 24 --backbones ddamfn --no-compile
                                                            # a smoke run of this script (never writes)

Without a CUDA device the default run stops with one line: nothing here is measured on a CPU.

Data: a synthetic Aff-Wild2 tree from ``abawfeat.data.synth`` (112 x 112 JPEG crops). Weights: DDAMFN loads
the published-format checkpoint in tests/fixtures/ddamfn; CLIP ViT-B-32 is random-init (same cost as
pretrained). Rows, each in its own process so its CUDA state and peak memory are its own:

- baseline: the encoder eager, fp32, NCHW, on tensors already on the GPU (decoding, copies and writing not
  counted, which flatters it), synchronised before the clock stops.
- ours eager / compiled: ``run_extraction`` end to end on the device: JPEG decoding in DataLoader workers into
  pinned memory, non-blocking copies, one batch in flight while the previous one is copied back and written,
  autocast in ``--precision``; compiled is torch.compile with ``mode="max-autotune"`` (autotuned kernels and
  CUDA graphs). "steady" excludes the first batch (worker start-up, compiling).

GPU utilisation is sampled every 100 ms during each row by NVML (``nvidia-ml-py`` when installed, else
``nvidia-smi``): the mean share of time a kernel was running. The parity row extracts the same frames on the
CPU in fp32 and reports the largest difference of the GPU's features from them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from extract import WEIGHTS, make_data  # benchmarks/extract.py (scripts run from benchmarks/)
from perfdoc import measure_in_child, write_section

# ---------------------------------------------------------------------------------- utilisation sampling


class UtilisationSampler:
    """Mean GPU utilisation (per cent) over the ``with`` block, sampled every ``period`` seconds; None when
    neither NVML nor nvidia-smi answers (or on a CPU)."""

    def __init__(self, device: str, period: float = 0.1) -> None:
        self.index = int(device.split(":")[1]) if ":" in device else 0
        self.enabled = device.startswith("cuda")
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _reader(self) -> Any:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - no NVML bindings: fall back to the command-line tool
            if shutil.which("nvidia-smi") is None:
                return None
            query = ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu",
                     "--format=csv,noheader,nounits"]
            return lambda: float(subprocess.run(query, capture_output=True, text=True, check=True).stdout)

    def _loop(self, read: Any) -> None:
        while not self._stop.wait(self.period):
            # A failed sample is a missing sample, not a failed benchmark.
            with contextlib.suppress(Exception):
                self.samples.append(read())

    def __enter__(self) -> UtilisationSampler:
        read = self._reader() if self.enabled else None
        if read is not None:
            self._thread = threading.Thread(target=self._loop, args=(read,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


# ------------------------------------------------------------------------------------ measurements (child)


def _encoder_options(backbone: str) -> dict[str, Any]:
    return {"weights": str(WEIGHTS)} if backbone == "ddamfn" else {"random_init": True}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_device_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def measure_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """Eager fp32 NCHW forward passes on tensors already on the device."""
    import torch
    from PIL import Image

    from abawfeat.data import AffWild2
    from abawfeat.encoders import build_encoder

    device = spec["device"]
    encoder = build_encoder(spec["backbone"], **_encoder_options(spec["backbone"])).eval().to(device)
    data = AffWild2(spec["data"])
    paths = [data.crop_path(v, int(f)) for v in data.videos_with_crops() for f in data.crop_frames(v)]
    x = torch.stack([encoder.transform(Image.open(p).convert("RGB")) for p in paths]).to(device)
    batch = spec["batch_size"]
    with torch.no_grad(), UtilisationSampler(device) as util:
        encoder(x[:batch])  # warm-up, as "steady" excludes ours' first batch too
        _sync(device)
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            encoder(x[i : i + batch])
        _sync(device)
        seconds = time.perf_counter() - start
    return {"frames": len(x), "steady_fps": len(x) / seconds, "wall_fps": None, "util": util.mean,
            "device_mb": _peak_device_mb(device)}


def measure_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from abawfeat.cache import FeatureCache
    from abawfeat.extract import ExtractConfig, run_extraction

    config = ExtractConfig(
        backbone=spec["backbone"], data=Path(spec["data"]), out=Path(spec["out"]),
        precision=spec["precision"], compile=spec["compile"], batch_size=spec["batch_size"],
        workers=spec["workers"], device=spec["device"], dtype="float32", progress=False,
        **_encoder_options(spec["backbone"]),
    )
    start = time.perf_counter()
    with UtilisationSampler(spec["device"]) as util:
        result = run_extraction(config)
    wall = time.perf_counter() - start
    out: dict[str, Any] = {
        "frames": result.frames, "steady_fps": result.steady_frames_per_second,
        "wall_fps": result.frames / wall,
        "warmup_s": result.warmup_seconds, "util": util.mean, "device_mb": _peak_device_mb(spec["device"]),
        "compiled": result.compiled,
    }
    if spec.get("reference"):
        with FeatureCache(spec["out"]) as ours, FeatureCache(spec["reference"]) as ref:
            diffs = []
            for v in ref.videos():
                a, b = ours.features(v), ref.features(v)
                diffs.append(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
        out["max_rel_diff"] = float(max(diffs))
    return out


# ------------------------------------------------------------------------------------------ driver (parent)


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    result = measure_in_child(__file__, spec)
    if spec["kind"] == "ours" and not result["frames"]:
        raise SystemExit(f"measurement {spec['label']} extracted no frames")
    result.update(label=spec["label"], kind=spec["kind"], backbone=spec["backbone"],
                  reference_row=bool(spec.get("reference_row")))
    util = "n/a" if result["util"] is None else f"{result['util']:.0f} %"
    print(f"  {spec['label']:<46} {result['steady_fps']:8.1f} frames/s, GPU busy {util}", flush=True)
    return result


def plan(args: argparse.Namespace, data: Path, tmp: Path) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    common = {"data": str(data), "batch_size": args.batch_size, "workers": args.workers}
    for backbone in args.backbones.split(","):
        reference = str(tmp / f"{backbone}-cpu-fp32.h5")
        specs.append({"kind": "ours", "label": f"reference {backbone} cpu fp32 eager", "backbone": backbone,
                      "precision": "fp32", "compile": False, "device": "cpu", "out": reference,
                      **common, "batch_size": 32, "reference_row": True})
        for r in range(args.rounds):
            specs.append({"kind": "baseline", "label": f"baseline {backbone} fp32 eager NCHW, on device",
                          "backbone": backbone, "device": args.device, **common})
            for compile_ in (False, True) if args.compile else (False,):
                label = f"ours {backbone} {args.precision} {'compiled' if compile_ else 'eager'}"
                specs.append({"kind": "ours", "label": label, "backbone": backbone,
                              "precision": args.precision, "compile": compile_, "device": args.device,
                              **common,
                              "out": str(tmp / f"{backbone}-{int(compile_)}-{r}.h5"), "reference": reference})
        specs.append({"kind": "baseline", "label": f"baseline {backbone} fp32 eager NCHW, on device",
                      "backbone": backbone, "device": args.device, **common})
    return specs


def summarise(results: list[dict[str, Any]], n_frames: int, args: argparse.Namespace, gpu: str) -> str:
    lines = [
        f"Measured with `python benchmarks/gpu.py` on {time.strftime('%Y-%m-%d')}: {gpu}, torch "
        f"{_torch_version()}, {n_frames:,} synthetic crops, batch {args.batch_size}, {args.workers} decoding "
        f"workers, {args.rounds} round(s); medians over the rounds, each ratio against the baselines run "
        "before and after it.",
        "",
        "| configuration | steady frames/s | vs baseline | GPU busy | peak GPU memory "
        "| max rel. diff from CPU fp32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for backbone in args.backbones.split(","):
        rows = [(i, r) for i, r in enumerate(results) if r["backbone"] == backbone and not r["reference_row"]]
        lines.append(_row(f"baseline {backbone} fp32 eager", [r for _, r in rows if r["kind"] == "baseline"],
                          None))
        for label in sorted({r["label"] for _, r in rows if r["kind"] == "ours"}):
            picked = [(i, r) for i, r in rows if r["label"] == label]
            ratios = [r["steady_fps"] / _bracket(results, i) for i, r in picked]
            lines.append(_row(label, [r for _, r in picked], statistics.median(ratios)))
    warm = [r["warmup_s"] for r in results if r["kind"] == "ours" and r.get("compiled")]
    if warm:
        lines += ["", f"First batch of the compiled rows (compiling, autotuning, capturing the CUDA graph): "
                      f"{statistics.median(warm):.0f} s (median)."]
    return "\n".join(lines)


def _row(label: str, rows: list[dict[str, Any]], ratio: float | None) -> str:
    fps = statistics.median(r["steady_fps"] for r in rows)
    utils = [r["util"] for r in rows if r["util"] is not None]
    mems = [r["device_mb"] for r in rows if r.get("device_mb") is not None]
    diffs = [r["max_rel_diff"] for r in rows if "max_rel_diff" in r]
    return (f"| {label} | {fps:.1f} | {'-' if ratio is None else f'{ratio:.2f}x'} | "
            f"{f'{statistics.median(utils):.0f} %' if utils else 'n/a'} | "
            f"{f'{max(mems):.0f} MB' if mems else 'n/a'} | {f'{max(diffs):.1e}' if diffs else '-'} |")


def _bracket(results: list[dict[str, Any]], i: int) -> float:
    """Mean of the nearest baselines of the same backbone before and after row ``i``."""
    backbone = results[i]["backbone"]
    base = [j for j, r in enumerate(results) if r["kind"] == "baseline" and r["backbone"] == backbone]
    near = [j for j in base if j < i][-1:] + [j for j in base if j > i][:1]
    return statistics.fmean(results[j]["steady_fps"] for j in near)


def _torch_version() -> str:
    import torch

    return torch.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda[:N] (default cuda), or cpu for a smoke run")
    parser.add_argument("--backbones", default="ddamfn,clip", help="comma-separated (default ddamfn,clip)")
    parser.add_argument("--videos", type=int, default=16, help="synthetic videos (default 16)")
    parser.add_argument("--frames", type=int, default=400, help="mean frames per video (default 400)")
    parser.add_argument("--batch-size", type=int, default=128, help="frames per forward pass (default 128)")
    parser.add_argument("--workers", type=int, default=4, help="JPEG-decoding DataLoader workers (default 4)")
    parser.add_argument("--precision", default="bf16", help="autocast precision of ours (default bf16)")
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of each GPU row (default 2)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled rows")
    parser.add_argument("--no-write", dest="write", action="store_false", help="do not touch the docs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        measure = measure_baseline if spec["kind"] == "baseline" else measure_ours
        print(json.dumps(measure(spec)))
        return
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device here, so nothing is measured "
                         "(--device cpu runs this script's code path as a smoke test)")
    gpu = torch.cuda.get_device_name(args.device) if cuda else "CPU (smoke run, not a measurement)"
    print(f"{gpu}; synthesising {args.videos} videos ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data, n_frames = make_data(Path(tmp), args.videos, args.frames)
        results = [run_child(spec) for spec in plan(args, data, Path(tmp))]
    text = summarise(results, n_frames, args, gpu)
    print("\n" + text)
    if args.write and cuda:
        write_section("gpu", text)
        print("\nwrote the gpu section of docs/performance.md")


if __name__ == "__main__":
    main()

"""ViT (DINOv2) extraction in bf16 against this CPU's bf16 matrix-product bound, measured in the same run.

    .venv/bin/python benchmarks/vit.py               # DINOv2-base size at 224, rewrite docs/performance.md
    .venv/bin/python benchmarks/vit.py --no-write    # measure and print only
    .venv/bin/python benchmarks/vit.py --size tiny --batch-size 4 --rounds 1 --seconds 1 --no-write  # a check

- bound: the GFLOP/s of a bf16 matrix product of the shapes that hold almost all of a ViT's work, the MLP's
  ``[B N, D] @ [D, 4 D]`` and the attention input projection's ``[B N, D] @ [D, 3 D]`` for this batch, size
  and token count; the faster of the two is the bound.
- model: the DINOv2 encoder as extraction runs it (``abawfeat.extract``'s model preparation: ``PixelInput``,
  channels_last, bf16 autocast with its weight-cast cache, no_grad) on uint8 batches already in memory, so
  that decoding is not counted; random weights of the published architecture (same cost as pretrained).
  Eager, and compiled (torch.compile with inductor's freezing, what extract runs for DINOv2 at scale;
  ``--no-compile`` skips it), with the compiled features' largest difference from eager's on one batch.
- end to end (``--e2e-videos``): ``run_extraction`` on a synthetic Aff-Wild2 tree (JPEG decoding in a worker,
  HDF5 writing), its steady frames/s.

Per-frame work is counted twice: analytically (patch embedding, the projections, attention's two products,
the MLP; layer norms and softmax left out) and with ``torch.utils.flop_counter`` on the real model (which
misses the products inside the CPU flash-attention kernel, 4 N^2 D per layer); the
efficiency is frames/s x GFLOP per frame / bound. Bound and model alternate, ``--rounds`` times, and the
medians are reported, so that a change in machine load hits both. ``--precision fp32`` measures the same
against the fp32 bound. The CPU's bf16 instructions are printed: without AVX-512 BF16 (or AMX), PyTorch
computes bf16 products by conversion and they run at a small fraction of fp32's speed, so the bf16 figures
say nothing about a machine that has them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from perfdoc import DOC, write_section  # benchmarks/perfdoc.py (scripts run from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def analytic_gflop(config: Any, image_size: int) -> float:
    """GFLOP (2 per multiply-add) of one frame through a DINOv2 of ``config`` at ``image_size``."""
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    d, layers = config.hidden_size, config.num_hidden_layers
    hidden = d * config.mlp_ratio
    patches = (image_size // patch) ** 2
    n = 1 + int(getattr(config, "num_register_tokens", 0) or 0) + patches
    embed = 2 * patches * (3 * patch * patch) * d
    mlp = 2 * n * d * hidden * (3 if config.use_swiglu_ffn else 2)
    per_layer = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + mlp
    return (embed + layers * per_layer) / 1e9


def counted_gflop(encoder: Any, image_size: int) -> float:
    """GFLOP of one frame as torch's flop counter sees the real forward pass (matrix products, attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(x)
    return counter.get_total_flops() / 1e9


def cpu_bf16_flags() -> str:
    """The CPU's bf16 matrix instructions, as /proc/cpuinfo lists them ("none" without)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16", "avx512f") if f in flags.split()]
    return ", ".join(found) or "none (no AVX-512)"


def matmul_gflops(m: int, k: int, n: int, seconds: float, dtype: Any) -> float:
    import torch

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def bound(tokens: int, d: int, hidden: int, seconds: float, dtype: Any) -> dict[str, float]:
    return {"mlp": matmul_gflops(tokens, d, hidden, seconds, dtype),
            "qkv": matmul_gflops(tokens, d, 3 * d, seconds, dtype)}


def model_fps(model: Any, batch: int, image_size: int, seconds: float, precision: str) -> float:
    import torch

    pixels = torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8)
    x = pixels.permute(0, 3, 1, 2)  # the NCHW view of NHWC pixels, as extraction feeds them
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for _ in range(2):
            model(x)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or count < 2:
            model(x)
            count += 1
    return batch * count / (time.perf_counter() - start)


def compiled_difference(models: dict[str, Any], batch: int, image_size: int, precision: str) -> float:
    """Compile (the first call) and return the largest per-frame relative difference of the compiled
    model's features from the eager model's, on one batch of random pixels."""
    import torch

    pixels = torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).permute(0, 3, 1, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        eager = models["eager"](pixels)[0].float()
        compiled = models["compiled"](pixels)[0].float()
    return float(((compiled - eager).norm(dim=1) / eager.norm(dim=1)).max())


def end_to_end(size: str, image_size: int, batch: int, videos: int, frames: int,
               precision: str) -> dict[str, float]:
    from abawfeat.data import AffWild2
    from abawfeat.data.synth import SynthConfig, generate
    from abawfeat.extract import ExtractConfig, run_extraction

    with tempfile.TemporaryDirectory(prefix="abawfeat-bench-vit-") as tmp:
        data = Path(tmp) / "synth"
        generate(SynthConfig(videos=videos, frames=frames, seed=0), data)
        n = sum(len(AffWild2(data).crop_frames(v)) for v in AffWild2(data).videos_with_crops())
        config = ExtractConfig(backbone="dinov2", data=data, out=Path(tmp) / "dinov2.h5", precision=precision,
                               compile=False, batch_size=batch, workers=1, device="cpu", progress=False,
                               random_init=True, encoder_options={"size": size, "image_size": image_size})
        result = run_extraction(config)
    return {"frames": n, "steady_fps": result.steady_frames_per_second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", help="DINOv2 size: tiny, small, base (default), large")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--rounds", type=int, default=3, help="alternating bound/model rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per measurement (default 10)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--e2e-videos", type=int, default=0,
                        help="also run extraction end to end on a synthetic tree of this many videos")
    parser.add_argument("--e2e-frames", type=int, default=60, help="frames per synthetic video (default 60)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="measure the eager model only (default: also the compiled one extraction runs)")
    parser.add_argument("--no-write", dest="write", action="store_false", help="do not touch the docs")
    args = parser.parse_args()

    import torch

    from abawfeat.encoders import build_encoder
    from abawfeat.extract import ExtractConfig, _prepare_model

    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = build_encoder("dinov2", random_init=True, size=args.size, image_size=args.image_size)
    cfg = encoder.model.config
    analytic = analytic_gflop(cfg, args.image_size)
    counted = counted_gflop(encoder, args.image_size)
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
    tokens = args.batch_size * (1 + (args.image_size // patch) ** 2)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    models = {"eager": _prepare_model(encoder, torch.device("cpu"), ExtractConfig(
        backbone="dinov2", data=Path("."), precision=args.precision, compile=False))}
    compile_s = None
    if args.compile:
        # A second encoder of the same seed: the compiled graph freezes its weights as constants.
        twin = build_encoder("dinov2", random_init=True, size=args.size, image_size=args.image_size)
        models["compiled"] = _prepare_model(twin, torch.device("cpu"), ExtractConfig(
            backbone="dinov2", data=Path("."), precision=args.precision, compile=True))
        start = time.perf_counter()
        diff = compiled_difference(models, args.batch_size, args.image_size, args.precision)
        compile_s = time.perf_counter() - start
        if models["compiled"].failed:
            raise SystemExit("torch.compile failed: see the warning above")
    bounds: list[float] = []
    fps: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        b = bound(tokens, cfg.hidden_size, cfg.hidden_size * cfg.mlp_ratio, args.seconds / 2, dtype)
        bounds.append(max(b.values()))
        for name, model in models.items():
            fps[name].append(model_fps(model, args.batch_size, args.image_size, args.seconds, args.precision))
        print(f"  bound {b['mlp']:.0f} (mlp) / {b['qkv']:.0f} (qkv) GFLOP/s; model "
              + ", ".join(f"{name} {v[-1]:.2f}" for name, v in fps.items()) + " frames/s", flush=True)
    gemm = statistics.median(bounds)
    rates = {name: statistics.median(v) for name, v in fps.items()}
    e2e = None
    if args.e2e_videos:
        e2e = end_to_end(args.size, args.image_size, args.batch_size, args.e2e_videos, args.e2e_frames,
                         args.precision)
        print(f"  end to end: {e2e['steady_fps']:.2f} frames/s over {e2e['frames']} crops", flush=True)

    command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])
    ceiling = gemm / analytic
    lines = [
        f"## ViT extraction (DINOv2) against the {args.precision} matrix-product bound",
        "",
        f"Command: `{command}` ({os.cpu_count()} cores, bf16 instructions: {cpu_bf16_flags()}, torch "
        f"{torch.__version__.split('+')[0]}, {torch.get_num_threads()} threads; medians of {args.rounds} "
        "alternating rounds).",
        "",
        f"- model: DINOv2-{args.size} ({cfg.num_hidden_layers} layers, width {cfg.hidden_size}) at "
        f"{args.image_size} px, {tokens // args.batch_size} tokens; {analytic:.3g} GFLOP per frame counted "
        f"analytically, {counted:.3g} by torch's flop counter (which does not count the CPU attention "
        "kernel's two products)",
        f"- bound: {args.precision} matrix product of the model's own shapes (batch {args.batch_size}, "
        f"{tokens} rows): "
        f"{gemm:.0f} GFLOP/s, i.e. at most {ceiling:.2f} frames/s",
        f"- extraction's model eager (PixelInput, {args.precision}, autocast's weight-cast cache), batches "
        f"in memory: {rates['eager']:.2f} frames/s = {100 * rates['eager'] / ceiling:.0f} % of the bound",
    ]
    if "compiled" in rates:
        lines.append(
            f"- extraction's model compiled (torch.compile with freezing, extract's default for DINOv2 on "
            f"10,000 crops or more), batches in memory: **{rates['compiled']:.2f} frames/s = "
            f"{100 * rates['compiled'] / ceiling:.0f} % of the bound** (target 85 %); compiling took "
            f"{compile_s:.0f} s once; its features differ from eager's by at most {diff:.1e} of their norm "
            "on a batch of random pixels")
    if e2e is not None:
        lines.append(f"- end to end (`run_extraction`, JPEG decoding in one worker, HDF5): "
                     f"{e2e['steady_fps']:.2f} frames/s = {100 * e2e['steady_fps'] / ceiling:.0f} % of the "
                     "bound")
    text = "\n".join(lines)
    print()
    print(text)
    if args.write:
        write_section("vit", text)
        print(f"\nwrote the vit section of {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

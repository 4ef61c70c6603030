"""What every stage-one loop shares (the face crops' in abawfeat/extract.py, the audio tracks' in
abawfeat/audio/extract.py): the extraction's config and result, the dataset and the videos a run asks for,
the encoder built from the config, and the cache writer's life across torchrun ranks (opened by rank 0
first, closed with the completed videos kept, a full disk in one line)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from abawfeat.cache import FEATURE_DTYPES, CacheWriter, default_cache_path, parts_dir
from abawfeat.errors import CacheError, ConfigError, DataError, DiskFullError
from abawfeat.utils.device import PRECISIONS
from abawfeat.utils.io import file_in_the_way, is_disk_full, what_is

if TYPE_CHECKING:
    from abawfeat.data.affwild2 import AffWild2
    from abawfeat.encoders.base import Encoder

R = TypeVar("R")



@dataclass
class ExtractConfig:
    """Everything one extraction needs; saved (as ``extract_config``) in the cache's provenance."""

    backbone: str  # registered encoder name: ddamfn, clip, ...
    data: Path  # Aff-Wild2 root; its folder name names the dataset in the default output path
    out: Path | None = None  # default: cache/<dataset name>/<backbone>.h5
    weights: str | None = None  # a path or a published name; None = the encoder's default
    random_init: bool = False  # no weights: seeded init (+ calibration where the encoder declares it)
    # The encoder's own options (``--encoder-opt key=value``): fields of its config dataclass, as values or
    # as text typed by the field's type (``abawfeat encoders`` lists them), e.g. {"clip_model": "ViT-B-16"}.
    encoder_options: dict[str, Any] = field(default_factory=dict)
    # Compute precision; bf16 pays on GPUs and on CPUs with bf16 kernels (AVX-512 BF16, AMX).
    precision: str = "fp32"
    # Frames per forward pass, filled across video boundaries. None = 32 on CPU, where DDAMFN's activations
    # then stay in cache (batch 32 beat 64 in one exploratory run; benchmarks/extract.py measures the default
    # end to end), 128 on a GPU.
    batch_size: int | None = None
    workers: int = 2  # DataLoader processes decoding JPEGs; 0 decodes in the main process
    device: str = "auto"  # auto | cpu | cuda[:N]
    videos: tuple[str, ...] = ()  # only these videos (default: every video with crops)
    dtype: str = "float16"  # stored feature dtype; float16 halves the cache with ~5e-4 relative error
    # torch.compile the encoder (inductor, weights frozen into the graph; on CUDA max-autotune with CUDA
    # graphs): faster end to end after a one-off compile (docs/performance.md). None = auto: on for encoders
    # that gain from it (``Encoder.compile_by_default``) when the videos asked for hold at least
    # AUTO_COMPILE_MIN_FRAMES crops, where the compile pays for itself. The decision depends on the videos
    # asked for, not on what is left to do, so a resumed run computes exactly as the run it continues.
    compile: bool | None = None
    seed: int = 0  # random-init weights are drawn from this seed
    calibration_frames: int = 256  # random-init: frames (spread over the whole dataset) for BN statistics
    # random-init: the dataset those frames come from (None: ``data``). ``abawfeat analyze`` re-extracts a
    # random-init run's features from new crops with the network calibrated as the run's was.
    calibration_data: Path | None = None
    progress: bool = True  # show the rich progress bar (rank 0 only)


@dataclass
class ExtractResult:
    """What one run did (``format_summary`` turns it into the closing summary)."""

    out: Path
    backbone: str
    videos_total: int  # videos asked for
    videos_done: int  # extracted in this run (all ranks)
    videos_skipped: int  # already complete in the cache
    frames: int  # frames written in this run
    bad_frames: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # video -> (frame, reason)
    seconds: float = 0.0  # the streaming loop (decode, encode, write), this rank
    warmup_frames: int = 0  # frames of the first batch, which also pays for worker start-up and compiling
    warmup_seconds: float = 0.0
    file_size: int = 0
    random_init: bool = False
    compiled: bool = False  # the encoder ran under torch.compile (and did not fall back to eager)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_frames_per_second(self) -> float:
        """Throughput after the first batch: what a long extraction runs at, compile time amortised."""
        seconds = self.seconds - self.warmup_seconds
        return (self.frames - self.warmup_frames) / seconds if seconds > 0 else 0.0

    @property
    def n_bad_frames(self) -> int:
        return sum(len(v) for v in self.bad_frames.values())


def encoder_options(config: ExtractConfig) -> dict[str, Any]:
    """Keyword options for ``build_encoder``: the generic choices and the encoder's own options, only those
    the user set (each encoder keeps its defaults); see ``abawfeat.encoders.encoder_options``."""
    from abawfeat.encoders import encoder_options as options_for

    return options_for(config.backbone, weights=config.weights, random_init=config.random_init,
                       seed=config.seed, options=config.encoder_options)


def validate_config(config: ExtractConfig) -> None:
    if config.batch_size is not None and config.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, not {config.batch_size}")
    if config.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, not {config.workers}")
    if config.dtype not in FEATURE_DTYPES:
        raise ConfigError(f"--dtype {config.dtype!r}: use one of {', '.join(FEATURE_DTYPES)}")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"--precision {config.precision!r}: use one of {', '.join(PRECISIONS)}")
    if config.random_init and config.weights is not None:
        raise ConfigError("--random-init and --weights exclude each other")
    if not isinstance(config.encoder_options, dict):
        raise ConfigError("encoder_options must be a dict of the encoder's options")
    if config.calibration_frames < 1:
        raise ConfigError(f"calibration_frames must be at least 1, not {config.calibration_frames}")


def resolve_output(config: ExtractConfig, dataset_name: str) -> Path:
    return Path(config.out) if config.out is not None else default_cache_path(dataset_name, config.backbone)


def check_output(out: Path) -> None:
    """Refuse, before the lock (whose file would land beside it), an output that is not a cache to create or
    add to: a folder, a path under a file, an existing file that is not HDF5 (a checkpoint, a run's file)."""
    import h5py

    if out.is_dir():
        raise CacheError(f"--out {out}: is a folder; --out names the cache file to write (.h5)")
    blocker = file_in_the_way(out.parent)
    if blocker is not None:
        raise CacheError(f"--out {out}: {blocker} is {what_is(blocker)}, not a folder")
    if out.is_file() and not h5py.is_hdf5(out):
        raise CacheError(f"{out}: exists and is not an HDF5 cache; extract never writes over other files (a "
                         "checkpoint, a run's file); choose another --out")


def disk_full_error(exc: BaseException, out: Path, kept: int | None) -> DiskFullError:
    """One line for a full disk during extraction: the file being written, and what is kept (``kept``
    complete videos; None before this run could look at the cache, which it then left as it was)."""
    where = getattr(exc, "path", None) or getattr(exc, "filename", None) or out
    where_kept = f"({out} and {parts_dir(out)})"
    what = f"the cache as it was {where_kept}" if kept is None else (
        f"the {kept} complete videos already in the cache {where_kept}")
    return DiskFullError(f"{where}: no space left on the device while writing it; kept: {what}; free some "
                         "space and re-run the same command to resume", where)


def open_dataset(root: str | Path) -> AffWild2:
    from abawfeat.data.affwild2 import AffWild2

    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "data root does not exist or is not a folder")
    return AffWild2(root)


def select_videos(all_videos: Sequence[str], wanted: Sequence[str], root: str | Path) -> list[str]:
    if not wanted:
        return list(all_videos)
    known = set(all_videos)
    unknown = [v for v in wanted if v not in known]
    if unknown:
        raise ConfigError(f"--videos: {', '.join(unknown)} not found among the crop folders under {root}")
    return sorted(set(wanted))


def balance_videos(videos: Sequence[str], n_frames: Sequence[int], rank: int, world_size: int) -> list[str]:
    """This rank's share: longest videos first, each to the least-loaded rank (ties to the lowest rank), so
    ranks finish together even though video lengths vary from a few hundred to tens of thousands of frames.
    Deterministic, and returned in name order."""
    if world_size <= 1:
        return list(videos)
    load = [0] * world_size
    share: list[list[str]] = [[] for _ in range(world_size)]
    for n, video in sorted(zip(n_frames, videos, strict=True), key=lambda t: (-t[0], t[1])):
        r = min(range(world_size), key=lambda k: (load[k], k))
        load[r] += n
        share[r].append(video)
    return sorted(share[rank])


def _try_enter(writer: CacheWriter) -> Exception | None:
    try:
        writer.__enter__()
        return None
    except Exception as exc:
        return exc


def prepare_encoder(
    config: ExtractConfig, encoder: Encoder | None, info: Any, random_note: str = ""
) -> Encoder:
    """The run's encoder in eval mode: the caller's, or built from the config, seeded so that a resumed run
    (or another rank) builds the very same one. A random-init run says so loudly first (``random_note``:
    what the run then does to the random network, e.g. calibration)."""
    from abawfeat.utils.device import seed_everything
    from abawfeat.utils.progress import loud_warning

    if config.random_init and info.is_main:
        loud_warning(
            f"--random-init: {config.backbone} gets RANDOM weights (seed {config.seed})"
            f"{', ' + random_note if random_note else ''}. Its features mean nothing about affect; use it "
            "for demos and tests only. This is recorded in the cache's provenance."
        )
    if encoder is None:
        from abawfeat.encoders import build_encoder

        seed_everything(config.seed)
        encoder = build_encoder(config.backbone, **encoder_options(config))
    return encoder.eval()


def write_cache(writer: CacheWriter, info: Any, distributed: bool, fill: Callable[[], R]) -> R:
    """Open ``writer`` on every rank, run ``fill`` (the extraction loop) and close it: Ctrl-C consolidates
    the completed videos, other errors keep them as parts, and a full disk is one line saying what is kept."""
    try:
        enter_writer(writer, info, distributed)
        try:
            result = fill()
        except BaseException:
            writer.__exit__(*sys.exc_info())
            raise
        writer.__exit__(None, None, None)
    except (DiskFullError, OSError) as exc:
        if isinstance(exc, DiskFullError) or is_disk_full(exc):
            raise disk_full_error(exc, writer.path, len(writer.done_videos())) from None
        raise
    return result


def enter_writer(writer: CacheWriter, info: Any, distributed: bool) -> None:
    """Open the writer on every rank, rank 0 (lock, checks, parts folder) first; raise on any failure."""
    error = _try_enter(writer) if info.is_main else None
    if not agree(distributed, error is None):
        raise error or CacheError(f"{writer.path}: rank 0 could not open the cache; see its message")
    if not info.is_main:
        error = _try_enter(writer)
    if not agree(distributed, error is None):
        if error is None:
            writer.__exit__(CacheError, None, None)  # release the lock, keep what exists
        raise error or CacheError(f"{writer.path}: another rank could not open the cache; see its message")


def agree(distributed: bool, ok: bool) -> bool:
    """True when every rank reports ok (a barrier that also carries failure); trivially ``ok`` alone."""
    if not distributed:
        return ok
    import torch
    import torch.distributed as tdist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
    return bool(flag.item())


__all__ = ["ExtractConfig", "ExtractResult", "agree", "balance_videos", "check_output", "disk_full_error",
           "encoder_options", "enter_writer", "open_dataset", "prepare_encoder", "resolve_output",
           "select_videos", "validate_config", "write_cache"]

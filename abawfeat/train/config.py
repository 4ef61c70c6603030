"""What a stage-two run depends on (``TrainConfig``), what follows from it (``Resolved``), and the head it
asks for (``build_head_for``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abawfeat.errors import ConfigError
from abawfeat.heads import FUSIONS, Head, build_head
from abawfeat.tasks import run_task_names, task, task_names
from abawfeat.trunks import TRUNKS, Context, build_trunk, make_trunk_config, trunk_fields

CLASS_WEIGHT_CHOICES = ("none", "inverse", "sqrt_inverse", "effective")
FILL_CHOICES = ("interpolate", "nearest", "previous")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
# Default batch size in windows: frame-wise trunks see single frames, temporal ones windows of --window.
# Temporal: 64 windows rather than 32, because recurrent matrix products are batch-sized
# (benchmarks/heads.py measures the default); on small datasets (the demo) pass --batch-size 32 for more
# steps per epoch.
DEFAULT_BATCH = {False: 1024, True: 64}
# Frame-wise inference runs over long windows of independent frames: fewer, larger batches.
FRAMEWISE_INFER_WINDOW = 256
# The trunk fields that have command-line options of their own (every other field: --trunk-opt key=value).
COMMON_TRUNK_OPTIONS = ("hidden", "layers", "bidirectional", "dropout")


@dataclass
class TrainConfig:
    """Everything a stage-two run depends on; saved in config.json, so a run can be redone from it."""

    task: str = "va"  # a registered task (abawfeat.tasks): va | expr | au | mtl (one head, three tasks)
    head: str = "fc"  # a registered trunk (abawfeat.trunks): fc | lstm | gru | ...; the objective picks
    # the head kind around it (per-task outputs, or the contrastive projection)
    backbone: str = ""  # encoder whose cache is read: "" = the cache's own; given, it must match the cache
    data: str = ""  # Aff-Wild2 root (annotations, test lists, sample files); its folder name names the cache
    # Feature caches; several are fused (aligned by frame number). () = abawfeat.cache.default_cache_path(
    # dataset name, backbone), where extract writes.
    cache: tuple[str, ...] = ()
    fusion: str = "early"  # several caches: early (standardised features concatenated, with availability
    # columns), late (one trunk per cache, outputs combined by learned gates) or attention (each cache's
    # sequence attends to the others', masked where they lack the frame, then one trunk)
    # Several caches: the probability that a training window loses a whole cache (its availability column
    # set to 0 over the window; never every cache of the window): robustness to a missing modality.
    modality_dropout: float = 0.0
    out: str = ""  # run directory
    objective: str = ""  # "" = the task's default (ccc, ce, bce, mtl); "contrastive" for expr on CLIP caches
    class_weights: str = "none"  # CE weighting (EXPR is skewed): none | inverse | sqrt_inverse | effective
    pos_weight: bool = False  # AU BCE: weight positives by negatives/positives per AU (rare AUs)
    focal_gamma: float = 2.0  # --objective focal: (1 - p)^gamma focusing (Lin et al.'s default; 0 = CE/BCE)
    logit_tau: float = 1.0  # --objective logit-adjusted: logits + tau log(prior) (Menon et al.'s 1)
    moe_experts: int = 0  # > 1: a mixture-of-experts output per task (a learned gate over K experts)
    moe_balance: float = 0.01  # weight of the experts' load-balance term in the loss (Switch's 0.01)
    epochs: int = 10  # passes over the training windows; the best validation epoch is kept
    seed: int = 0  # seeds weights, dropout and window order: same seed, same numbers on CPU
    lr: float = 1e-3  # AdamW learning rate (constant)
    weight_decay: float = 1e-4  # AdamW weight decay
    batch_size: int = 0  # windows per batch (frames for frame-wise trunks); 0 = DEFAULT_BATCH
    window: int = 64  # training window of temporal trunks in frames (crops); frame-wise trunks ignore it
    stride: int = 0  # step between training windows; 0 = window (no overlap)
    infer_stride: int = 0  # step between inference windows (outputs of overlaps averaged); 0 = window // 2
    hidden: int = -1  # trunk width; -1 = the trunk's default (fc: 0 = linear; recurrent: 256)
    layers: int = 1  # trunk depth, for trunks that have layers
    bidirectional: bool = False  # temporal trunks also use future frames (not causal)
    dropout: float = 0.0  # on trunk inputs and hidden states
    trunk_opts: dict[str, Any] = field(default_factory=dict)  # any other trunk option (--trunk-opt k=v)
    device: str = "auto"  # auto | cpu | cuda[:N]
    # Torch's CPU threads: configuration, like the seed. The order of float sums depends on the count, and
    # on data of demo size a different order can move a run to other numbers (docs/training.md, "Threads"),
    # so the count is never derived from the machine's cores or load: 1 by default on every device (a
    # head's small products gain little from more, docs/performance.md).
    # 0 = this process's setting (OMP_NUM_THREADS or the cores): faster for temporal trunks on many cores,
    # but machine-dependent; the count used is recorded in config.json either way (resolved, environment).
    threads: int = 1
    precision: str = "auto"  # auto (bf16 for temporal trunks and the contrastive head where the device has
    # bf16 kernels, else fp32) | fp32 | bf16 | fp16 (CUDA)
    # torch.compile the trunk's training forward and backward (inductor): elementwise chains fused, so
    # trunks made of many small operations (mamba) train faster once compiled. The first run of a shape pays
    # the compiling (inductor's on-disk cache serves later runs); validation stays eager. Not bit-identical
    # to eager training, hence part of the configuration.
    compile: bool = False
    grad_clip: float = 1.0  # max gradient norm (recurrent trunks on long windows can spike); 0 = off
    fill: str = "interpolate"  # how frames without a crop get outputs: interpolate | nearest | previous
    smooth: str = "none"  # none | auto: a temporal filter per output, tuned after training (smoothing.py)
    # Where AU thresholds and smoothing are tuned: val (the scored split: optimistic, the paper's F1_AUopt)
    # or holdout (a share of the training videos, taken out of training: an honest validation score).
    tune_on: str = "val"
    holdout: float = 0.15  # --tune-on holdout: the share of training videos (whole videos) held out
    # Cross-validation (abawfeat cv): this run is fold `fold` of `folds` over train+val (splits.cv_folds):
    # it trains on the other folds' videos and validates on its own. 0 = the release's train / val.
    folds: int = 0
    fold: int = 0
    plots: bool = True  # write plots/*.png at the end (matplotlib, seconds); a run is complete without them

    def __post_init__(self) -> None:
        # Run records written when a run had one cache hold it as a string.
        if isinstance(self.cache, str):
            self.cache = (self.cache,) if self.cache else ()
        self.cache = tuple(str(c) for c in self.cache)


def objective_name(cfg: TrainConfig) -> str:
    """The objective a config trains with: its own, or its task's default."""
    return cfg.objective or task(cfg.task).default_objective


def validate_config(cfg: TrainConfig) -> None:
    """Refuse impossible combinations with one line naming the option."""
    from abawfeat.train.objectives import OBJECTIVES

    if cfg.task not in run_task_names():
        raise ConfigError(f"--task {cfg.task!r}: choose one of {', '.join(run_task_names())}")
    if cfg.head not in TRUNKS:
        raise ConfigError(f"--head {cfg.head!r}: choose one of {', '.join(TRUNKS.names())}")
    name = objective_name(cfg)
    if name not in OBJECTIVES:
        raise ConfigError(f"--objective {name!r}: choose one of {', '.join(OBJECTIVES.names())}")
    objective = OBJECTIVES.get(name)
    if not objective.trains(cfg.task):
        trained = ", ".join(t for t in run_task_names() if objective.trains(t))
        raise ConfigError(f"--objective {name} trains task(s) {trained}, not {cfg.task}")
    if cfg.class_weights not in CLASS_WEIGHT_CHOICES:
        raise ConfigError(
            f"--class-weights {cfg.class_weights!r}: choose one of {', '.join(CLASS_WEIGHT_CHOICES)}"
        )
    # A multi-task run's tasks each train with their own objective: checked per task below.
    single_task = len(task_names(cfg.task)) == 1
    if cfg.class_weights != "none" and not objective.class_weights and single_task:
        raise ConfigError(f"--class-weights applies to the {_with('class_weights')} objectives, not {name}")
    if cfg.pos_weight and not objective.pos_weight and single_task:
        raise ConfigError(f"--pos-weight applies to the {_with('pos_weight')} objectives, not {name}")
    _check_objective_settings(cfg, name)
    for key in ("epochs", "window"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("batch_size", "stride", "infer_stride", "layers", "threads"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.lr <= 0:
        raise ConfigError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.precision not in PRECISION_CHOICES:
        raise ConfigError(f"--precision {cfg.precision!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    if cfg.fill not in FILL_CHOICES:
        raise ConfigError(f"fill {cfg.fill!r}: choose one of {', '.join(FILL_CHOICES)}")
    clash = sorted(set(cfg.trunk_opts) & set(COMMON_TRUNK_OPTIONS))
    if clash:
        raise ConfigError(f"--trunk-opt {clash[0]}: use --{clash[0]} instead")
    make_trunk_config(cfg.head, trunk_options(cfg), where="--trunk-opt")
    if cfg.smooth not in ("none", "auto"):
        raise ConfigError(f"--smooth {cfg.smooth!r}: choose none or auto")
    if cfg.tune_on not in ("val", "holdout"):
        raise ConfigError(f"--tune-on {cfg.tune_on!r}: choose val or holdout")
    if not 0.0 < cfg.holdout < 1.0:
        raise ConfigError(f"--holdout must be a fraction in (0, 1), got {cfg.holdout}")
    if cfg.folds and not (cfg.folds >= 2 and 0 <= cfg.fold < cfg.folds):
        raise ConfigError(f"fold {cfg.fold} of --folds {cfg.folds}: need folds >= 2 and 0 <= fold < folds")
    if cfg.fusion not in FUSIONS:
        raise ConfigError(f"--fusion {cfg.fusion!r}: choose one of {', '.join(FUSIONS)}")
    if not 0.0 <= cfg.modality_dropout < 1.0:
        raise ConfigError(f"--modality-dropout must be in [0, 1), got {cfg.modality_dropout}")
    if cfg.modality_dropout and len(cfg.cache) < 2:
        raise ConfigError("--modality-dropout drops whole caches of a fused run: give several --cache")
    if cfg.moe_experts < 0 or cfg.moe_experts == 1:
        raise ConfigError(f"--moe-experts must be 0 (off) or >= 2, got {cfg.moe_experts}")
    if cfg.moe_balance < 0:
        raise ConfigError(f"--moe-balance must be >= 0, got {cfg.moe_balance}")
    if cfg.moe_experts and objective.head != "tasks":
        raise ConfigError(f"--moe-experts mixes per-task outputs; the {name} objective has its own head")
    if len(cfg.cache) > 1 and cfg.backbone:
        raise ConfigError("--backbone names one cache; with several --cache the encoders come from the "
                          "caches")
    if len(set(cfg.cache)) != len(cfg.cache):
        raise ConfigError("--cache: the same cache is given twice")
    if not cfg.data:
        raise ConfigError("--data is required: the Aff-Wild2 root with the annotations")
    if not cfg.out:
        raise ConfigError("--out is required: the run directory to write")


_SETTING_DEFAULTS = {"focal_gamma": 2.0, "logit_tau": 1.0}


def _check_objective_settings(cfg: TrainConfig, name: str) -> None:
    """Class / positive weights only where a trained task has classes / binary outputs; an imbalance
    loss's setting only with that loss."""
    from abawfeat.train.objectives import OBJECTIVES, is_classes, is_multi_label

    per_task = OBJECTIVES.get(name).per_task(task_names(cfg.task))
    specs = {t: OBJECTIVES.get(o) for t, o in per_task.items()}
    if cfg.class_weights != "none" and not any(s.class_weights and is_classes(t) for t, s in specs.items()):
        raise ConfigError(f"--class-weights weights the classes of a single-label task (expr); "
                          f"{name} on {cfg.task} has none")
    if cfg.pos_weight and not any(s.pos_weight and is_multi_label(t) for t, s in specs.items()):
        raise ConfigError(f"--pos-weight weights the positives of a multi-label task (au); {name} on "
                          f"{cfg.task} has none")
    used = {k for s in specs.values() for k in s.settings}
    for key, default in _SETTING_DEFAULTS.items():
        value = getattr(cfg, key)
        if value < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {value}")
        if value != default and key not in used:
            owner = " or ".join(n for n, o in OBJECTIVES.items() if key in o.settings)
            raise ConfigError(f"--{key.replace('_', '-')} applies to --objective {owner}, not {name}")


def _with(flag: str) -> str:
    from abawfeat.train.objectives import OBJECTIVES

    return " and ".join(n for n, o in OBJECTIVES.items() if getattr(o, flag))


def trunk_options(cfg: TrainConfig, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trunk's config fields a TrainConfig sets: the common options the trunk has (``hidden`` only when
    given), over the head kind's ``defaults``, plus ``trunk_opts``."""
    fields = trunk_fields(cfg.head)
    out = {k: v for k, v in (defaults or {}).items() if k in fields}
    common = {"layers": max(cfg.layers, 1), "bidirectional": cfg.bidirectional, "dropout": cfg.dropout}
    if cfg.hidden >= 0:
        common["hidden"] = cfg.hidden
    out.update({k: v for k, v in common.items() if k in fields})
    out.update(cfg.trunk_opts)
    return out


def trunk_context(cfg: TrainConfig) -> Context:
    """The temporal context of the trunk a config asks for (without building its head)."""
    return build_trunk(cfg.head, 8, trunk_options(cfg)).context()


def build_head_for(cfg: TrainConfig, in_dim: int, text_dim: int | None = None,
                   groups: tuple[int, ...] = ()) -> Head:
    """The head a TrainConfig asks for: the objective's head kind on the ``--head`` trunk.

    ``text_dim``: the prompt embeddings' size, which the contrastive projection must produce. ``groups``:
    the fused caches' feature sizes (``SequenceSet.groups``)."""
    from abawfeat.train.objectives import OBJECTIVES

    objective = OBJECTIVES.get(objective_name(cfg))
    tasks = task_names(cfg.task)
    defaults = objective.trunk_defaults.get(cfg.head, {})
    fields: dict[str, Any] = {"in_dim": in_dim, "trunk": cfg.head,
                              "trunk_config": trunk_options(cfg, defaults), "groups": tuple(groups),
                              "fusion": cfg.fusion}
    kind = objective.head
    if objective.head == "tasks":
        fields["tasks"] = tasks
        if cfg.moe_experts:
            kind = "moe"
            fields.update(experts=cfg.moe_experts, balance_weight=cfg.moe_balance)
    if text_dim is not None:
        fields["embed_dim"] = text_dim
    return build_head(kind, **fields)


@dataclass
class Resolved:
    """Choices derived from a TrainConfig and the data; saved in config.json next to the config."""

    objective: str
    head_name: str
    temporal: bool
    window: int
    stride: int
    infer_window: int
    infer_stride: int
    batch_size: int
    infer_batch_size: int
    precision: str
    device: str
    context: dict[str, Any] = field(default_factory=dict)  # the trunk's declared context (Context.as_dict)
    threads: int = 0  # torch's CPU threads the run used (TrainConfig.threads, or the process's for 0)


def resolve(cfg: TrainConfig, head: Head, device: Any) -> Resolved:
    import torch

    from abawfeat.utils.device import bf16_native

    context = head.context()
    temporal = context.temporal
    # Frame-wise trunks need no context: windows of one frame, shuffled frame by frame.
    window = cfg.window if temporal else 1
    stride = (cfg.stride or window) if temporal else 1
    infer_window = window if temporal else FRAMEWISE_INFER_WINDOW
    infer_stride = (cfg.infer_stride or max(window // 2, 1)) if temporal else infer_window
    # auto: bf16 where large matmuls dominate (temporal trunks, the contrastive 512-512 projection) and the
    # device computes bf16 natively: about half the time on CPUs with AVX-512 BF16 (docs/performance.md).
    # Frame-wise heads are cheap in fp32, and so is everything on a CPU that would only emulate bf16.
    native = bf16_native(torch.device(str(device)))
    heavy = (temporal or head.name == "contrastive") and native
    precision = ("bf16" if heavy else "fp32") if cfg.precision == "auto" else cfg.precision
    if precision == "bf16" and TRUNKS.get(cfg.head).bf16_needs_native and not native:
        raise ConfigError(
            f"--precision bf16 with --head {cfg.head}: this CPU has no bf16 kernels (AVX-512 BF16 or AMX), "
            "which that trunk needs in bf16; use --precision auto or fp32"
        )
    batch = cfg.batch_size or DEFAULT_BATCH[temporal]
    # Inference batches of about 8k frames at least: a temporal batch counts windows, a frame-wise one
    # frames (its inference windows are FRAMEWISE_INFER_WINDOW frames long). Each batch makes float32
    # copies of its rows, so counting a frame-wise batch in windows would hold 256x its rows at once.
    infer_batch = max(batch, 8192 // infer_window) if temporal else max(batch, 8192) // infer_window
    return Resolved(
        objective=objective_name(cfg), head_name=head.name, temporal=temporal, window=window,
        stride=stride, infer_window=infer_window, infer_stride=min(infer_stride, infer_window),
        batch_size=batch, infer_batch_size=infer_batch, precision=precision, device=str(device),
        context=context.as_dict(), threads=_threads_in_use(),
    )


def _threads_in_use() -> int:
    import torch

    return int(torch.get_num_threads())


def dataset_name(data_root: str | Path) -> str:
    """The data root's folder name, as ``AffWild2.name`` spells it (abspath: a symlink keeps its name)."""
    return Path(os.path.abspath(data_root)).name


def default_cache(data_root: str | Path, backbone: str) -> Path:
    """Where ``abawfeat extract`` writes the cache of ``backbone`` for this data root by default."""
    from abawfeat.cache import default_cache_path

    return default_cache_path(dataset_name(data_root), backbone)


DEFAULT_BACKBONE = "ddamfn"  # whose cache a run reads when it names neither a cache nor a backbone


def cache_paths(cfg: TrainConfig) -> list[Path]:
    """The caches a config reads: its own, or extract's default for its backbone."""
    if cfg.cache:
        return [Path(c) for c in cfg.cache]
    return [default_cache(cfg.data, cfg.backbone or DEFAULT_BACKBONE)]


__all__ = ["CLASS_WEIGHT_CHOICES", "DEFAULT_BATCH", "Resolved", "TrainConfig", "build_head_for",
           "dataset_name", "default_cache", "objective_name", "resolve", "trunk_context", "trunk_options",
           "validate_config"]

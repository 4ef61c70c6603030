"""End-to-end fine-tuning (``abawfeat finetune``): an encoder and a stage-two head trained from frames.

Stage two trains a head on cached features; this trains the backbone with it, from the crops. Any encoder
that declares trainable blocks (``Encoder.blocks``: DDAMFN, CLIP's image tower, ...) can be fine-tuned;
this module knows encoders only through that contract (blocks, ``forward_train`` and its auxiliary outputs,
``save_weights``, ``needs_calibration``), never by name.

Everything that is not about pixels is stage two's, reused unchanged from ``abawfeat.train``: the
``TrainConfig`` (task, head, objective, class / positive weights, seed, fill), the head built by
``build_head_for``, the objectives of ``build_objective``, the ``SequenceSet`` split and its windows (here
with crops as rows, see ``abawfeat.data.frames``), and the whole evaluation: ``evaluate_set`` ->
``infer_rows`` -> ``fill_timeline`` -> ``score_timeline``, run on the fine-tuned backbone's embeddings of
every validation crop. So metrics, val_outputs.npz, history.csv and checkpoint.pt mean exactly what they
mean for a head.

A run reads top to bottom (``run_finetune``): the encoder (published weights or random init, blocks before
``unfreeze_from`` frozen), data, head, optimiser with two learning rates, the loop, evaluation after every
epoch, a full training state after every epoch (``train_state.pt``: resume reaches the same weights as an
uninterrupted run), the best epoch's head (``checkpoint.pt``) and backbone, saved by the encoder's own hook
(``<encoder>_finetuned.pth``; DDAMFN's in the published format), which ``abawfeat extract --weights`` reads
to build a new cache.

Under torchrun every process takes a contiguous slice of each global batch; per-task losses are weighted by
the task's labelled frames in the whole global batch, so a step on W processes with batch B computes the
loss of one process with batch W x B (up to float summation order; see docs/finetune.md for what is not
exactly equal: batch-norm statistics in train mode and the batch-level CCC loss).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from abawfeat import __version__
from abawfeat.data.batches import Batch, WindowSource
from abawfeat.data.frames import AugmentConfig, FrameSource, FrameWindows, load_frames_split
from abawfeat.data.sequences import make_windows
from abawfeat.encoders.base import ATTENTION_MAPS, ENCODERS, Block, Encoder, encoder_options, make_config
from abawfeat.errors import AbawfeatError, CheckpointError, ConfigError, RunError
from abawfeat.tasks import task, task_names
from abawfeat.train.config import (
    Resolved,
    TrainConfig,
    build_head_for,
    dataset_name,
    objective_name,
    resolve,
    validate_config,
)
from abawfeat.train.inference import Evaluation, evaluate_set
from abawfeat.train.loop import run_epochs
from abawfeat.train.objectives import OBJECTIVES, Objective, build_objective, loss_weights
from abawfeat.train.rundir import (
    METRICS_FILE,
    STATE_FILE,
    RunDir,
    RunRecord,
    architecture_label,
    load_versioned,
    metrics_record,
    open_run_dir,
    save_checkpoint,
    take_writer_lock,
    write_history,
    write_val_outputs,
)
from abawfeat.utils import dist
from abawfeat.utils.configs import from_dict, jsonable, read_json, to_dict
from abawfeat.utils.device import autocast, resolve_device, seed_everything, torch_threads
from abawfeat.utils.io import release_lock, torch_save, write_json

SCHEDULES = ("cosine", "constant")
DEFAULT_BACKBONE = "ddamfn"  # the encoder fine-tuned when a config names none
STATE_FORMAT = "abawfeat-finetune-state"
STATE_VERSION = 1
# Auxiliary model output (not a task): the attention heads' maps, for the attention-diversity loss. Only
# encoders that declare it among their ``auxiliary_outputs`` (DDAMFN) can use that loss.
ATTENTION_KEY = ATTENTION_MAPS
# Images per forward pass at evaluation and for the head's input statistics (no gradients kept).
DEFAULT_EVAL_BATCH = 64
# Training batch when --batch-size is 0: 32 frames for frame-wise heads; for temporal heads as many
# windows as make about 64 frames (batch norm needs more than one video's frames in a batch).
DEFAULT_FRAMES_PER_BATCH = {False: 32, True: 64}


# ------------------------------------------------------------------------------------------------ configs


@dataclass
class FinetuneConfig:
    """Everything an end-to-end run depends on; saved in config.json (``finetune``) so ``--resume`` and
    ``python -m abawfeat.finetune`` rebuild the run without the command line."""

    # Task, head, objective, epochs, seed, head learning rate (``lr``), batch, window, precision, fill...:
    # the stage-two options, meaning what they mean there. ``batch_size`` 0 = see DEFAULT_FRAMES_PER_BATCH.
    # ``train.backbone`` names the encoder (any registered encoder that declares trainable blocks).
    train: TrainConfig = field(default_factory=TrainConfig)
    # Starting weights: a file or one of the encoder's named weights (None = its default, as `extract`).
    weights: str | None = None
    # Seeded random weights, calibrated on dataset frames where the encoder needs it, exactly as
    # `extract --random-init` does (tests, demo).
    random_init: bool = False
    # The encoder's own options (``--encoder-opt key=value``), as for `extract`: e.g. clip_model for CLIP.
    encoder_options: dict[str, Any] = field(default_factory=dict)
    # First trainable block (a name or its index among the encoder's ``blocks()``; None = the first, i.e.
    # the whole encoder). Earlier blocks are frozen and kept in eval mode, so their batch-norm statistics
    # stay those of the starting weights.
    unfreeze_from: str | None = None
    # Also keep the trainable blocks' batch norms in eval mode (affine parameters still learn): small
    # batches estimate statistics badly, and frozen statistics make processes and micro-batches agree.
    freeze_bn: bool = False
    backbone_lr: float = 1e-4  # AdamW lr of the backbone; the head uses train.lr (a new head learns faster)
    schedule: str = "cosine"  # cosine decay to 0 over the run (after warm-up) or constant
    warmup: float = 0.05  # fraction of all steps with a linear warm-up: a fresh head's first gradients
    # would otherwise push the pretrained backbone far from where it was
    grad_accum: int = 1  # micro-batches per optimiser step (global batch = batch x grad_accum x processes)
    # DDAMFN's attention-diversity loss over its attention heads, added with diversity_weight (published
    # training: 0.1 next to cross-entropy); for encoders that declare the ATTENTION_MAPS auxiliary output.
    attention_diversity: bool = False
    diversity_weight: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training only, never at evaluation
    workers: int = 2  # DataLoader processes decoding JPEGs; 0 decodes in the main process
    eval_batch_size: int = DEFAULT_EVAL_BATCH  # images per forward pass at evaluation
    calibration_frames: int = 256  # random_init: frames for batch-norm calibration (as `extract`)
    stats_frames: int = 2048  # training crops whose initial embeddings standardise the head's input
    channels_last: bool = True  # NHWC convolutions: faster on CPU (oneDNN) and tensor-core GPUs
    sync_bn: bool = True  # CUDA + torchrun + train-mode BN: SyncBatchNorm (no CPU support in PyTorch)
    # Write the backbone (``Encoder.save_weights``, <encoder>_finetuned.pth) at every best epoch.
    save_published: bool = True


def validate_finetune(cfg: FinetuneConfig) -> None:
    """Refuse impossible combinations with one line naming the option (the blocks are checked against the
    encoder once it is built, see ``block_index``)."""
    validate_config(cfg.train)
    encoder_cls = ENCODERS.get(cfg.train.backbone)
    if objective_name(cfg.train) == "contrastive":
        raise ConfigError("fine-tuning does not support --objective contrastive (it needs a cache's prompt "
                          "embeddings)")
    if cfg.train.moe_experts:
        # Its multi-task loss is a sum of per-task objectives, each of which would add the balance term.
        raise ConfigError("fine-tuning does not support --moe-experts (a train-head option, on cached "
                          "features)")
    if cfg.weights is not None and cfg.random_init:
        raise ConfigError("--weights and --random-init exclude each other")
    if cfg.attention_diversity and ATTENTION_KEY not in encoder_cls.auxiliary_outputs:
        raise ConfigError(f"--attention-diversity needs an encoder with attention heads; "
                          f"{cfg.train.backbone} has none")
    if cfg.backbone_lr <= 0:
        raise ConfigError(f"--backbone-lr must be > 0, got {cfg.backbone_lr}")
    if cfg.grad_accum < 1:
        raise ConfigError(f"--grad-accum must be >= 1, got {cfg.grad_accum}")
    if cfg.diversity_weight < 0:
        raise ConfigError(f"--diversity-weight must be >= 0, got {cfg.diversity_weight}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"--schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if not 0.0 <= cfg.warmup < 1.0:
        raise ConfigError(f"--warmup is a fraction of the steps in [0, 1), got {cfg.warmup}")
    for name in ("eval_batch_size", "calibration_frames", "stats_frames"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {cfg.workers}")
    cfg.augment.validate()
    # The encoder's own options and the generic ones together, typed and checked as `extract` takes them.
    make_config(cfg.train.backbone, **_encoder_options(cfg))


def block_index(blocks: Sequence[str], spec: str | int | None, encoder: str = "encoder") -> int:
    """Position in ``blocks`` (an encoder's block names, forward order) of a block given by name or index;
    None = 0 (the first block: the whole encoder trains)."""
    if not blocks:
        raise ConfigError(f"--backbone {encoder}: this encoder declares no trainable blocks, so it cannot be "
                          "fine-tuned")
    if spec is None:
        return 0
    text = str(spec).strip()
    if text in blocks:
        return list(blocks).index(text)
    if text.isdigit() and int(text) < len(blocks):
        return int(text)
    raise ConfigError(f"--unfreeze-from {spec!r}: choose a {encoder} block, one of {', '.join(blocks)} "
                      f"(or its index 0..{len(blocks) - 1})")


# ------------------------------------------------------------------------------------------------ model


def _member_of(name: str, members: Sequence[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in members)


def block_parameters(encoder: nn.Module, blocks: Sequence[Block]) -> list[tuple[str, nn.Parameter]]:
    """The encoder's (qualified name, parameter) pairs that belong to any of ``blocks``."""
    members = [m for b in blocks for m in b.members]
    return [(n, p) for n, p in encoder.named_parameters() if _member_of(n, members)]


def block_modules(encoder: nn.Module, blocks: Sequence[Block]) -> list[nn.Module]:
    """The modules a block names (its members that are modules; bare parameters have no mode)."""
    modules = dict(encoder.named_modules())
    return [modules[m] for b in blocks for m in b.members if m in modules]


def _outside_embedding(encoder: Encoder, params: Sequence[tuple[str, nn.Parameter]]) -> list[str]:
    """Those of ``params`` the embedding does not depend on (DDAMFN: modules its published checkpoints carry
    but its forward pass never uses). They get no gradient, so they are frozen (else DistributedDataParallel
    would wait for their gradients forever). Found by a gradient probe, not by a list of names."""
    if not params:
        return []
    size = encoder.input_size
    was_training = encoder.training
    encoder.eval()  # no batch-norm statistics are touched by this probe
    try:
        with torch.enable_grad():
            embedding, _ = encoder.forward_train(torch.zeros(2, 3, size, size))
            grads = torch.autograd.grad(embedding.float().sum(), [p for _, p in params], allow_unused=True)
    finally:
        encoder.train(was_training)
    return [n for (n, _), g in zip(params, grads, strict=True) if g is None]


class FinetuneModel(nn.Module):
    """Encoder + stage-two head: ``forward(images [B, T, 3, S, S], mask [B, T]) -> {task: [B, T, K]}``
    (plus the encoder's auxiliary outputs asked for, e.g. ``attention_maps`` [heads, N, C, H, W]), the same
    contract as a head on features, so stage two's objectives and loops take it as is.

    Trainable: the parameters of the encoder's blocks from ``unfreeze_from`` on that the embedding depends
    on, and the head. Everything else in the encoder is frozen and stays in eval mode."""

    def __init__(self, encoder: Encoder, head: nn.Module, *, unfreeze_from: str | int | None = None,
                 freeze_bn: bool = False, aux_outputs: Sequence[str] = (),
                 channels_last: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.freeze_bn = freeze_bn
        self.aux_outputs = tuple(aux_outputs)
        self.channels_last = channels_last
        blocks = encoder.blocks()
        start = block_index([b.name for b in blocks], unfreeze_from, encoder.name)
        self.trainable_blocks = [b.name for b in blocks[start:]]
        self.frozen_blocks = [b.name for b in blocks[:start]]
        trainable = block_parameters(encoder, blocks[start:])
        self.unused_parameters = _outside_embedding(encoder, trainable)
        keep = {n for n, _ in trainable} - set(self.unused_parameters)
        for name, param in encoder.named_parameters():
            param.requires_grad_(name in keep)
        # Plain lists, not ModuleLists: registering the modules twice would duplicate state-dict keys.
        self._train_modules: list[nn.Module] = block_modules(encoder, blocks[start:])
        if channels_last:
            self.encoder.to(memory_format=torch.channels_last)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> FinetuneModel:
        super().train(mode)
        if mode:
            # Only the trainable blocks train: frozen blocks (and modules in no block) keep their running
            # statistics; so do all batch norms with freeze_bn.
            self.encoder.eval()
            for module in self._train_modules:
                module.train()
            if self.freeze_bn:
                for module in self.encoder.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def embed(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """[N, 3, S, S] -> (embedding [N, D], the auxiliary outputs asked for)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.encoder.forward_train(images, self.aux_outputs)

    def forward(self, images: Tensor, mask: Tensor) -> dict[str, Tensor]:
        b, t = mask.shape
        keep = mask.reshape(-1).bool()
        flat = images.reshape(b * t, *images.shape[2:])
        if bool(keep.all()):
            embedding, aux = self.embed(flat)
            features = embedding.reshape(b, t, -1)
        else:
            # Padding never enters the backbone: in train mode it would skew batch-norm statistics.
            index = torch.nonzero(keep).squeeze(1)
            embedding, aux = self.embed(flat[index])
            features = embedding.new_zeros(b * t, embedding.shape[1]).index_copy(0, index, embedding)
            features = features.reshape(b, t, -1)
        outputs = dict(self.head(features, mask))
        outputs.update(aux)
        return outputs


def unwrap(model: nn.Module) -> FinetuneModel:
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if not isinstance(inner, FinetuneModel):
        raise TypeError(f"expected a FinetuneModel, got {type(inner).__name__}")
    return inner


def _encoder_options(cfg: FinetuneConfig) -> dict[str, Any]:
    """``build_encoder`` options of the starting encoder (random init is seeded with the run's seed)."""
    return encoder_options(cfg.train.backbone, weights=cfg.weights, random_init=cfg.random_init,
                           seed=cfg.train.seed, options=cfg.encoder_options)


# ------------------------------------------------------------------------------------- embeddings of rows


def embed_rows(model: FinetuneModel, windows: FrameWindows, *, batch_size: int, device: torch.device,
               precision: str, workers: int = 0, info: dist.DistInfo | None = None) -> np.ndarray:
    """Embeddings (float32 [W, 512]) of the one-frame windows of ``windows``, in order, without
    augmentation, backbone in eval mode. Under torchrun each process embeds a contiguous share and all of
    them receive the whole array."""
    from torch.utils.data import DataLoader

    from abawfeat.data.frames import check_batch, collate_batch

    info = info or dist.DistInfo()
    n = len(windows)
    share = math.ceil(n / info.world_size) if n else 0
    lo, hi = min(info.rank * share, n), min((info.rank + 1) * share, n)
    keys = [[(i, -1) for i in range(s, min(s + batch_size, hi))] for s in range(lo, hi, batch_size)]
    was_training = model.training
    model.eval()
    dim = int(model.encoder.feature_dim)
    out = torch.zeros(max(share, 0), dim, dtype=torch.float32)
    loader = DataLoader(windows, batch_sampler=keys, num_workers=workers if keys else 0,
                        collate_fn=collate_batch, pin_memory=device.type == "cuda",
                        # Own generator: evaluation must not consume the global RNG (dropout's).
                        generator=torch.Generator().manual_seed(0))
    pos = 0
    try:
        with torch.no_grad():
            for batch in map(check_batch, loader):
                images = batch.inputs.reshape(-1, *batch.inputs.shape[2:]).to(device, non_blocking=True)
                with autocast(device, precision):
                    embedding, _ = model.embed(images)
                out[pos : pos + len(embedding)] = embedding.float().cpu()
                pos += len(embedding)
    finally:
        model.train(was_training)
    if info.enabled:
        import torch.distributed as tdist

        # Same-size pieces (the last share is zero-padded), gathered on every rank, then trimmed.
        mine = out.to(device) if device.type == "cuda" else out  # nccl gathers device tensors only
        pieces = [torch.zeros_like(mine) for _ in range(info.world_size)]
        tdist.all_gather(pieces, mine)
        return torch.cat([p.cpu() for p in pieces])[:n].numpy()
    return out[:n].numpy()


def _spread(n_rows: int, count: int) -> np.ndarray:
    """``count`` row indices at a fixed stride over ``n_rows`` rows (deterministic, covers every video)."""
    count = min(count, n_rows)
    return np.unique(np.floor((np.arange(count) + 0.5) * n_rows / max(count, 1)).astype(np.int64))


# ------------------------------------------------------------------------------------------- one step


@dataclass
class StepLoss:
    """The loss of one micro-batch, weighted so that a step's micro-batches and processes together compute
    the loss of their global batch: each task's term is scaled by (its labelled frames in this micro-batch) /
    (its labelled frames in the global batch) x world size (DistributedDataParallel averages gradients over
    processes, the world size undoes that). With one process and no accumulation this is stage two's loss."""

    objectives: dict[str, Objective]  # one stage-two objective per task (mtl: ccc + ce + bce, weight 1 each)
    tasks: tuple[str, ...]
    diversity_weight: float = 0.0
    world_size: int = 1

    def counts(self, batch: Batch) -> Tensor:
        """float64 [tasks + 1]: labelled frames per task, then real frames (the diversity term's weight)."""
        values = [float(batch.valid[t].sum()) for t in self.tasks] + [float(batch.mask.sum())]
        return torch.tensor(values, dtype=torch.float64)

    def __call__(self, out: Mapping[str, Tensor], batch: Batch, mine: Tensor, total: Tensor) -> Tensor:
        share = torch.where(total > 0, mine / total.clamp(min=1), torch.zeros_like(mine)) * self.world_size
        loss: Tensor | None = None
        for i, name in enumerate(self.tasks):
            term, _ = self.objectives[name](out, batch)
            term = term * float(share[i])
            loss = term if loss is None else loss + term
        if self.diversity_weight:
            from abawfeat.losses import attention_diversity_loss

            term = attention_diversity_loss(out[ATTENTION_KEY]) * (self.diversity_weight * float(share[-1]))
            loss = term if loss is None else loss + term
        assert loss is not None
        return loss


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory", "not enough memory",
                                   "failed to allocate"))


@dataclass
class Stepper:
    """One optimiser step over this process's micro-batches of a global batch: forward, weighted loss,
    backward (gradient sync only on the last micro-batch), unscale (fp16), clip, step, schedule. Returns the
    step's loss summed over this process's micro-batches (the global loss is its mean over processes)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss: StepLoss
    device: torch.device
    precision: str
    grad_clip: float = 0.0
    distributed: bool = False
    steps_done: int = 0

    def __call__(self, model: nn.Module, micro: Sequence[Batch]) -> float:
        counts = [self.loss.counts(b) for b in micro]
        total = torch.stack(counts).sum(dim=0)
        if self.distributed:
            import torch.distributed as tdist

            total = total.to(self.device)
            tdist.all_reduce(total)
            total = total.cpu()
        self.optimizer.zero_grad(set_to_none=True)
        value = 0.0
        for i, batch in enumerate(micro):
            b = batch.to(self.device)
            last = i == len(micro) - 1
            # DDP's no_sync: accumulate locally, all-reduce once with the last micro-batch's backward.
            sync = model.no_sync() if (self.distributed and not last) else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.precision):
                    out = model(b.inputs, b.mask)
                    loss = self.loss(out, b, counts[i], total)
                self.scaler.scale(loss).backward()
            value += float(loss.detach())
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.steps_done += 1
        return value


def lr_lambda(total_steps: int, warmup: float, schedule: str) -> Callable[[int], float]:
    """Multiplier of the base learning rates at optimiser step ``step`` (0-based)."""
    warm = int(round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = (step - warm) / max(total_steps - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


# ------------------------------------------------------------------------------------- training state


def _rng_state() -> dict[str, Any]:
    """Every global RNG (dropout draws from torch's), in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, nothing to resume (no epoch of this run finished)")
    return load_versioned(path, STATE_FORMAT, (STATE_VERSION,), "training state", "fine-tuning state")


# ------------------------------------------------------------------------------------------ run directory


def expected_fingerprint(cfg: FinetuneConfig, saved: Path, precision: str) -> dict[str, Any]:
    """The fingerprint of the cache ``abawfeat extract --backbone B --weights <saved> [--encoder-opt ...]``
    writes (the run's encoder and options, the saved weights): what checkpoint.pt records, so ``evaluate`` /
    ``predict`` accept that cache for this run's head and refuse every other. Building the encoder from the
    file here also proves that the encoder's ``save_weights`` round trip works."""
    from abawfeat.cache import fingerprint_of, make_provenance
    from abawfeat.encoders import build_encoder

    name = cfg.train.backbone
    encoder = build_encoder(name, **encoder_options(name, weights=str(saved.resolve()),
                                                    options=cfg.encoder_options))
    provenance = make_provenance(encoder.provenance(), feature_dim=encoder.feature_dim, dtype="float16",
                                 precision=precision, logit_names=encoder.logit_names)
    return fingerprint_of(provenance)


def load_finetune_config(run_dir: str | Path) -> FinetuneConfig:
    """The FinetuneConfig of a run directory (config.json, key ``finetune``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {run_dir} is not a run directory")
    record = RunRecord.read(run_dir)
    info = {"kind": record.kind, "finetune": record.extra.get("finetune")}
    if info.get("kind") != "finetune" or not isinstance(info.get("finetune"), dict):
        raise CheckpointError(f"{path}: not a fine-tuning run; --resume continues those only")
    cfg = from_dict(FinetuneConfig, info["finetune"])
    if info["finetune"].get("trust_pickle"):  # runs written before encoder options were generic
        cfg.encoder_options = {**cfg.encoder_options, "trust_pickle": True}
    cfg.train.out = str(run_dir)
    return cfg


# ---------------------------------------------------------------------------------------------------- run


def _resolved(cfg: FinetuneConfig, head: nn.Module, device: torch.device) -> Resolved:
    """Stage two's resolution (window, stride, inference windows over embeddings, precision), with the
    training batch counted in images rather than cached rows."""
    res = resolve(cfg.train, head, device)
    if not cfg.train.batch_size:
        frames = DEFAULT_FRAMES_PER_BATCH[res.temporal]
        res = dataclasses.replace(res, batch_size=max(1, frames // res.window))
    return res


def _task_objectives(cfg: FinetuneConfig, head: nn.Module, tasks: Sequence[str],
                     weights: Any) -> dict[str, Objective]:
    if cfg.train.task == "mtl":
        # mtl: the sum of its member tasks' objectives (their defaults, or the imbalance loss for the tasks
        # it trains), kept apart so each is weighted by its counts.
        per_task = OBJECTIVES.get(objective_name(cfg.train)).per_task(tasks)
        return {t: build_objective(per_task[t], head, (t,), weights) for t in tasks}
    return {cfg.train.task: build_objective(objective_name(cfg.train), head, tasks, weights)}


def run_finetune(cfg: FinetuneConfig, *, resume: bool = False, overwrite: bool = False,
                 stop_after_epochs: int | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Train an encoder + head end to end and write the run directory ``cfg.train.out``; returns it.

    ``resume``: continue the run in ``cfg.train.out`` from its last finished epoch (``train_state.pt``).
    ``overwrite``: replace a run there, once the new one is complete (as ``train-head --overwrite``).
    ``stop_after_epochs``: stop after that many epochs of this invocation (a job with a time limit), to be
    continued with ``resume``. Works under torchrun (one process per device).
    """
    if not cfg.train.backbone:  # stage two's "take it from the cache" has no cache here: the default encoder
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, backbone=DEFAULT_BACKBONE))
    validate_finetune(cfg)
    if stop_after_epochs is not None and stop_after_epochs < 1:
        raise ConfigError(f"stop_after_epochs must be >= 1, got {stop_after_epochs}")
    if stop_after_epochs is not None and overwrite:
        # The replacement is built beside the old run; stopped early, it could not be resumed by its name.
        raise ConfigError("stop_after_epochs cannot be combined with overwrite; train into another --out")
    info = dist.dist_info()
    distributed = dist.init_process_group(info)
    try:
        with torch_threads(cfg.train.threads):
            return _FinetuneRun(cfg, info, distributed, log).run(resume, overwrite, stop_after_epochs)
    finally:
        if distributed:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


class _FinetuneRun:
    """One end-to-end run. ``run`` reads in the order the run goes: the run directory, the model and data,
    the optimisation, an interrupted run's state, the run record, the loop, the completion mark."""

    def __init__(self, cfg: FinetuneConfig, info: dist.DistInfo, distributed: bool,
                 log: Callable[[str], None] | None) -> None:
        self.cfg, self.tcfg = cfg, cfg.train
        self.info, self.distributed, self.log = info, distributed, log
        self.tasks = task_names(cfg.train.task)
        self.select = task(cfg.train.task).select_metric
        self.device = resolve_device(cfg.train.device)
        self.best_record: dict[str, Any] = {}
        self.lock: int | None = None  # the run directory's writer lock (rank 0)

    def say(self, message: str) -> None:
        if self.log is not None and self.info.is_main:
            self.log(message)

    def run(self, resume: bool, overwrite: bool, stop_after_epochs: int | None) -> Path:
        try:
            return self._run(resume, overwrite, stop_after_epochs)
        finally:
            if self.lock is not None:
                release_lock(self.lock)
                self.lock = None

    def _run(self, resume: bool, overwrite: bool, stop_after_epochs: int | None) -> Path:
        run = self.open_run(resume, overwrite)
        self.out = run.path
        try:
            state = load_state(run.path) if resume else None
            self.build(state)
            self.optimisation()
            start_epoch, history, best = self.restore(state)
            self.parallel()
            if self.info.is_main:
                self.write_record()
            history = self.train(start_epoch, history, best, stop_after_epochs)
            return self.finish(run, history)
        except BaseException:
            if self.info.is_main:
                run.abandon()  # a replacement that failed is removed; the run it would replace is kept
            raise

    # -- the run directory: rank 0 decides (never destroying a complete run), every rank follows.
    def open_run(self, resume: bool, overwrite: bool) -> RunDir:
        out = Path(self.tcfg.out)
        run: RunDir | None = None
        error: AbawfeatError | None = None
        if self.info.is_main:
            try:
                # Rank 0 holds the run's single-writer lock until the process ends (released by the kernel).
                self.lock = take_writer_lock(out)
                run = open_run_dir(out, overwrite=overwrite, resume=resume)
            except AbawfeatError as exc:
                error = exc
        # Every rank learns rank 0's decision: where the run writes, or the line that refused it.
        mine = ("refused", str(error)) if error is not None else ("path", str(run.path)) if run else None
        kind, value = _gather_objects(mine, self.info)[0]
        if error is not None:
            raise error
        if kind == "refused":
            raise RunError(value)
        return run or RunDir(target=out, path=Path(value), resume=resume)

    # -- the encoder first (published weights, or seeded random init): its blocks decide whether
    # --unfreeze-from makes sense, which is said before any data is read. Then the data (stage two's split
    # with crops as rows, windows exactly as stage two makes them), the model, the head's input statistics.
    def build(self, state: Mapping[str, Any] | None) -> None:
        from abawfeat.encoders import build_encoder
        from abawfeat.extract import calibrate_encoder, open_dataset
        from abawfeat.utils.progress import loud_warning

        cfg, tcfg = self.cfg, self.tcfg
        if cfg.random_init and self.info.is_main:
            loud_warning(f"--random-init: {tcfg.backbone} starts from RANDOM weights (seed {tcfg.seed}), "
                         "calibrated on dataset frames where it needs it; use it for demos and tests only.")
        encoder = build_encoder(tcfg.backbone, **_encoder_options(cfg))
        block_index([b.name for b in encoder.blocks()], cfg.unfreeze_from, tcfg.backbone)
        self.weights_file = encoder.weights_filename()

        data = open_dataset(tcfg.data)
        self.train_set, train_dirs = load_frames_split(data, self.tasks, "train")
        self.val_set, val_dirs = load_frames_split(data, self.tasks, "val")
        self.say(f"train: {len(self.train_set.videos)} videos, {self.train_set.n_rows:,} crops; "
                 f"val: {len(self.val_set.videos)} videos, {self.val_set.n_timeline:,} frames")

        seed_everything(tcfg.seed)
        calibration = None
        if cfg.random_init and encoder.needs_calibration and state is None:
            calibration = calibrate_encoder(encoder, data, data.videos_with_crops(), cfg.calibration_frames)
        self.start_provenance = dict(encoder.provenance())
        if calibration is not None:
            self.start_provenance["calibration"] = {"encoder": self.start_provenance.get("calibration"),
                                                    "frames": calibration}
        self.head = build_head_for(tcfg, int(encoder.feature_dim))
        aux = (ATTENTION_KEY,) if cfg.attention_diversity else ()
        self.model = FinetuneModel(encoder, self.head, unfreeze_from=cfg.unfreeze_from,
                                   freeze_bn=cfg.freeze_bn, aux_outputs=aux,
                                   channels_last=cfg.channels_last).to(self.device)
        self.res = _resolved(cfg, self.head, self.device)
        self.transform = encoder.transform
        if self.head.config.normalize and state is None:
            # Stage two standardises with the training features' statistics; here those of the starting
            # backbone on a fixed spread of training crops (all of them would cost an epoch of inference).
            picks = _spread(self.train_set.n_rows, cfg.stats_frames)
            subset = FrameWindows(self.train_set, train_dirs, picks[:, None], (), self.transform)
            emb = embed_rows(self.model, subset, batch_size=cfg.eval_batch_size, device=self.device,
                             precision="fp32", workers=0, info=self.info)
            self.head.set_feature_stats(torch.from_numpy(emb.mean(axis=0)), torch.from_numpy(emb.std(axis=0)))

        windows = make_windows(self.train_set.row_offsets, self.res.window, self.res.stride,
                               keep=self.train_set.row_weight())
        if len(windows) == 0:
            raise ConfigError(f"{tcfg.data}: no training crop carries a {'/'.join(self.tasks)} label")
        self.source = FrameSource(
            FrameWindows(self.train_set, train_dirs, windows, self.tasks, self.transform, cfg.augment),
            batch_size=self.res.batch_size, grad_accum=cfg.grad_accum, seed=tcfg.seed,
            world_size=self.info.world_size, rank=self.info.rank, workers=cfg.workers,
            pin_memory=self.device.type == "cuda",
        )
        self.val_rows = FrameWindows(self.val_set, val_dirs, np.arange(self.val_set.n_rows)[:, None], (),
                                     self.transform)

    # -- stage two's objectives, an optimiser with two learning rates, the schedule, the fp16 scaler.
    def optimisation(self) -> None:
        cfg, tcfg = self.cfg, self.tcfg
        self.weights = loss_weights(objective_name(tcfg), tcfg.class_weights, tcfg.pos_weight, self.train_set,
                                    self.tasks, tcfg.focal_gamma, tcfg.logit_tau).to(self.device)
        self.objective = build_objective(objective_name(tcfg), self.head, self.tasks, self.weights)
        step_loss = StepLoss(_task_objectives(cfg, self.head, self.tasks, self.weights), self.tasks,
                             cfg.diversity_weight if cfg.attention_diversity else 0.0, self.info.world_size)
        self.optimizer = torch.optim.AdamW(
            [{"params": self.model.backbone_parameters(), "lr": cfg.backbone_lr, "name": "backbone"},
             {"params": list(self.head.parameters()), "lr": tcfg.lr, "name": "head"}],
            weight_decay=tcfg.weight_decay,
        )
        total_steps = tcfg.epochs * len(self.source)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, cfg.warmup, cfg.schedule))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.res.precision == "fp16")
        self.stepper = Stepper(self.optimizer, self.scheduler, self.scaler, step_loss, self.device,
                               self.res.precision, tcfg.grad_clip, self.distributed)

    # -- an interrupted run's state: weights, optimiser, schedule, scaler, RNG, history, best so far.
    def restore(self, state: Mapping[str, Any] | None) -> tuple[int, list[dict[str, Any]], float]:
        if state is None:
            return 1, [], -math.inf
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{self.out / STATE_FILE}: weights do not fit this model ({exc})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.stepper.steps_done = int(self.scheduler.last_epoch)
        self.best_record = dict(state["best"])
        self.start_provenance = dict(state.get("start_provenance", self.start_provenance))
        rng = state["rng"]
        if len(rng) == self.info.world_size:
            _set_rng_state(rng[self.info.rank])
        elif self.info.is_main:
            from abawfeat.utils.progress import warn

            warn(f"{self.out}: resumed on {self.info.world_size} process(es) after {len(rng)}; the global "
                 "batch and random streams change, so the result will differ from an uninterrupted run")
        start_epoch = int(state["epoch"]) + 1
        self.say(f"resuming {self.out} after epoch {start_epoch - 1}")
        return start_epoch, list(state["history"]), float(state["best"]["value"])

    def parallel(self) -> None:
        self.ddp_model: nn.Module = self.model
        if not self.distributed:
            return
        from torch.nn.parallel import DistributedDataParallel

        model: nn.Module = self.model
        if self.device.type == "cuda" and self.cfg.sync_bn and not self.cfg.freeze_bn:
            # SyncBatchNorm makes train-mode statistics those of the global batch, as on one device.
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp_model = DistributedDataParallel(model, device_ids=ids)

    # -- the run record first (rank 0); metrics.json, the completion mark, comes last.
    def write_record(self) -> None:
        from abawfeat.heads import head_to_dict

        cfg, tcfg, inner = self.cfg, self.tcfg, unwrap(self.ddp_model)
        self.out.mkdir(parents=True, exist_ok=True)
        record = RunRecord(
            kind="finetune", task=tcfg.task, trunk=tcfg.head, objective=objective_name(tcfg),
            label=architecture_label([tcfg.backbone], tcfg.head, tcfg.task, "finetune"),
            # No cache: the head reads the fine-tuned backbone. `extract --weights <run>/<file>` (the
            # encoder's weights file, with the same --encoder-opt) makes one whose fingerprint checkpoint.pt
            # records.
            caches=[{"path": None, "encoder": tcfg.backbone,
                     "fingerprint": self.best_record.get("fingerprint"), "dtype": None}],
            dataset={"root": str(tcfg.data), "name": dataset_name(tcfg.data)},
            train=to_dict(tcfg), resolved=to_dict(self.res), head=head_to_dict(self.head),
            loss_weights=self.weights.as_json(),
            extra={
                "finetune": to_dict(cfg), "unfreeze_from": inner.trainable_blocks[0],
                "backbone_start": self.start_provenance,
                "blocks": {"trainable": list(inner.trainable_blocks), "frozen": list(inner.frozen_blocks)},
                "world_size": self.info.world_size,
                "global_batch": self.res.batch_size * cfg.grad_accum * self.info.world_size,
                "published_checkpoint": self.weights_file if cfg.save_published else None,
            },
        )
        record.write(self.out, self.device)

    # -- stage two's loop; only the step differs (micro-batches, DDP, scaler, schedule).
    def train(self, start_epoch: int, history: list[dict[str, Any]], best: float,
              stop_after_epochs: int | None) -> list[dict[str, Any]]:
        stop = None if stop_after_epochs is None else start_epoch + stop_after_epochs - 1
        try:
            return run_epochs(
                self.ddp_model, self.source, self.validate, step=self.stepper, epochs=self.tcfg.epochs,
                select=self.select, start_epoch=start_epoch, stop_epoch=stop, history=history, best=best,
                on_best=self.on_best, on_epoch=self.on_epoch, reduce_mean=self.reduce_mean, log=self.say,
            )
        except RuntimeError as exc:
            if not _is_out_of_memory(exc):
                raise
            res = self.res
            raise ConfigError(
                f"out of memory on {self.device} for a micro-batch of {res.batch_size} x {res.window} "
                f"frame(s) ({res.batch_size * res.window} images of {self.transform.size}x"
                f"{self.transform.size}): lower --batch-size, or keep the global batch with --grad-accum"
            ) from None

    def validate(self, m: nn.Module) -> Evaluation:
        inner, res = unwrap(m), self.res
        try:
            emb = embed_rows(inner, self.val_rows, batch_size=self.cfg.eval_batch_size, device=self.device,
                             precision=res.precision, workers=self.cfg.workers, info=self.info)
        except RuntimeError as exc:
            if not _is_out_of_memory(exc):
                raise
            raise ConfigError(f"out of memory on {self.device} embedding {self.cfg.eval_batch_size} "
                              "validation crops at once: lower --eval-batch-size") from None
        # The head is scored exactly as stage two scores a head on a cache holding these features.
        feats = dataclasses.replace(self.val_set, features=emb)
        windows = make_windows(feats.row_offsets, res.infer_window, res.infer_stride)
        val_source = WindowSource(feats, windows, self.tasks, res.infer_batch_size, shuffle=False)
        return evaluate_set(inner.head, feats, self.tcfg.task, val_source, self.device, res.precision,
                            self.objective, fill=self.tcfg.fill)

    def on_best(self, epoch: int, ev: Evaluation) -> None:
        self.best_record.update(value=float(ev.metrics.get(self.select, math.nan)), epoch=epoch,
                                metrics=jsonable(ev.metrics))
        if not self.info.is_main:
            return
        inner, out, published = unwrap(self.ddp_model), self.out, self.cfg.save_published
        fingerprint: dict[str, Any] = {}
        if published:
            saved = inner.encoder.save_weights(out / self.weights_file, step=self.stepper.steps_done)
            fingerprint = expected_fingerprint(self.cfg, saved, self.res.precision)
        self.best_record["fingerprint"] = fingerprint
        save_checkpoint(out / "checkpoint.pt", inner.head, [fingerprint], ev.au_thresholds, epoch,
                        {"metrics": jsonable(ev.metrics), "kind": "finetune",
                         "backbone_weights": self.weights_file if published else None})
        write_val_outputs(out / "val_outputs.npz", self.val_set, ev.timeline)

    def on_epoch(self, epoch: int, rows: list[dict[str, Any]], best: float) -> None:
        rngs = _gather_objects(_rng_state(), self.info)
        if not self.info.is_main:
            return
        write_history(self.out / "history.csv", rows)
        torch_save(self.out / STATE_FILE, {
            "format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch,
            "steps": self.stepper.steps_done,
            "model": {k: v.detach().cpu() for k, v in unwrap(self.ddp_model).state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "rng": rngs,
            "history": rows, "best": dict(self.best_record, value=best), "world_size": self.info.world_size,
            "start_provenance": jsonable(self.start_provenance), "package_version": __version__,
        })

    def reduce_mean(self, value: float) -> float:
        if not self.distributed:
            return value
        import torch.distributed as tdist

        on = self.device if self.device.type == "cuda" else "cpu"
        t = torch.tensor([value], dtype=torch.float64, device=on)
        tdist.all_reduce(t)
        return float(t.item()) / self.info.world_size

    # -- complete only once every epoch ran: the fingerprint into the record, then metrics.json, then the
    # run takes its place (a replaced run goes only now).
    def finish(self, run: RunDir, history: list[dict[str, Any]]) -> Path:
        finished = bool(history) and int(history[-1]["epoch"]) >= self.tcfg.epochs
        if self.info.is_main and finished:
            if not self.best_record.get("metrics"):
                raise ConfigError(f"{run.target}: no epoch produced a finite {self.select} (diverged?); "
                                  "try a lower --lr / --backbone-lr")
            record = RunRecord.read(self.out)
            record.caches[0]["fingerprint"] = self.best_record.get("fingerprint")
            record.write(self.out)
            result = metrics_record(self.tcfg.task, "val", int(self.best_record["epoch"]),
                                    self.best_record["metrics"])
            write_json(self.out / METRICS_FILE, result)  # last: its presence marks a complete run
            run.commit(keep_state=True)  # train_state.pt stays: the final weights, optimiser and RNG
        if self.distributed:
            import torch.distributed as tdist

            tdist.barrier()
        return run.target


def resume_finetune(run_dir: str | Path, *, stop_after_epochs: int | None = None,
                    log: Callable[[str], None] | None = None) -> Path:
    """Continue an interrupted end-to-end run from its last finished epoch (``--resume RUN_DIR``)."""
    return run_finetune(load_finetune_config(run_dir), resume=True, stop_after_epochs=stop_after_epochs,
                        log=log)


def _gather_objects(obj: Any, info: dist.DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    import torch.distributed as tdist

    gathered: list[Any] = [None] * info.world_size
    tdist.all_gather_object(gathered, obj)
    return gathered


# ------------------------------------------------------------------------------------ torchrun entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m abawfeat.finetune CONFIG.json`` (or ``--resume RUN_DIR``): a library entry point that
    torchrun launches without the CLI: ``torchrun --nproc-per-node 2 -m abawfeat.finetune cfg.json``."""
    parser = argparse.ArgumentParser(prog="python -m abawfeat.finetune", description=main.__doc__)
    parser.add_argument("config", nargs="?", help="FinetuneConfig as JSON (utils.configs.to_dict)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    parser.add_argument("--stop-after-epochs", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.resume:
            resume_finetune(args.resume, stop_after_epochs=args.stop_after_epochs, log=print)
        elif args.config:
            cfg = from_dict(FinetuneConfig, read_json(args.config))
            run_finetune(cfg, stop_after_epochs=args.stop_after_epochs, log=print)
        else:
            parser.error("give a config file or --resume RUN_DIR")
    except AbawfeatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


__all__ = [
    "STATE_FILE", "FinetuneConfig", "FinetuneModel", "StepLoss", "Stepper",
    "block_index", "embed_rows", "expected_fingerprint", "load_finetune_config", "resume_finetune",
    "run_finetune", "validate_finetune",
]

if __name__ == "__main__":
    sys.exit(main())

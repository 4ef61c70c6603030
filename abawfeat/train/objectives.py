"""Training objectives: the loss of a batch, masked to the frames labelled for each task.

Each objective is declared once (``ObjectiveSpec``): the tasks it trains, the head kind it needs, whether
class or positive weights apply, and the trunk defaults it implies. The per-task losses (ccc, ce, bce) work
on whichever task they are given, so a new task whose default objective is one of them trains with it.
``mtl`` is the sum of its member tasks' default objectives, each over the frames labelled for its own task,
so a new task joins multi-task training through its default objective alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from abawfeat import losses
from abawfeat.data.batches import Batch
from abawfeat.errors import CacheError, ConfigError
from abawfeat.tasks import single, task, task_names
from abawfeat.utils.registry import Registry

Objective = Callable[[Mapping[str, Tensor], Batch], tuple[Tensor, dict[str, float]]]


@dataclass
class LossWeights:
    """What the losses take from the training frames' labels, per task (absent = unweighted), and the
    imbalance losses' settings (recorded with the run)."""

    class_weight: dict[str, Tensor] = field(default_factory=dict)  # cross-entropy, per class
    pos_weight: dict[str, Tensor] = field(default_factory=dict)  # binary cross-entropy, per output
    log_prior: dict[str, Tensor] = field(default_factory=dict)  # logit adjustment: log class priors
    focal_gamma: float = 2.0  # focal objective: the focusing exponent (0 = plain CE / BCE)
    logit_tau: float = 1.0  # logit-adjusted objective: the scale of the log-prior shift (0 = plain CE)

    def to(self, device: torch.device) -> LossWeights:
        def move(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {t: w.to(device) for t, w in d.items()}

        return LossWeights(move(self.class_weight), move(self.pos_weight), move(self.log_prior),
                           self.focal_gamma, self.logit_tau)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"class_weight": {t: w.cpu().tolist() for t, w in self.class_weight.items()},
                               "pos_weight": {t: w.cpu().tolist() for t, w in self.pos_weight.items()}}
        if self.log_prior:
            out["log_prior"] = {t: w.cpu().tolist() for t, w in self.log_prior.items()}
        return out


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    tasks: tuple[str, ...]  # the --task values it trains (also: every task whose default objective it is)
    description: str
    build: Callable[[nn.Module, tuple[str, ...], LossWeights], Objective]
    head: str = "tasks"  # the head kind it needs (abawfeat.heads.HEADS)
    class_weights: bool = False  # --class-weights applies
    pos_weight: bool = False  # --pos-weight applies
    # Trunk options this objective implies unless the user sets them, per trunk name.
    trunk_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    composite: bool = False  # each task of the run trains with its own default objective
    priors: bool = False  # needs the training class priors (logit adjustment)
    settings: tuple[str, ...] = ()  # TrainConfig fields it reads (others refuse a non-default value)

    def trains(self, run_task: str) -> bool:
        return run_task in self.tasks or task(run_task).default_objective == self.name

    def per_task(self, tasks: Sequence[str]) -> dict[str, str]:
        """The single-task objective each task of a run trains with: a composite objective's members their
        defaults; in a multi-task run of another objective, the tasks it trains take it and the others
        their defaults (``--task mtl --objective focal``: CCC for VA, focal for EXPR and AU)."""
        if self.composite or len(tasks) > 1:
            return {t: self.name if not self.composite and t in self.tasks else single(t).default_objective
                    for t in tasks}
        return {t: self.name for t in tasks}


OBJECTIVES: Registry[ObjectiveSpec] = Registry("objective")


def _one(tasks: tuple[str, ...], name: str) -> str:
    if len(tasks) != 1:
        raise ConfigError(f"objective {name} trains one task at a time, not {', '.join(tasks)}")
    return tasks[0]


def _ccc(head: nn.Module, tasks: tuple[str, ...], w: LossWeights) -> Objective:
    t = _one(tasks, "ccc")

    def loss(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        value = losses.ccc_loss(out[t], b.targets[t], b.valid[t])
        return value, {t: float(value.detach())}

    return loss


def _ce(head: nn.Module, tasks: tuple[str, ...], w: LossWeights) -> Objective:
    t = _one(tasks, "ce")

    def loss(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        value = losses.expr_ce_loss(out[t], b.targets[t], b.valid[t], w.class_weight.get(t))
        return value, {t: float(value.detach())}

    return loss


def _bce(head: nn.Module, tasks: tuple[str, ...], w: LossWeights) -> Objective:
    t = _one(tasks, "bce")

    def loss(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        value = losses.au_bce_loss(out[t], b.targets[t], b.valid[t], w.pos_weight.get(t))
        return value, {t: float(value.detach())}

    return loss


def _focal(head: nn.Module, tasks: tuple[str, ...], w: LossWeights) -> Objective:
    t = _one(tasks, "focal")
    multi_label = single(t).label_shape != ()  # AU: one binary decision per output; EXPR: one class

    def loss(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        if multi_label:
            value = losses.au_focal_loss(out[t], b.targets[t], b.valid[t], w.pos_weight.get(t),
                                         gamma=w.focal_gamma)
        else:
            value = losses.expr_focal_loss(out[t], b.targets[t], b.valid[t], w.class_weight.get(t),
                                           gamma=w.focal_gamma)
        return value, {t: float(value.detach())}

    return loss


def _logit_adjusted(head: nn.Module, tasks: tuple[str, ...], w: LossWeights) -> Objective:
    t = _one(tasks, "logit-adjusted")
    if t not in w.log_prior:
        raise ConfigError(f"objective logit-adjusted on {t}: no class priors (loss_weights computes them "
                          "from the training labels)")

    def loss(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        value = losses.logit_adjusted_ce_loss(out[t], b.targets[t], w.log_prior[t], b.valid[t],
                                              tau=w.logit_tau, class_weight=w.class_weight.get(t))
        return value, {t: float(value.detach())}

    return loss


def _contrastive(head: nn.Module, tasks: tuple[str, ...], w: LossWeights) -> Objective:
    # The prompt embeddings and the learnable temperature live in the head.
    def loss(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        value = losses.clip_contrastive_loss(
            out["expr_embedding"], head.text_emb, b.targets["expr"], head.logit_scale.log_scale,
            b.valid["expr"],
        )
        return value, {"expr": float(value.detach())}

    return loss


def _sum_of_defaults(head: nn.Module, tasks: tuple[str, ...], w: LossWeights) -> Objective:
    return _sum(head, OBJECTIVES.get("mtl").per_task(tasks), w)


def _sum(head: nn.Module, per_task: Mapping[str, str], w: LossWeights) -> Objective:
    """The sum of single-task objectives, each over the frames labelled for its own task."""
    parts = {t: OBJECTIVES.get(name).build(head, (t,), w) for t, name in per_task.items()}

    def loss(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        total: Tensor | None = None
        logged: dict[str, float] = {}
        for part in parts.values():
            value, info = part(out, b)
            logged.update(info)
            total = value if total is None else total + value
        assert total is not None
        return total, logged

    return loss


for _spec in (
    ObjectiveSpec("ccc", ("va",), "1 - mean CCC of valence and arousal over the batch's labelled frames",
                  _ccc),
    ObjectiveSpec("ce", ("expr",), "cross-entropy over the 8 classes (optional class weights)", _ce,
                  class_weights=True),
    ObjectiveSpec("bce", ("au",), "binary cross-entropy per AU (optional positive weights)", _bce,
                  pos_weight=True),
    # Class imbalance (10th ABAW entries): both also train the multi-task head (VA keeps CCC).
    ObjectiveSpec("focal", ("expr", "au", "mtl"), "focal loss: CE (expr) or BCE (au) scaled by (1 - p)^gamma "
                  "(--focal-gamma; optional class / positive weights)", _focal, class_weights=True,
                  pos_weight=True, settings=("focal_gamma",)),
    ObjectiveSpec("logit-adjusted", ("expr", "mtl"), "cross-entropy of logits + tau log(class prior), "
                  "priors from the training crops (--logit-tau; optional class weights)", _logit_adjusted,
                  class_weights=True, priors=True, settings=("logit_tau",)),
    # The paper's CLIP head: FC 512 + ReLU before the projection.
    ObjectiveSpec("contrastive", ("expr",), "symmetric CLIP loss against the cache's prompt embeddings "
                  "(CLIP caches)", _contrastive, head="contrastive", trunk_defaults={"fc": {"hidden": 512}}),
    # A shared layer is the point of multi-task learning: the FC trunk gets one unless told otherwise.
    ObjectiveSpec("mtl", ("mtl",), "sum of the member tasks' default objectives, each over the frames "
                  "labelled for its task", _sum_of_defaults, class_weights=True, pos_weight=True,
                  trunk_defaults={"fc": {"hidden": 256}}, composite=True),
):
    OBJECTIVES.add(_spec.name, _spec)


def build_objective(
    name: str, head: nn.Module, tasks: Sequence[str], weights: LossWeights | None = None
) -> Objective:
    """The loss of a batch for objective ``name`` on ``tasks`` (single task names), plus the head's
    auxiliary terms (a mixture-of-experts head's load balance) at the weights the head declares."""
    spec = OBJECTIVES.get(name)
    w = weights or LossWeights()
    tasks = tuple(tasks)
    trains_multi = any(len(task_names(t)) > 1 for t in spec.tasks)  # e.g. focal: also --task mtl
    if spec.composite or len(tasks) == 1 or not trains_multi:
        base = spec.build(head, tasks, w)  # a single-task objective given several tasks refuses them
    else:
        base = _sum(head, spec.per_task(tasks), w)
    aux = dict(getattr(head, "aux_weights", {}) or {})
    if not aux:
        return base

    def loss(out: Mapping[str, Tensor], b: Batch) -> tuple[Tensor, dict[str, float]]:
        value, info = base(out, b)
        for key, weight in aux.items():
            if key in out:
                term = out[key]
                value = value + weight * term
                info[f"train_{key}"] = float(term.detach())  # averaged per epoch into history.csv
        return value, info

    return loss


def is_classes(t: str) -> bool:
    """Task ``t`` labels one class per frame (what class weights and priors are counted over)."""
    spec = single(t)
    return spec.label_shape == () and np.issubdtype(spec.label_dtype, np.integer)


def is_multi_label(t: str) -> bool:
    """Task ``t`` labels one binary decision per output (what positive weights are counted over)."""
    spec = single(t)
    return spec.label_shape == (spec.width,) and np.issubdtype(spec.label_dtype, np.integer)


def loss_weights(name: str, class_weights: str, pos_weight: bool, train_set: Any,
                 tasks: Sequence[str], focal_gamma: float = 2.0, logit_tau: float = 1.0) -> LossWeights:
    """Class / positive weights and class priors the objective of each task asks for, from the training
    rows' labels."""
    out = LossWeights(focal_gamma=float(focal_gamma), logit_tau=float(logit_tau))
    for t, objective in OBJECTIVES.get(name).per_task(tasks).items():
        spec = OBJECTIVES.get(objective)
        if class_weights != "none" and spec.class_weights and is_classes(t):
            lab, ok = train_set.row_labels(t)
            counts = np.bincount(lab[ok], minlength=single(t).width)
            out.class_weight[t] = losses.class_weights_from_counts(counts, scheme=class_weights)
            names = tuple(getattr(single(t), "columns", ()) or ())
            absent = [str(names[c]) if c < len(names) else str(c) for c in np.flatnonzero(counts == 0)]
            if absent:
                from abawfeat.utils.progress import warn

                warn(f"--class-weights {class_weights}: {t} class(es) {', '.join(absent)} have no training "
                     "frame: they get weight 0 and the head never learns them (their validation frames "
                     "still count in F1)")
        if pos_weight and spec.pos_weight and is_multi_label(t):
            lab, ok = train_set.row_labels(t)
            out.pos_weight[t] = losses.pos_weight_from_labels(lab, ok)
        if spec.priors and is_classes(t):
            lab, ok = train_set.row_labels(t)
            out.log_prior[t] = losses.log_priors_from_counts(np.bincount(lab[ok], minlength=single(t).width))
    return out


def text_embeddings_in_class_order(cache: Any) -> np.ndarray:
    """The cache's prompt embeddings [C, D] in the expression task's class order (the head's outputs).

    extract stores one prompt per class and records the class of each (``prompt_classes`` in the encoder
    provenance); without that record the cache format's rule applies: prompts are in class order.
    """
    classes_wanted = list(single("expr").columns)
    text = cache.text_embeddings()
    if text is None:
        raise CacheError(f"{cache.path}: has no class-prompt text embeddings; --objective contrastive "
                         "needs a CLIP cache (`abawfeat extract --backbone clip`)")
    names, emb = text
    prov = cache.provenance
    classes = (prov.get("encoder_provenance") or {}).get("prompt_classes") or prov.get("prompt_classes")
    classes = list(classes) if classes else classes_wanted
    if len(classes) != len(names) or sorted(classes) != sorted(classes_wanted):
        raise CacheError(f"{cache.path}: {len(names)} text prompts for classes {classes}; the contrastive "
                         f"head needs one prompt per class of {', '.join(classes_wanted)}")
    order = [classes.index(c) for c in classes_wanted]
    return np.asarray(emb, dtype=np.float32)[order]


def describe_objectives() -> list[dict[str, Any]]:
    """Rows for ``abawfeat heads``: objectives, the tasks they train, the tasks they are the default for."""
    from abawfeat.tasks import TASKS

    return [{"name": name, "tasks": [t for t in TASKS.names() if spec.trains(t)],
             "description": spec.description, "head": spec.head,
             "default_for": [t for t in TASKS.names() if task(t).default_objective == name]}
            for name, spec in OBJECTIVES.items()]



__all__ = ["OBJECTIVES", "LossWeights", "Objective", "ObjectiveSpec", "build_objective",
           "describe_objectives", "is_classes", "is_multi_label", "loss_weights",
           "text_embeddings_in_class_order"]

"""Stage two: heads trained on cached features, in small modules that read in the order a run goes.

| module | one job |
|---|---|
| ``config`` | ``TrainConfig`` (what a run depends on), ``Resolved`` (what follows), the head it asks for |
| ``objectives`` | the loss of a batch, per objective (ccc, ce, bce, contrastive, mtl) |
| ``loop`` | ``run_epochs``: THE training loop, shared with fine-tuning |
| ``inference`` | outputs on crops, spread to every frame, scored by the official protocol |
| ``rundir`` | the run record (config.json), the files of a run, creating, resuming, replacing, reading runs |
| ``fit`` | ``fit(config)``: data, model, optimiser, loop, evaluation, files |
| ``evaluate`` | ``infer_run`` / ``evaluate``: a finished run's scores and metrics on a split |

Batches (``Batch``, ``WindowSource``) live in ``abawfeat.data.batches``, below this package.
"""

from abawfeat.data.batches import Batch, BatchSource, WindowSource
from abawfeat.train.config import (
           DEFAULT_BATCH,
           Resolved,
           TrainConfig,
           build_head_for,
           resolve,
           validate_config,
)
from abawfeat.train.evaluate import evaluate, infer_run
from abawfeat.train.fit import FitResult, fit, resume_config, run_is_complete
from abawfeat.train.inference import Evaluation, evaluate_set, fill_timeline, infer_rows, score_timeline
from abawfeat.train.loop import make_step, run_epochs
from abawfeat.train.objectives import OBJECTIVES, build_objective
from abawfeat.train.rundir import LoadedRun, RunRecord, load_run, save_checkpoint

__all__ = ["DEFAULT_BATCH", "OBJECTIVES", "Batch", "BatchSource", "Evaluation", "FitResult", "LoadedRun",
           "Resolved", "RunRecord", "TrainConfig", "WindowSource", "build_head_for", "build_objective",
           "evaluate", "evaluate_set", "fill_timeline", "fit", "infer_rows", "infer_run", "load_run",
           "make_step", "resolve", "resume_config", "run_epochs", "run_is_complete", "save_checkpoint",
           "score_timeline", "validate_config"]

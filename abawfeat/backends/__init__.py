"""Backends: where the units of a grid, a cross-validation or a search train.

Each backend maps ``abawfeat.backends.unit.train_unit`` over a list of ``UnitSpec`` and returns one
``UnitResult`` per spec, in order; none of them owns a run directory's layout, chooses a thread count or keeps
books of its own (the grid's results, report and grid-runs.json come from the caller). One file per backend:

- ``local``: in this process (one job) or in ``--jobs`` spawned worker processes;
- ``submitit``: a Slurm job array (or submitit's local executor), several runs per job, requeued on
  timeout or pre-emption with the runs it had not finished;
- ``ray``: tasks on a Ray cluster (a running one, or a local one started for the grid), fractional GPUs,
  a dead worker's run retried.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from abawfeat.backends.unit import UnitResult, UnitSpec, train_unit
from abawfeat.errors import ConfigError
from abawfeat.utils.registry import Registry


@dataclass
class BackendOptions:
    """Everything a backend may be told on the command line; each reads its own fields."""

    jobs: int = 1  # local: units at once; ray: the CPUs of a local cluster started for the grid
    log_dir: str = ""  # submitit: job scripts, pickles and logs (default: <out>/.submitit)
    slurm_partition: str = ""
    slurm_gpus_per_job: int = 0
    slurm_time: int = 60  # minutes per job; a job hitting it is requeued with the runs it had not finished
    slurm_array_parallelism: int = 0  # 0: Slurm's own limit
    slurm_opts: dict[str, Any] = field(default_factory=dict)  # any other sbatch option, key=value
    runs_per_job: int = 1  # submitit: runs one job trains one after another (short runs share a job)
    submitit_local: bool = False  # submitit's LocalExecutor: the same path, real processes, no Slurm
    ray_address: str = ""  # a running cluster ("auto", "ray://host:10001", "host:6379"); "" = start one
    gpus_per_run: float = 0.0  # ray: a fraction packs several runs on one GPU
    max_retries: int = 2  # ray: a unit whose worker died is run again this many times
    dry_run: bool = False  # only plan (submitit: render the sbatch script; no Slurm needed)


class Backend(Protocol):
    name: ClassVar[str]

    def run(self, specs: Sequence[UnitSpec], say: Callable[[str], None]) -> list[UnitResult]: ...


BACKENDS: Registry[Callable[[BackendOptions], Backend]] = Registry("backend")


def get_backend(name: str, options: BackendOptions | None = None) -> Backend:
    """The backend ``name`` built with ``options``; a ConfigError for an unknown name or bad options."""
    _load()
    try:
        factory = BACKENDS.get(name)
    except ConfigError:
        raise ConfigError(f"--backend {name!r}: choose one of {', '.join(BACKENDS.names())}") from None
    return factory(options or BackendOptions())


def backend_names() -> list[str]:
    _load()
    return BACKENDS.names()


def _load() -> None:
    # Importing a backend module registers it; their heavy imports (submitit, ray) happen only when used.
    from abawfeat.backends import local, ray_backend, submitit_backend  # noqa: F401


def threads_text(spec: UnitSpec) -> str:
    t = spec.config.threads
    return f"{t} thread(s)" if t else "torch's default threads"




def fold_trainer(backend: Backend,
                 say: Callable[[str], None]) -> Callable[[list[tuple[str, Any]]], list[str]]:
    """``cv.run_cv``'s ``train_folds``: the folds as units of ``backend``; one line per failed fold."""
    from abawfeat.backends.unit import run_mode

    def train(folds: list[tuple[str, Any]]) -> list[str]:
        specs = [UnitSpec(name=name, config=cfg, mode=run_mode(cfg)) for name, cfg in folds]
        results = backend.run(specs, say)
        return [f"{r.name}: {r.error}" + (f" (log {r.log})" if r.log and r.log not in r.error else "")
                for r in results if r.status == "failed"]

    return train


__all__ = ["BACKENDS", "Backend", "BackendOptions", "UnitResult", "UnitSpec", "backend_names", "fold_trainer",
           "get_backend", "train_unit"]

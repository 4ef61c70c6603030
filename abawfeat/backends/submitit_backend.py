"""The submitit backend: one Slurm job array per grid (or submitit's LocalExecutor with ``submitit_local``).

Units are packed ``runs_per_job`` to a job (short runs would otherwise spend most of their job in the queue
and in imports). Each array task runs a ``UnitBatch``: a callable that trains its units one after another
(``train_unit`` skips the complete ones). When Slurm signals a timeout or a pre-emption, submitit calls
``UnitBatch.checkpoint``, which requeues the job with the units it had not finished; the unit that was
training resumes from its last finished epoch (its ``train_state.pt``). The grid waits for the array and
reports each unit with its job's log. ``--dry-run`` prints the sbatch script without submitting it.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from abawfeat.backends import BACKENDS, BackendOptions
from abawfeat.backends.unit import UnitResult, UnitSpec, quiet_worker, train_unit
from abawfeat.errors import ConfigError
from abawfeat.train.fit import run_is_complete


class UnitBatch:
    """One job's units. A plain picklable class so that submitit can requeue it (``checkpoint``)."""

    def __init__(self, specs: Sequence[UnitSpec]) -> None:
        self.specs = list(specs)

    def __call__(self) -> list[UnitResult]:
        quiet_worker()
        return [train_unit(spec) for spec in self.specs]

    def checkpoint(self) -> Any:
        """Called by submitit on timeout or pre-emption: requeue with the units not yet complete (the one
        that was training resumes from its last finished epoch)."""
        import submitit

        left = [s for s in self.specs if s.kind == "cv" or not run_is_complete(s.config.out, s.config)]
        return submitit.helpers.DelayedSubmission(UnitBatch(left))


def chunks(specs: Sequence[UnitSpec], size: int) -> list[list[UnitSpec]]:
    return [list(specs[i:i + size]) for i in range(0, len(specs), size)]


class SubmititBackend:
    name = "submitit"

    def __init__(self, options: BackendOptions) -> None:
        if options.runs_per_job < 1:
            raise ConfigError(f"--runs-per-job must be at least 1, not {options.runs_per_job}")
        if options.slurm_time < 1:
            raise ConfigError(f"--slurm-time must be at least 1 minute, not {options.slurm_time}")
        if not (options.submitit_local or options.dry_run) and (shutil.which("sbatch") is None
                                                                 or shutil.which("srun") is None):
            raise ConfigError("--backend submitit: no Slurm here (sbatch / srun not on PATH); run on the "
                              "cluster's login node, or add --submitit-local to run the jobs on this machine")
        self.options = options

    def parameters(self, specs: Sequence[UnitSpec]) -> dict[str, Any]:
        """sbatch parameters in submitit's names: a job gets the CPUs of its most threaded unit."""
        o = self.options
        threads = max((s.config.threads for s in specs), default=1) or 1
        params: dict[str, Any] = {"job_name": "abawfeat", "time": o.slurm_time, "cpus_per_task": threads,
                                  "ntasks_per_node": 1, "nodes": 1}
        if o.slurm_partition:
            params["partition"] = o.slurm_partition
        if o.slurm_gpus_per_job:
            params["gpus_per_node"] = o.slurm_gpus_per_job
        if o.slurm_array_parallelism:
            params["array_parallelism"] = o.slurm_array_parallelism
        if o.slurm_opts:
            params["additional_parameters"] = dict(o.slurm_opts)
        return params

    def script(self, specs: Sequence[UnitSpec], folder: str | Path) -> str:
        """The sbatch script of the job array these specs would be submitted as (what ``--dry-run``
        prints), rendered by submitit itself from the same parameters a submission uses."""
        from submitit.slurm import slurm

        executor_python = sys.executable
        command = f"{executor_python} -u -m submitit.core._submit {folder}"
        n_jobs = len(chunks(specs, self.options.runs_per_job))
        try:
            return slurm._make_sbatch_string(command=command, folder=str(folder), map_count=n_jobs,
                                             **self.parameters(specs))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--slurm-opt: {exc}") from None

    def executor(self, folder: Path, specs: Sequence[UnitSpec]) -> Any:
        import submitit

        if self.options.submitit_local:
            ex = submitit.LocalExecutor(folder=str(folder))
            ex.update_parameters(timeout_min=self.options.slurm_time)
            return ex
        ex = submitit.SlurmExecutor(folder=str(folder))
        try:
            ex.update_parameters(**self.parameters(specs))
        except ValueError as exc:
            raise ConfigError(f"--slurm-opt: {str(exc).splitlines()[0]}") from None
        return ex

    def run(self, specs: Sequence[UnitSpec], say: Callable[[str], None],
            folder: str | Path | None = None) -> list[UnitResult]:
        if not specs:
            return []
        # The caller's folder (a grid's, a cross-validation's or a search's out/.submitit): one per grid.
        folder = Path(folder or self.options.log_dir or Path(specs[0].config.out).parent / ".submitit")
        folder = folder / "%j"  # submitit replaces %j by the job id: one folder per job
        executor = self.executor(folder, specs)
        batches = chunks(specs, self.options.runs_per_job)
        jobs = []
        with executor.batch():  # one job array
            for batch in batches:
                jobs.append(executor.submit(UnitBatch(batch)))
        for job, batch in zip(jobs, batches, strict=True):
            names = ", ".join(s.name for s in batch)
            say(f"job {job.job_id}: {len(batch)} run(s) ({names}); log {job.paths.stdout}")
        results: list[UnitResult] = []
        for job, batch in zip(jobs, batches, strict=True):
            try:
                out = job.result()
            except Exception as exc:  # the job died (killed, out of memory, a node failure)
                log = str(job.paths.stderr)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                for spec in batch:
                    done = spec.kind == "run" and run_is_complete(spec.config.out, spec.config)
                    results.append(_finished(spec, log) if done else UnitResult(
                        name=spec.name, run_dir=str(spec.config.out), status="failed",
                        error=f"job {job.job_id} failed ({first}); log {log}", log=log))
                continue
            for r in out:
                r.log = str(job.paths.stdout)
            results.extend(out)
        return results


def _finished(spec: UnitSpec, log: str) -> UnitResult:
    from abawfeat.utils.configs import read_json

    return UnitResult(name=spec.name, run_dir=str(spec.config.out), status="trained",
                      metrics=read_json(Path(spec.config.out) / "metrics.json"), log=log)


BACKENDS.add("submitit", SubmititBackend)

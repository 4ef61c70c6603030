"""The backend options of the commands that train several runs (``ablate``, ``cv``, ``tune``), declared once
(Annotated types), and ``backend_options`` turning their values into ``abawfeat.backends.BackendOptions``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

Backend = Annotated[str, typer.Option(
    "--backend", help="Where the runs train: local (this machine, --jobs processes), submitit (a Slurm job "
    "array; --submitit-local: submitit's local executor) or ray (a Ray cluster). docs/cluster.md.")]
SlurmPartition = Annotated[str, typer.Option("--slurm-partition", help="submitit: Slurm partition.")]
SlurmGpus = Annotated[int, typer.Option("--slurm-gpus-per-job", help="submitit: GPUs per job.")]
SlurmTime = Annotated[int, typer.Option(
    "--slurm-time", help="submitit: minutes per job; a job hitting it is requeued with its unfinished runs.")]
SlurmArray = Annotated[int, typer.Option(
    "--slurm-array-parallelism", help="submitit: jobs of the array running at once; 0 = Slurm's limit.")]
SlurmOpt = Annotated[list[str] | None, typer.Option(
    "--slurm-opt", help="submitit: any other sbatch option, key=value (repeatable), e.g. account=lab.")]
RunsPerJob = Annotated[int, typer.Option(
    "--runs-per-job", help="submitit: runs one job trains one after another (short runs share a job).")]
SubmititLocal = Annotated[bool, typer.Option(
    "--submitit-local", help="submitit: run the jobs on this machine through submitit's local executor.")]
SubmititFolder = Annotated[Path | None, typer.Option(
    "--submitit-folder", help="submitit: job scripts, pickles and logs (default: OUT/.submitit).")]
RayAddress = Annotated[str, typer.Option(
    "--ray-address", help="ray: a running cluster (auto, host:6379, ray://host:10001); default: a local "
    "cluster started for these runs with --jobs CPUs.")]
GpusPerRun = Annotated[float, typer.Option(
    "--gpus-per-run", help="ray: GPUs per run; a fraction (0.25) packs several runs on one GPU.")]
MaxRetries = Annotated[int, typer.Option(
    "--max-retries", help="ray: times a run whose worker died is started again (it resumes).")]


def backend_options(*, jobs: int = 1, slurm_opt: list[str] | None = None,
                    submitit_folder: Path | None = None, **values: Any) -> Any:
    from abawfeat.backends import BackendOptions
    from abawfeat.cli._common import parse_key_values

    return BackendOptions(jobs=jobs, slurm_opts=parse_key_values(slurm_opt or [], "--slurm-opt"),
                          log_dir=str(submitit_folder) if submitit_folder else "", **values)

"""Backends (local, submitit, Ray) train the same units into the same run directories: same metrics, same
tables; a worker killed mid-grid costs only the runs it had not finished. Real engines: submitit's
LocalExecutor starts real worker processes, Ray a real 2-CPU local cluster."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner
from worlds import World, build_world

from abawfeat.ablate import run_ablation
from abawfeat.backends import BackendOptions, UnitSpec, get_backend
from abawfeat.cli import app
from abawfeat.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CELLS = [("fake-fc", "va"), ("fake-fc", "au"), ("fake-fc1", "va"), ("fake-fc1", "expr")]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("backends-world"), n_train=4, n_val=2, n_test=1)


def recipe(tmp: Path, world: World, epochs: int = 3) -> Path:
    path = tmp / "grid.toml"
    path.write_text(f"""
[grid]
name = "tiny"
title = "Tiny grid"
data = "{world.root}"
out = "{tmp / 'grid'}"

[caches]
fake = "{world.cache}"

[defaults]
epochs = {epochs}
plots = false
batch_size = 64
threads = 1

[[rows]]
label = "FAKE+Fc"
backbone = "fake"
head = "fc"
tasks = ["va", "au"]

[[rows]]
label = "FAKE+Fc1"
backbone = "fake"
head = "fc"
hidden = 32
tasks = ["va", "expr"]
""")
    return path


@pytest.fixture(scope="module")
def reference(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The grid through the local backend in this process: what every backend must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    run_ablation(recipe(tmp, world), out=str(tmp / "local"))
    return {"metrics": metrics_of(tmp / "local"), "csv": (tmp / "local" / "results.csv").read_text()}


def metrics_of(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {cell: json.loads((out / cell[0] / cell[1] / "metrics.json").read_text()) for cell in CELLS}


def env_with_package() -> dict[str, str]:
    """Worker processes import abawfeat and this test module from where this process does."""
    here = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
    return {"PYTHONPATH": os.pathsep.join([*here, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


class DyingSpec(UnitSpec):
    """A unit whose worker process dies after its first epoch, once (a marker file says it already did): a
    killed Slurm job, an OOM-killed Ray worker. Pickled by value into the worker."""

    marker: str = ""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        marker = Path(self.marker)
        if marker.exists():
            return
        marker.write_text("died once")
        state = Path(self.config.out) / "train_state.pt"  # written after each epoch

        def die() -> None:
            while not state.is_file():
                time.sleep(0.02)
            os._exit(9)

        threading.Thread(target=die, daemon=True).start()


def dying(spec: UnitSpec, marker: Path) -> DyingSpec:
    out = DyingSpec(**{k: getattr(spec, k) for k in ("name", "config", "mode", "kind", "trial")})
    out.marker = str(marker)
    return out


@pytest.fixture()
def by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    for key, value in env_with_package().items():
        monkeypatch.setenv(key, value)
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def kill_first_cell(monkeypatch: pytest.MonkeyPatch, marker: Path) -> None:
    """The grid's first unit (queue order) goes out as a DyingSpec."""
    import abawfeat.backends as backends

    class Factory(UnitSpec):
        seen = 0

        def __new__(cls, **kw: Any) -> Any:  # type: ignore[misc]
            Factory.seen += 1
            spec = UnitSpec(**kw)
            return dying(spec, marker) if Factory.seen == 1 else spec

    monkeypatch.setattr(backends, "UnitSpec", Factory)


def test_submitit_local_executor_gives_the_local_grid_and_a_killed_job_costs_only_its_runs(
    world: World, tmp_path: Path, reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch, by_value: None
) -> None:
    path = recipe(tmp_path, world)
    out = tmp_path / "grid"
    options = BackendOptions(submitit_local=True, runs_per_job=2, slurm_time=10)
    kill_first_cell(monkeypatch, tmp_path / "died")
    first = run_ablation(path, backend="submitit", options=options)
    # The job of the first cell died after that cell's first epoch: both its runs are failed, each naming
    # the job's log; the other job's two runs are complete.
    failed = [c for c in first.cells if c.status == "failed"]
    assert len(failed) == 2 and all("log " in c.error and ".submitit" in c.error for c in failed)
    done = {(c.run_dir.parent.name, c.task): c.run_dir for c in first.cells if c.status == "trained"}
    assert len(done) == 2
    stamps = {cell: (d / "metrics.json").stat().st_mtime_ns for cell, d in done.items()}
    killed = Path(failed[0].run_dir) if (Path(failed[0].run_dir) / "history.csv").is_file() \
        else Path(failed[1].run_dir)
    assert (killed / "train_state.pt").is_file() and not (killed / "metrics.json").exists()
    monkeypatch.undo()

    # The same command again trains only what is missing (the killed run resumes), and the grid equals the
    # local backend's, number for number and byte for byte in results.csv.
    for key, value in env_with_package().items():
        monkeypatch.setenv(key, value)
    again = run_ablation(path, backend="submitit", options=options)
    statuses = {(c.run_dir.parent.name, c.task): c.status for c in again.cells}
    assert all(statuses[cell] == "skipped" for cell in done), statuses
    assert sorted(s for cell, s in statuses.items() if cell not in done) == ["trained", "trained"]
    assert all((d / "metrics.json").stat().st_mtime_ns == stamps[cell] for cell, d in done.items())
    assert "resuming" in " ".join(p.read_text() for p in (out / ".submitit").rglob("*_log.out"))
    assert metrics_of(out) == reference["metrics"]
    assert (out / "results.csv").read_text() == reference["csv"]
    assert json.loads((out / "grid-runs.json").read_text())["runs"] == sorted(f"{r}/{t}" for r, t in CELLS)


def test_dry_run_prints_the_sbatch_script_of_one_job_array(world: World, tmp_path: Path) -> None:
    path = recipe(tmp_path, world)
    result = CliRunner().invoke(app, [
        "ablate", str(path), "--dry-run", "--backend", "submitit", "--slurm-partition", "gpu",
        "--slurm-gpus-per-job", "1", "--slurm-time", "30", "--slurm-array-parallelism", "2",
        "--slurm-opt", "account=lab", "--runs-per-job", "2"])
    assert result.exit_code == 0, result.output
    lines = [x for x in result.stdout.splitlines() if x.startswith("#SBATCH")]
    for want in ("--partition=gpu", "--gpus-per-node=1", "--time=30", "--array=0-1%2", "--account=lab",
                 "--cpus-per-task=1", "--job-name=abawfeat"):
        assert f"#SBATCH {want}" in lines, (want, lines)
    assert "submitit.core._submit" in result.stdout
    assert not (tmp_path / "grid" / "fake-fc").exists()  # nothing trained, nothing submitted


@pytest.mark.parametrize("args, message", [
    (["--backend", "slurmish"], "--backend 'slurmish': choose one of local, ray, submitit"),
    (["--backend", "submitit"], "no Slurm here"),
    (["--backend", "submitit", "--submitit-local", "--runs-per-job", "0"],
     "--runs-per-job must be at least 1"),
    (["--backend", "ray", "--ray-address", "127.0.0.1:1"], "cannot connect to a Ray cluster"),
])
def test_bad_backend_input_is_one_line(world: World, tmp_path: Path, args: list[str], message: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch / srun here (nor on CI)
    if "ray" in args:
        pytest.importorskip("ray")
        monkeypatch.setenv("RAY_ADDRESS", "")
    result = CliRunner().invoke(app, ["ablate", str(recipe(tmp_path, world)), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == \
        [result.output.strip().splitlines()[-1]]


def test_ray_cluster_gives_the_local_grid_and_retries_a_dead_worker(
    world: World, tmp_path: Path, reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch, by_value: None
) -> None:
    ray = pytest.importorskip("ray")
    path = recipe(tmp_path, world)
    kill_first_cell(monkeypatch, tmp_path / "died")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env_with_package()})
    try:
        result = run_ablation(path, backend="ray", options=BackendOptions(jobs=2, max_retries=2))
    finally:
        ray.shutdown()
    assert (tmp_path / "died").is_file()  # a worker did die mid-run ...
    assert [c.status for c in result.cells] == ["trained"] * 4  # ... and its run was retried to completion
    assert metrics_of(tmp_path / "grid") == reference["metrics"]
    assert (tmp_path / "grid" / "results.csv").read_text() == reference["csv"]


def test_a_unit_is_plain_picklable_data_and_backends_are_a_registry(world: World, tmp_path: Path) -> None:
    import pickle

    from worlds import config

    from abawfeat.backends import backend_names
    from abawfeat.backends.unit import train_unit

    spec = UnitSpec(name="one", config=config(world, tmp_path / "run", epochs=1))
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert backend_names() == ["local", "ray", "submitit"]
    first = train_unit(spec, say=lambda _m: None)
    again = train_unit(spec, say=lambda _m: None)  # handed out twice (a requeue): read back, not retrained
    assert (first.status, again.status) == ("trained", "skipped") and again.metrics == first.metrics
    with pytest.raises(ConfigError, match="choose one of"):
        get_backend("nope")


def test_a_job_signalled_for_timeout_requeues_with_the_runs_it_had_not_finished(
    world: World, tmp_path: Path, by_value: None
) -> None:
    # submitit's LocalExecutor delivers the signal Slurm sends before a time limit or a pre-emption; the
    # job's checkpoint() requeues it with its unfinished runs, and the run it was training resumes.
    import submitit
    from worlds import config

    from abawfeat.backends.submitit_backend import UnitBatch

    specs = [UnitSpec(name=f"run {i}", config=config(world, tmp_path / f"run-{i}", epochs=30, seed=i))
             for i in range(2)]
    executor = submitit.LocalExecutor(folder=str(tmp_path / "jobs"))
    executor.update_parameters(timeout_min=10)
    job = executor.submit(UnitBatch(specs))
    state = tmp_path / "run-0" / "train_state.pt"
    deadline = time.monotonic() + 240
    while not state.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    # What Slurm delivers before a time limit or a pre-emption, sent to the job's task process (a child of
    # submitit's local controller, which does not forward this signal itself).
    controller = job._process.pid
    children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    assert len(children) == 1
    os.kill(int(children[0]), submitit.local.local.LocalJobEnvironment._usr_sig())
    results = job.result()
    assert [r.status for r in results] == ["trained", "trained"]
    log = Path(job.paths.stdout).read_text()
    assert "resuming" in log and "run 0" in log
    assert all((tmp_path / f"run-{i}" / "metrics.json").is_file() for i in range(2))


def test_cv_folds_through_a_backend_equal_the_folds_trained_in_line(world: World, tmp_path: Path) -> None:
    import dataclasses

    from worlds import config

    from abawfeat.backends import fold_trainer
    from abawfeat.cv import run_cv

    cfg = config(world, tmp_path / "inline", epochs=2)
    inline = run_cv(cfg, 2)
    messages: list[str] = []
    through = run_cv(dataclasses.replace(cfg, out=str(tmp_path / "backend")), 2,
                     train_folds=fold_trainer(get_backend("local"), messages.append))
    assert through.metrics == inline.metrics
    assert any("fold 2/2: training into" in m for m in messages)
    again = run_cv(dataclasses.replace(cfg, out=str(tmp_path / "backend")), 2,
                   train_folds=fold_trainer(get_backend("local"), messages.append))
    assert again.metrics == inline.metrics

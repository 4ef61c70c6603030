"""``abawfeat tune``: Optuna studies that several processes share, that resume after a kill, whose every
trial is a run directory that ``evaluate`` reproduces; pruning through the one training loop's epoch hook."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner
from worlds import World, build_world

from abawfeat.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("tune-world"), n_train=4, n_val=2, n_test=1)


def tune_args(world: World, out: Path, trials: int, epochs: int = 2) -> list[str]:
    return ["tune", "--task", "va", "--head", "fc", "--data", str(world.root), "--cache", str(world.cache),
            "--out", str(out), "--trials", str(trials), "--epochs", str(epochs)]


def start(args: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ABAWFEAT_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "abawfeat", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def load(out: Path):  # noqa: ANN201 - an optuna Study
    import optuna

    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


def test_two_workers_share_one_study_and_finish_its_budget_exactly(world: World, tmp_path: Path) -> None:
    import optuna

    out = tmp_path / "search"
    workers = [start(tune_args(world, out, trials=4)) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    trials = load(out).get_trials()
    State = optuna.trial.TrialState
    finished = [t for t in trials if t.state in (State.COMPLETE, State.PRUNED)]
    assert len(trials) == len(finished) == 4  # none lost, none beyond the budget
    assert all(sum(f"trial {t.number}: " in log and "-> " in log for log in logs) >= 1 for t in trials)
    # Each trial was trained by exactly one worker, into its own run directory.
    asked = [line for log in logs for line in log.splitlines() if " -> " in line]
    assert len(asked) == 4
    run_dirs = [t.user_attrs["abawfeat_run_dir"] for t in trials]
    assert len(set(run_dirs)) == 4
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            metrics = json.loads((Path(t.user_attrs["abawfeat_run_dir"]) / "metrics.json").read_text())
            assert metrics["ccc_va"] == pytest.approx(t.value, abs=1e-12)

    # Once the budget is spent, running it again trains nothing and writes the summary.
    result = CliRunner().invoke(app, tune_args(world, out, trials=4))
    assert result.exit_code == 0, result.output
    assert len(load(out).get_trials()) == 4
    rows = (out / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 5 and rows[0].startswith("number,state,value,epochs,lr,weight_decay,dropout,hidden")
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best"]
    assert best["value"] == max(t.value for t in trials if t.value is not None)
    assert "tuned on validation" in result.output and best["run_dir"] in result.output
    # `evaluate` of the best trial's run prints its value.
    from abawfeat.train import evaluate

    assert evaluate(best["run_dir"], "val")["ccc_va"] == pytest.approx(best["value"], abs=1e-6)
    assert (out / "importance.png").is_file() and "Search" in (out / "report.html").read_text()


def test_a_killed_tune_resumes_without_duplicating_a_trial(world: World, tmp_path: Path) -> None:
    import optuna

    out = tmp_path / "search"
    worker = start(tune_args(world, out, trials=3, epochs=10))
    state = out / "trials" / "trial-0001" / "train_state.pt"
    deadline = time.monotonic() + 300
    while not state.is_file() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.poll() is None, worker.communicate()[0].decode()
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert not (out / "trials" / "trial-0001" / "metrics.json").exists()

    result = CliRunner().invoke(app, tune_args(world, out, trials=3, epochs=10))
    assert result.exit_code == 0, result.output
    assert "trial 1: its worker" in result.output and "resuming" in result.output
    trials = load(out).get_trials()
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and trials[1].user_attrs.get("stale")
    finished = [t for t in trials if t.state != optuna.trial.TrialState.FAIL]
    assert len(finished) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in finished)
    # The killed trial's point was asked again and finished in its own run directory.
    killed = trials[1].user_attrs["abawfeat_run_dir"]
    retried = [t for t in finished if t.user_attrs["abawfeat_run_dir"] == killed]
    assert len(retried) == 1 and retried[0].params == trials[1].params


def test_a_recipe_names_the_space_and_holdout_tuning_selects_on_held_out_videos(
    world: World, tmp_path: Path
) -> None:
    recipe = tmp_path / "search.toml"
    recipe.write_text(f"""
[tune]
task = "va"
data = "{world.root}"
cache = "{world.cache}"
out = "{tmp_path / 'search'}"
trials = 2
epochs = 2
tune_on = "holdout"

[fixed]
batch_size = 64

[space.lr]
type = "log"
low = 1e-4
high = 1e-2

[space.head]
type = "categorical"
choices = ["fc"]

[space.hidden]
type = "int"
low = 0
high = 64
step = 32

[space.class_weights]
type = "categorical"
choices = ["none"]
""")
    result = CliRunner().invoke(app, ["tune", str(recipe)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    best = summary["best"]
    assert set(best["params"]) == {"lr", "head", "hidden", "class_weights"}
    assert best["params"]["hidden"] in (0, 32, 64)
    assert best["value"] == pytest.approx(best["metrics"]["holdout"]["ccc_va"], abs=1e-12)
    assert best["value"] != best["metrics"]["ccc_va"] and "held-out training videos" in result.output


@pytest.mark.parametrize("space, message", [
    ('[space.lr]\ntype = "uniformish"\nlow = 0.1\nhigh = 1.0',
     "type must be one of float, log, int, categorical"),
    ('[space.lr]\ntype = "log"\nlow = 0.0\nhigh = 1.0', "a log-uniform parameter needs low > 0"),
    ('[space.speed]\ntype = "float"\nlow = 0.0\nhigh = 1.0', "'speed' is not a train-head option"),
    ('[space.head]\ntype = "categorical"\nchoices = ["no-such-trunk"]',
     "the search space gives an invalid run"),
])
def test_a_bad_space_is_one_line(world: World, tmp_path: Path, space: str, message: str) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'[tune]\ntask = "va"\ndata = "{world.root}"\nout = "{tmp_path / "s"}"\n{space}\n')
    result = CliRunner().invoke(app, ["tune", str(recipe)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_the_pruner_stops_a_hopeless_trial_through_the_epoch_hook(world: World, tmp_path: Path) -> None:
    import optuna
    from worlds import config

    from abawfeat.backends import UnitSpec
    from abawfeat.backends.unit import train_unit

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    for value in (0.9, 0.95, 0.97, 0.99, 0.98):  # earlier trials far better at every epoch
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={1: value, 2: value},
                                                  params={}, distributions={}))
    trial = study.ask()
    spec = UnitSpec(name="t", config=config(world, tmp_path / "run", epochs=4),
                    trial={"storage": url, "study": "s", "trial_id": trial._trial_id, "metric": "ccc_va",
                           "prune": True, "startup": 5, "warmup": 1})
    result = train_unit(spec, say=lambda _m: None)
    assert result.status == "pruned" and "epoch 1" in result.error
    run = tmp_path / "run"
    assert (run / "train_state.pt").is_file() and not (run / "metrics.json").exists()
    assert list(optuna.load_study(study_name="s", storage=url).trials[-1].intermediate_values) == [1]


def test_the_sampler_is_seeded_per_trial_whatever_the_jobs(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --jobs 3 asks three trials at once; they train here one after another (the local backend's worker
    # processes would only cost start-up time): the points drawn must not depend on how many are asked.
    import abawfeat.tune as tune
    from abawfeat.backends import BackendOptions
    from abawfeat.backends.local import LocalBackend
    from abawfeat.tune import TuneConfig, run_tune

    monkeypatch.setattr(tune, "get_backend", lambda _name, _options: LocalBackend(BackendOptions()))

    def params(out: Path, jobs: int) -> list[dict]:
        cfg = TuneConfig(task="va", data=str(world.root), cache=(str(world.cache),), out=str(out), trials=3,
                         epochs=1, jobs=jobs, fixed={"batch_size": 64})
        run_tune(cfg)
        return [t.params for t in sorted(load(out).get_trials(), key=lambda t: t.number)]

    one = params(tmp_path / "a", 1)
    assert params(tmp_path / "b", 3) == one and len({json.dumps(p, sort_keys=True) for p in one}) == 3

"""``abawfeat reproduce``: a run redone from its record into a scratch folder, every metric compared, and the
recorded settings that differ from this machine's named; the original is only read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner
from worlds import World, build_world, config

from abawfeat.cli import app
from abawfeat.errors import ConfigError, RunError
from abawfeat.reproduce import compare_metrics, flatten, recorded_threads, reproduce_run
from abawfeat.train import fit
from abawfeat.train.rundir import RunRecord
from abawfeat.utils.environment import cpu_flags, environment_differences, float_environment, onednn_version

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("reproduce-world")
    return build_world(root, n_train=4, n_val=2, n_test=1, temporal=True)


@pytest.fixture(scope="module")
def run(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A temporal trunk in fp32 (its sums are long enough for the thread count to matter), seconds to train.
    out = tmp_path_factory.mktemp("runs") / "gru"
    fit(config(world, out, head="gru", hidden=8, window=16, batch_size=8, epochs=2, precision="fp32"))
    return out


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_the_record_carries_what_decides_the_floats(run: Path) -> None:
    import torch

    env = RunRecord.read(run).environment
    assert env["threads"] == 1 and env["torch"] == torch.__version__
    assert env["device"] == "cpu" and env["deterministic_algorithms"] is False
    assert env["onednn"] == onednn_version() and env["cpu_flags"] == cpu_flags()
    assert json.loads((run / "config.json").read_text())["resolved"]["threads"] == 1


def test_reproduce_is_equal_at_the_same_threads_and_leaves_the_run_alone(run: Path, tmp_path: Path) -> None:
    before = _files(run)
    res = CliRunner().invoke(app, ["reproduce", str(run)])
    assert res.exit_code == 0, res.output
    assert "equal: all" in res.output and "≠" not in res.output
    assert _files(run) == before  # only read
    scratch = tmp_path / "again"
    result = reproduce_run(run, scratch, keep=True)
    assert result.equal and result.threads == 1 and not result.differences
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads((scratch / "metrics.json").read_text()) == metrics
    assert {r.key for r in result.rows} >= {"ccc_va", "ccc_valence", "best_epoch"}
    removed = tmp_path / "removed"
    assert not reproduce_run(run, removed).kept and not removed.exists()  # a scratch it made goes again
    assert _files(run) == before


def _edit(run: Path, copy: Path, change: dict[str, object], metric_delta: float = 0.0) -> Path:
    import shutil

    shutil.copytree(run, copy)
    record = json.loads((copy / "config.json").read_text())
    record["environment"].update(change)
    (copy / "config.json").write_text(json.dumps(record))
    if metric_delta:
        metrics = json.loads((copy / "metrics.json").read_text())
        metrics["ccc_va"] += metric_delta
        (copy / "metrics.json").write_text(json.dumps(metrics))
    return copy


def test_a_difference_names_the_recorded_settings_that_differ(run: Path, tmp_path: Path) -> None:
    # A run recorded (so its record claims) on two threads and another torch, whose CCC we do not get back.
    claimed = _edit(run, tmp_path / "claimed", {"threads": 2, "torch": "2.0.0"}, metric_delta=0.01)
    res = CliRunner().invoke(app, ["reproduce", str(claimed)])
    assert res.exit_code == 1, res.output
    assert "differ: " in res.output and "1 of" in res.output and "≠" in res.output
    assert "torch threads: recorded 2, here 1" in res.output
    assert "torch version: recorded 2.0.0" in res.output
    # The same claims with the numbers intact: equal (exit 0), the differing settings still said.
    same = _edit(run, tmp_path / "same", {"torch": "2.0.0"})
    res = CliRunner().invoke(app, ["reproduce", str(same)])
    assert res.exit_code == 0 and "torch version: recorded 2.0.0" in res.output


def test_a_different_number_with_no_recorded_difference_says_so(run: Path, tmp_path: Path) -> None:
    changed = _edit(run, tmp_path / "changed", {}, metric_delta=-0.02)
    res = CliRunner().invoke(app, ["reproduce", str(changed)])
    assert res.exit_code == 1 and "no recorded setting" in res.output


def test_cross_validations_and_ensembles_are_reproduced(world: World, run: Path, tmp_path: Path) -> None:
    import torch

    from abawfeat.cv import run_cv
    from abawfeat.ensemble import EnsembleConfig, build_ensemble

    cv = tmp_path / "cv"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_cv(config(world, cv, epochs=1), 2)
    finally:
        torch.set_num_threads(before)
    # The cross-validation's record carries what decided its folds' floats: their one thread.
    assert RunRecord.read(cv).environment["threads"] == 1
    assert RunRecord.read(cv / "fold-1").environment["threads"] == 1
    assert reproduce_run(cv).equal
    other = tmp_path / "fc"
    fit(config(world, other, epochs=1))
    ens = tmp_path / "ens"
    build_ensemble(EnsembleConfig(runs=(str(run), str(other)), out=str(ens)))
    result = reproduce_run(ens)
    assert result.kind == "ensemble" and result.equal, [r for r in result.rows if not r.equal]


def test_bad_input_is_one_line(world: World, run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [
        ([str(tmp_path / "nope")], "no such run directory"),
        ([str(world.root)], "not a run directory"),
        ([str(run), "--out", str(run)], "never over the original"),
        ([str(run), "--out", str(run / "inside")], "never over the original"),
        ([str(run), "--out", str(world.cache)], "exists and is not empty"),
    ]
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_bytes((run / "config.json").read_bytes())
    cases.append(([str(incomplete)], "the run is incomplete"))
    finetune = tmp_path / "finetune"
    finetune.mkdir()
    for name, data in _files(run).items():
        (finetune / name).write_bytes(data)
    record = json.loads((run / "config.json").read_text())
    (finetune / "config.json").write_text(json.dumps({**record, "kind": "finetune"}))
    cases.append(([str(finetune)], "a finetune run; reproduce redoes head runs"))
    for argv, message in cases:
        res = runner.invoke(app, ["reproduce", *argv])
        assert res.exit_code == 2, (argv, res.output)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, res.output)
        assert "Traceback" not in res.output
    with pytest.raises(ConfigError):
        reproduce_run(run, world.cache)
    with pytest.raises(RunError):
        reproduce_run(incomplete)


def test_flatten_and_compare_every_value() -> None:
    metrics = {"task": "au", "f1_au": 0.5, "per": {"AU1": 0.25}, "folds": [{"x": 1.0}, {"x": 2.0}]}
    assert flatten(metrics) == {"task": "au", "f1_au": 0.5, "per.AU1": 0.25, "folds[0].x": 1.0,
                                "folds[1].x": 2.0}
    rows = compare_metrics(metrics, {**metrics, "f1_au": 0.5000001, "extra": 1})
    assert [(r.key, r.equal) for r in rows if not r.equal] == [("f1_au", False), ("extra", False)]


def test_environment_helpers(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_tile\n")
    assert cpu_flags(info) == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]
    assert cpu_flags(tmp_path / "missing") is None  # unreadable: recorded as unknown
    assert onednn_version("  - Intel(R) MKL-DNN v3.12.0 (Git Hash 80af)\n") == "v3.12.0"
    assert onednn_version("no dnn here") is None
    here = float_environment("cpu")
    assert environment_differences(here, here) == []
    assert environment_differences({**here, "cpu_flags": ["avx512f"]}, here)[0].startswith(
        "CPU instruction sets: recorded avx512f, here")
    assert environment_differences({}, here) == []  # an old record: nothing to compare
    assert recorded_threads(RunRecord("head", "va", "fc", "", "x", train={"threads": 0},
                                      environment={"threads": 3})) == 3


def test_evaluate_runs_at_the_runs_own_thread_count(run: Path) -> None:
    # evaluate prints the numbers the run wrote whatever this process's thread count: inference runs at the
    # run's recorded count.
    import torch

    from abawfeat.train import evaluate

    stored = json.loads((run / "metrics.json").read_text())
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        metrics = evaluate(run, "val")
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(before)
    assert metrics["ccc_va"] == stored["ccc_va"]

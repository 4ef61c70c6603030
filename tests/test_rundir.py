"""Run directories are never destroyed: refusal, --overwrite built beside and swapped in, --resume exact,
interrupted runs refused by evaluate/predict/report, predictions never written over artefacts, file modes."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner
from worlds import World, build_world, config

from abawfeat.cli import app
from abawfeat.errors import DiskFullError, RunError
from abawfeat.predict import predict
from abawfeat.train import evaluate, fit

# abawfeat.train re-exports the function `fit`, which shadows the module of the same name.
fit_module = importlib.import_module("abawfeat.train.fit")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("rundir-world"), n_train=4, n_val=2, n_test=1, n_frames=100)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_complete_run_is_refused_or_replaced_only_once_the_new_one_is_complete(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "r1"
    fit(config(world, run, task="au", epochs=1))
    before = snapshot(run)
    with pytest.raises(RunError, match="holds a complete run .*--overwrite") as info:
        fit(config(world, run, task="va", epochs=1))
    assert "\n" not in str(info.value) and snapshot(run) == before

    # --overwrite, but the new run dies in its second epoch: the old run is still the one there.
    real = fit_module.run_epochs

    def dies(*args: object, **kwargs: object) -> object:
        kwargs["stop_epoch"] = 1
        real(*args, **kwargs)
        raise RuntimeError("killed")

    monkeypatch.setattr(fit_module, "run_epochs", dies)
    with pytest.raises(RuntimeError, match="killed"):
        fit(config(world, run, task="va", epochs=2), overwrite=True)
    assert snapshot(run) == before
    # No half-built replacement left (the run's writer lock, .r1.lock, stays beside it, as a cache's does).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r1.lock", "r1"]
    monkeypatch.undo()
    result = fit(config(world, run, task="va", epochs=1), overwrite=True)
    assert result.metrics["task"] == "va" and json.loads((run / "config.json").read_text())["task"] == "va"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r1.lock", "r1"]


def test_an_interrupted_run_resumes_to_exactly_what_an_uninterrupted_one_reaches(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = fit(config(world, tmp_path / "whole", task="au", head="gru", hidden=8, window=16, epochs=4,
                       dropout=0.2))
    real = fit_module.run_epochs

    def interrupted(*args: object, **kwargs: object) -> object:
        kwargs["stop_epoch"] = 2
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "run_epochs", interrupted)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        fit(config(world, cut, task="au", head="gru", hidden=8, window=16, epochs=4, dropout=0.2))
    monkeypatch.undo()
    # Incomplete: evaluate, predict and report say so in one line instead of scoring epoch 2.
    with pytest.raises(RunError, match="incomplete .*after epoch 2.*--resume"):
        evaluate(cut)
    with pytest.raises(RunError, match="incomplete"):
        predict(cut, "val", tmp_path / "p.txt")
    res = CliRunner().invoke(app, ["report", str(cut), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    with pytest.raises(RunError, match="interrupted run .*--resume"):
        fit(config(world, cut, task="au", head="gru", hidden=8, window=16, epochs=4, dropout=0.2))
    res = CliRunner().invoke(app, ["train-head", "--resume", str(cut)])
    assert res.exit_code == 0, res.output
    resumed = json.loads((cut / "metrics.json").read_text())
    assert resumed == whole.metrics
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(cut / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (cut / "train_state.pt").exists()  # a complete run keeps no resume state


def test_predictions_never_land_on_artefacts(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(config(world, run, task="expr", epochs=1))
    before = snapshot(run)
    for target in (run / "checkpoint.pt", run / "config.json", run / "metrics.json", run, world.cache):
        with pytest.raises(Exception) as info:
            predict(run, "val", target)
        assert "--out" in str(info.value) and "\n" not in str(info.value)
    assert snapshot(run) == before
    path = tmp_path / "expr.txt"
    predict(run, "val", path)
    first = path.read_bytes()
    with pytest.raises(Exception, match="--overwrite"):
        predict(run, "test", path)
    assert path.read_bytes() == first
    predict(run, "test", path, overwrite=True)
    assert path.read_bytes() != first
    # The train split is supported: a run's fit on its own training videos, scored the same way.
    assert predict(run, "train", tmp_path / "train.txt").videos["expr"] >= 1


def test_foreign_and_damaged_inputs_are_one_line(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(config(world, run, task="va", epochs=1))
    good = (run / "config.json").read_bytes()
    (run / "config.json").write_text("{not json")
    with pytest.raises(RunError, match=r"config.json:1: not valid JSON"):
        evaluate(run)
    (run / "config.json").write_bytes(good)
    # A checkpoint from another run (another task) in this run's directory.
    other = tmp_path / "other"
    fit(config(world, other, task="au", epochs=1))
    (run / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    with pytest.raises(Exception, match="the head predicts au, but the run is a va run"):
        evaluate(run)
    # A backbone that is not the cache's encoder.
    with pytest.raises(Exception, match="--backbone clip: .* holds fake features"):
        fit(config(world, tmp_path / "x", task="va", epochs=1, backbone="clip"))


def test_a_full_disk_is_one_line_and_keeps_what_was_there(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import abawfeat.utils.io as io

    run = tmp_path / "run"
    fit(config(world, run, task="va", epochs=1))
    before = snapshot(run)
    real = io.temporary_path

    def full(path: Path) -> Path:
        if path.name == "checkpoint.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(io, "temporary_path", full)
    with pytest.raises(DiskFullError) as info:
        fit(config(world, run, task="va", epochs=2), overwrite=True)
    message = str(info.value)
    assert "checkpoint.pt" in message and "no space left" in message and "untouched" in message
    assert "\n" not in message and snapshot(run) == before
    with pytest.raises(DiskFullError, match="incomplete; free space"):
        fit(config(world, tmp_path / "fresh", task="va", epochs=2))


def test_run_files_follow_the_umask(world: World, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        fit(config(world, tmp_path / "run", task="va", epochs=1))
    finally:
        os.umask(old)
    for name in ("config.json", "checkpoint.pt", "metrics.json", "history.csv", "val_outputs.npz"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name

"""Fault cases of stage two: run directories that must never be lost, incomplete runs, outputs that must
never land on the project's own artefacts, mismatched checkpoints, encoders and configs, full disks.

Written as strict xfails ("stage two: lead") while the lead restructured stage two; all pass since that work
was merged. A case whose fix is in progress gets ``fix="who"`` (a strict xfail) until it passes. Each case
makes the three assertions of helpers.assert_fault on its own copy of the world."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import copy_world
from .helpers import (
    CACHE,
    DATA,
    KILLED,
    RUNS,
    TRAIN,
    Case,
    Outcome,
    assert_fault,
    copy_file,
    fill,
    params,
    run_case,
    run_cli,
    snapshot,
    write_text,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VA, AU = RUNS["va"], RUNS["au"]


def train(task: str, out: str, *extra: str) -> tuple[str, ...]:
    return ("train-head", "--task", task, "--data", DATA, "--out", out, *TRAIN, *extra)


def predict(run: str, out: str, split: str = "val") -> tuple[str, ...]:
    return ("predict", run, "--split", split, "--out", out)


def _resumed(root: Path, outcome: Outcome) -> None:
    assert (root / KILLED / "metrics.json").is_file(), "the resumed run did not complete"


def _previous_prediction(root: Path) -> None:
    """A submission file written by an earlier, successful predict (which --overwrite may replace)."""
    assert run_cli(predict(VA, "p.txt")).exit_code == 0


def _garbage_config(run: str) -> Callable[[Path], None]:
    return write_text(f"{run}/config.json", '{"task": "va", "train": {"lr": 0.001,')


CASES = [
    # -- a complete run is never destroyed by a new command
    Case("train-head-over-complete-run-of-another-task", train("va", AU), 2, (AU, "--overwrite")),
    Case("train-head-over-complete-run-new-settings", train("va", VA, "--lr", "0.01"), 2,
         (VA, "--overwrite")),
    Case("train-head-overwrite-full-disk-keeps-old-run", train("va", AU, "--overwrite"), 2,
         ("no space left on the device",), disk_full_after=0),
    # -- an interrupted run is resumed exactly, or reported as incomplete
    Case("train-head-into-killed-run-without-resume", train("va", KILLED), 2, (KILLED, "--resume"),
         killed=True),
    Case("train-head-resume-killed-run", ("train-head", "--resume", KILLED), 0, (KILLED,), killed=True,
         channel="ok", may_change=(KILLED,), check=_resumed),
    Case("evaluate-incomplete-run", ("evaluate", KILLED), 2, (KILLED,), killed=True),
    Case("predict-incomplete-run", predict(KILLED, "p.txt"), 2, (KILLED,), killed=True),
    Case("report-incomplete-run", ("report", KILLED, "--out", "r.html"), 2, (KILLED,), killed=True),
    # -- no command writes its output over a cache, a checkpoint, a config or a directory
    Case("predict-out-onto-run-metrics", predict(VA, f"{VA}/metrics.json"), 2, (f"{VA}/metrics.json",)),
    Case("predict-out-onto-other-run-config", predict(VA, f"{AU}/config.json"), 2, (f"{AU}/config.json",)),
    Case("predict-out-onto-checkpoint", predict(VA, f"{AU}/checkpoint.pt"), 2, (f"{AU}/checkpoint.pt",)),
    Case("predict-out-onto-cache", predict(VA, CACHE), 2, (CACHE,)),
    Case("predict-out-names-a-directory", predict(VA, "runs"), 2, ("runs", "--out")),
    Case("train-head-out-onto-cache", train("va", CACHE), 2, (CACHE, "--out")),
    Case("train-head-out-onto-checkpoint", train("va", f"{AU}/checkpoint.pt"), 2, (f"{AU}/checkpoint.pt",)),
    # -- checkpoints, encoders and configs that do not belong together
    Case("evaluate-checkpoint-of-another-task", ("evaluate", VA), 2, (f"{VA}/checkpoint.pt",),
         copy_file(f"{AU}/checkpoint.pt", f"{VA}/checkpoint.pt")),
    Case("predict-checkpoint-of-another-task", predict(VA, "p.txt"), 2, (f"{VA}/checkpoint.pt",),
         copy_file(f"{AU}/checkpoint.pt", f"{VA}/checkpoint.pt")),
    Case("train-head-backbone-clip-with-ddamfn-cache",
         (*train("va", "runs/clip"), "--backbone", "clip", "--cache", CACHE), 2, ("--backbone", "ddamfn")),
    Case("evaluate-garbage-config", ("evaluate", VA), 2, (f"{VA}/config.json",), _garbage_config(VA)),
    Case("predict-garbage-config", predict(VA, "p.txt"), 2, (f"{VA}/config.json",), _garbage_config(VA)),
    Case("evaluate-not-a-run", ("evaluate", DATA), 2, (DATA,)),
    # -- a full disk is one line, and what was there stays (simulated: every atomic write fails with ENOSPC)
    Case("train-head-disk-full-first-write", train("va", "runs/new"), 2, ("runs/new", "no space left"),
         disk_full_after=0),
    Case("train-head-disk-full-checkpoint", train("va", "runs/new"), 2, ("runs/new", "no space left"),
         disk_full_after=1),
    Case("predict-disk-full", predict(VA, "p.txt"), 2, ("p.txt", "no space left"), disk_full_after=0),
    Case("predict-over-earlier-prediction-needs-overwrite", predict(VA, "p.txt"), 2, ("p.txt", "--overwrite"),
         _previous_prediction),
    Case("predict-disk-full-keeps-previous-file", (*predict(VA, "p.txt"), "--overwrite"), 2,
         ("p.txt", "its previous content"), _previous_prediction, disk_full_after=0),
]


@pytest.mark.parametrize("case", params(CASES))
def test_stage_two_fault(case: Case, request: pytest.FixtureRequest, world: Path, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch, full_disk: Callable[[int], object]) -> None:
    if case.killed:
        request.getfixturevalue("killed_run")  # into the world, before it is copied
    run_case(case, copy_world(world, tmp_path, monkeypatch), full_disk)


def test_predict_split_train_is_supported_and_documented_or_refused(workspace: Path) -> None:
    """``predict --split train``: either refused in one line naming --split, or supported and documented."""
    before = snapshot(workspace)
    outcome = run_cli(predict(VA, "p.txt", split="train"))
    if outcome.exit_code == 0:
        assert_fault(outcome, exit_code=0, names=("p.txt",), before=before, root=workspace, channel="ok")
        assert "train" in run_cli(("predict", "--help")).stdout.split("--split", 1)[1].split("\n")[0]
    else:
        assert_fault(outcome, exit_code=2, names=("--split",), before=before, root=workspace)




def test_train_head_into_a_real_full_tmpfs(workspace: Path, small_tmpfs: Callable[[int], Path]) -> None:
    """A real full device (tmpfs): the run directory cannot be written; one line, nothing else touched."""
    disk = small_tmpfs(512)
    fill(disk, leave_kib=8)
    roots = {"": workspace, "tmpfs/": disk}
    before = snapshot(roots)
    outcome = run_cli(train("va", str(disk / "run")))
    assert_fault(outcome, exit_code=2, names=(str(disk / "run"), "no space left on the device"),
                 before=before, root=roots)

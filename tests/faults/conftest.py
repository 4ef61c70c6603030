"""Fixtures of the fault suite (machinery and the case table format: helpers.py; promises: docs/failures.md).

The world (``world``, built once per session by the real commands, with paths relative to its root): a
synthetic Aff-Wild2 tree rendered by ``abawfeat synth`` (``aff/``), its DDAMFN ``--random-init`` cache
extracted by ``abawfeat extract`` at the default path (``cache/aff/ddamfn.h5``), and two complete
``train-head`` runs (``runs/va``, ``runs/au``). ``workspace`` copies the whole world for one case and makes
it the current directory, so that every relative path in the runs' config.json points into the copy and
nothing a case does can reach another case or the world.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .helpers import (
    CACHE,
    CV,
    DATA,
    ENS,
    FUSED,
    GRID,
    KILLED,
    KILLED_CV,
    KILLED_EPOCHS,
    RUNS,
    TRAIN,
    VA2,
    FullDisk,
    run_cli,
    subprocess_env,
)


def _run_steps(root: Path, steps: list[list[str]]) -> None:
    """Run each command line in ``root`` (every one must succeed), then restore the working directory and
    torch's thread count, which the in-process CLI changes."""
    import torch

    before, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(root)
    try:
        for argv in steps:
            outcome = run_cli(argv)
            assert outcome.exit_code == 0, (argv, outcome.stdout, outcome.stderr)
    finally:
        os.chdir(before)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared world's root (a few seconds to build on two idle cores)."""
    from abawfeat.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("faults-world")
    generate(SynthConfig(videos=6, frames=10, seed=0), root / DATA)  # 57 crops
    _run_steps(root, [
        ["extract", "--backbone", "ddamfn", "--random-init", "--data", DATA, "--workers", "0",
         "--no-compile", "--device", "cpu"],
        ["train-head", "--task", "va", "--data", DATA, "--out", RUNS["va"], *TRAIN],
        ["train-head", "--task", "au", "--data", DATA, "--out", RUNS["au"], *TRAIN],
    ])
    return root


@pytest.fixture(scope="session")
def killed_run(world: Path) -> Path:
    """A train-head run killed with SIGKILL in the middle of training (a real process, a real kill): it has
    its first files (config.json, the history of its first epochs) but not metrics.json. One-frame batches
    make an epoch last tens of milliseconds, so that the kill lands after two epochs and long before the
    last (a resumed run then finishes the rest in seconds)."""
    run = world / KILLED
    history = run / "history.csv"
    # Two finished epochs (a header and two rows): the run has something to resume from.
    _kill_when(["train-head", "--task", "va", "--data", DATA, "--out", KILLED, "--epochs", str(KILLED_EPOCHS),
                "--batch-size", "1", "--no-plots", "--threads", "1", "--device", "cpu"], world,
               lambda: history.is_file() and len(history.read_text().splitlines()) >= 3,
               "train-head", "its second epoch")
    assert not (run / "metrics.json").exists()
    return run


@pytest.fixture(scope="session")
def new_world(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The newer commands' world (about 15 s): a copy of the world whose synthetic tree also has its source
    videos with sound (the same crops and labels), a wav2vec2 cache of them (``--encoder-opt size=tiny``),
    a second VA run with tuned smoothing (``runs/va2``), an ensemble of the two VA runs (``runs/ens``), a
    2-fold cross-validation (``runs/cv``) and a VA run on the DDAMFN and audio caches fused
    (``runs/fused``)."""
    from abawfeat.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("faults-new-world") / "w"
    shutil.copytree(world, root, symlinks=True, ignore=shutil.ignore_patterns("killed"))
    generate(SynthConfig(videos=6, frames=10, seed=0, videos_with_audio=True), root / DATA)
    _run_steps(root, [
        ["extract", "--backbone", "wav2vec2", "--random-init", "--encoder-opt", "size=tiny", "--data",
         DATA, "--workers", "0", "--device", "cpu"],
        ["train-head", "--task", "va", "--data", DATA, "--out", VA2, "--seed", "1", "--smooth", "auto",
         *TRAIN],
        ["ensemble", RUNS["va"], VA2, "--out", ENS, "--smooth", "auto"],
        ["cv", "--folds", "2", "--task", "va", "--data", DATA, "--out", CV, *TRAIN],
        ["train-head", "--task", "va", "--data", DATA, "--cache", CACHE, "--cache",
         f"cache/{DATA}/wav2vec2.h5", "--out", FUSED, "--smooth", "auto", *TRAIN],
    ])
    return root


def _kill_when(argv: list[str], cwd: Path, done: Path | Callable[[], bool], what: str,
               moment: str = "") -> None:
    """Start ``python -m abawfeat *argv`` in ``cwd`` and SIGKILL it as soon as ``done`` exists (a path) or
    holds (a condition); ``moment`` names it in the failure message."""
    ready = done.exists if isinstance(done, Path) else done
    moment = moment or f"{done} existed"
    proc = subprocess.Popen([sys.executable, "-m", "abawfeat", *argv], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
                raise AssertionError(f"{what} ended or stalled before {moment}: {err}")
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


# One-frame batches make an epoch of these last tens of milliseconds: a fold or a cell lasts about a second,
# so that the kill lands after the first one and long before the second ends.
SLOW = ("--epochs", "30", "--batch-size", "1", "--no-plots", "--threads", "1", "--device", "cpu")


@pytest.fixture(scope="session")
def killed_cv(new_world: Path) -> Path:
    """``abawfeat cv --folds 2`` killed with SIGKILL once its first fold is complete (a real process, a real
    kill): fold-0 complete, fold-1 absent or interrupted, no record of the cross-validation itself."""
    run = new_world / KILLED_CV
    _kill_when(["cv", "--folds", "2", "--task", "va", "--data", DATA, "--out", KILLED_CV, *SLOW], new_world,
               run / "fold-0" / "metrics.json", "cv")
    assert not (run / "metrics.json").exists()
    return run


KILLED_GRID_RECIPE = f"""[grid]
out = "{GRID}"
data = "{DATA}"
[defaults]
epochs = 30
batch_size = 1
plots = false
threads = 1
device = "cpu"
[[rows]]
label = "FC a"
backbone = "ddamfn"
head = "fc"
tasks = ["va"]
[[rows]]
label = "FC b"
backbone = "ddamfn"
head = "fc"
tasks = ["va"]
lr = 0.002
[[ensembles]]
label = "Both"
tasks = ["va"]
members = ["FC a", "FC b"]
"""


@pytest.fixture(scope="session")
def killed_grid(new_world: Path) -> Path:
    """``abawfeat ablate grid.toml`` (two rows and an ensemble of them) killed with SIGKILL once its first
    cell is complete."""
    (new_world / "grid.toml").write_text(KILLED_GRID_RECIPE)
    grid = new_world / GRID
    _kill_when(["ablate", "grid.toml", "--jobs", "1"], new_world, grid / "fc-a" / "va" / "metrics.json",
               "ablate")
    assert not (grid / "results.md").exists()
    return grid


def copy_world(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the world, made the current directory for the case."""
    root = tmp_path / "ws"
    shutil.copytree(world, root, symlinks=True)
    # Ensembles and cross-validations also name their members by absolute path (their fallback when the
    # relative one is gone): point those into the copy, so that a case never reaches the world's runs.
    for record in root.rglob("config.json"):
        text = record.read_text()
        if f"{world}{os.sep}" in text:
            record.write_text(text.replace(f"{world}{os.sep}", f"{root}{os.sep}"))
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def workspace(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return copy_world(world, tmp_path, monkeypatch)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], FullDisk]:
    """``full_disk(n)``: the device fills after ``n`` successful atomic writes (portable: no mount)."""
    # Import every module of the package first, so that each one's own reference to atomic_write (taken by
    # `from abawfeat.utils.io import atomic_write`) exists now and gets patched.
    import importlib
    import pkgutil

    import abawfeat

    for info in pkgutil.walk_packages(abawfeat.__path__, "abawfeat."):
        importlib.import_module(info.name)
    return lambda allow: FullDisk(monkeypatch, allow)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``small_tmpfs(kib)``: a real tmpfs of that size, mounted under tmp_path and unmounted after the test;
    skipped where mounting is not allowed (not root, not Linux), where ``full_disk`` still covers the case."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        where = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a real tmpfs needs root on Linux")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    gc.collect()  # a failed writer's file object may still hold a file there open
    for where in mounted:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)  # detach now, free when unused

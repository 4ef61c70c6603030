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

from .helpers import DATA, KILLED, KILLED_EPOCHS, RUNS, TRAIN, FullDisk, run_cli, subprocess_env


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared world's root (a few seconds to build on two idle cores)."""
    import torch

    from abawfeat.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("faults-world")
    generate(SynthConfig(videos=6, frames=10, seed=0), root / DATA)  # 57 crops
    before, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(root)
    try:
        steps = [
            ["extract", "--backbone", "ddamfn", "--random-init", "--data", DATA, "--workers", "0",
             "--no-compile", "--device", "cpu"],
            ["train-head", "--task", "va", "--data", DATA, "--out", RUNS["va"], *TRAIN],
            ["train-head", "--task", "au", "--data", DATA, "--out", RUNS["au"], *TRAIN],
        ]
        for argv in steps:
            outcome = run_cli(argv)
            assert outcome.exit_code == 0, (argv, outcome.stdout, outcome.stderr)
    finally:
        os.chdir(before)
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="session")
def killed_run(world: Path) -> Path:
    """A train-head run killed with SIGKILL in the middle of training (a real process, a real kill): it has
    its first files (config.json, the history of its first epochs) but not metrics.json. One-frame batches
    make an epoch last tens of milliseconds, so that the kill lands after two epochs and long before the
    last (a resumed run then finishes the rest in seconds)."""
    run = world / KILLED
    proc = subprocess.Popen(
        [sys.executable, "-m", "abawfeat", "train-head", "--task", "va", "--data", DATA, "--out", KILLED,
         "--epochs", str(KILLED_EPOCHS), "--batch-size", "1", "--no-plots", "--threads", "1", "--device",
         "cpu"],
        cwd=world, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    history = run / "history.csv"
    try:
        deadline = time.monotonic() + 180
        # Two finished epochs (a header and two rows): the run has something to resume from.
        while not (history.is_file() and len(history.read_text().splitlines()) >= 3):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
                raise AssertionError(f"train-head ended or stalled before its second epoch: {err}")
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert not (run / "metrics.json").exists()
    return run


def copy_world(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the world, made the current directory for the case."""
    root = tmp_path / "ws"
    shutil.copytree(world, root, symlinks=True)
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

"""Fault cases of issue 24, per class: artefacts that do not belong together (a cache and another crop
tree, the same cache twice, a member changed under an ensemble), cache contents that pass the checksums
but are wrong, two writers in one folder, signals that must reach every worker, outputs aimed at the wrong
place, messages that must be true, and the tracebacks the operating system used to cause. Each case makes
the three assertions of helpers.assert_fault on its own copy of the newer commands' world plus two other
crop trees (``other_trees``): ``oth``, the world's tree with other crop images and one crop fewer (the
same video names), and ``s1``, a synthetic tree of another seed (other names), each with its DDAMFN cache
(``cache/oth/ddamfn.h5``, ``cache/s1/ddamfn.h5``)."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from .conftest import _run_steps, copy_world
from .helpers import (
    AUDIO_CACHE,
    CACHE,
    CROPS,
    CV,
    DATA,
    ENS,
    RUNS,
    TEST_VIDEO,
    TRAIN,
    TRAIN_VIDEO,
    VA2,
    VAL_VIDEO,
    Case,
    Outcome,
    assert_fault,
    both,
    params,
    restamp,
    run_case,
    run_cli,
    snapshot,
    subprocess_env,
    write_text,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VA, AU = RUNS["va"], RUNS["au"]
OTH, S1 = "oth", "s1"
OTH_CACHE, S1_CACHE = f"cache/{OTH}/ddamfn.h5", f"cache/{S1}/ddamfn.h5"
FACE_EXTRACT = ("extract", "--backbone", "ddamfn", "--random-init", "--workers", "0", "--no-compile",
                "--device", "cpu")
AUDIO_EXTRACT = ("extract", "--backbone", "wav2vec2", "--random-init", "--encoder-opt", "size=tiny", "--data",
                 DATA, "--workers", "0", "--device", "cpu")
RECIPE = "r.toml"


def train(out: str, *extra: str, data: str = DATA) -> tuple[str, ...]:
    return ("train-head", "--task", "va", "--data", data, "--out", out, *TRAIN, *extra)


def recipe(out: str = "grid", rows: str = "") -> str:
    rows = rows or 'label = "FC"\nbackbone = "ddamfn"\nhead = "fc"\ntasks = ["va"]\n'
    return (f'[grid]\nout = "{out}"\ndata = "{DATA}"\n[defaults]\nepochs = 2\nplots = false\nthreads = 1\n'
            f'device = "cpu"\nlr = 0.01\n[[rows]]\n{rows}')


@pytest.fixture(scope="session")
def other_trees(new_world: Path) -> Path:
    """Two other crop trees in the newer commands' world, each extracted (about 10 s)."""
    from abawfeat.data.synth import SynthConfig, generate

    oth = new_world / OTH
    if not oth.exists():
        shutil.copytree(new_world / DATA, oth, ignore=shutil.ignore_patterns("videos"))
        for folder in (oth / "cropped_aligned").iterdir():
            crops = sorted(folder.glob("*.jpg"))
            images = [p.read_bytes() for p in crops]
            for k, path in enumerate(crops):  # each crop gets its neighbour's image: same frame numbers
                path.write_bytes(images[(k + 1) % len(images)])
        crops = sorted((oth / "cropped_aligned" / TRAIN_VIDEO).glob("*.jpg"))
        crops[-1].unlink()  # and one video has one crop fewer
        generate(SynthConfig(videos=6, frames=10, seed=1), new_world / S1)
        _run_steps(new_world, [[*FACE_EXTRACT, "--data", OTH], [*FACE_EXTRACT, "--data", S1]])
    return new_world


@pytest.fixture
def ws(other_trees: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return copy_world(other_trees, tmp_path, monkeypatch)


# ---------------------------------------------------------------------------------------------- damage


Change = Callable[[np.ndarray], np.ndarray]


def _rewrite(cache: str, video: str, **datasets: Change) -> Callable[[Path], None]:
    """Replace datasets of a video with checksummed new contents and re-sign the attributes: what a buggy
    writer (not a failing disk) would leave, so that the checksums pass and the content checks must act."""
    def damage(root: Path) -> None:
        from abawfeat.cache import _create_checked

        with h5py.File(root / cache, "r+") as fh:
            group = fh[f"videos/{video}"]
            for name, change in datasets.items():
                value = change(group[name][()])
                del group[name]
                _create_checked(group, name, value)
        restamp(root / cache)

    return damage


def _crops_attr(cache: str, value: str | None, video: str | None = None) -> Callable[[Path], None]:
    """Set (or, with None, remove: a cache written before the attribute existed) ``crops_sha256``."""
    def damage(root: Path) -> None:
        from abawfeat.cache import CROPS_ATTR

        with h5py.File(root / cache, "r+") as fh:
            for name, group in fh["videos"].items():
                if video is None or name == video:
                    if value is None:
                        group.attrs.pop(CROPS_ATTR, None)
                    else:
                        group.attrs[CROPS_ATTR] = value
        restamp(root / cache)

    return damage


def _remove_crop(video: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        sorted((root / CROPS / video).glob("*.jpg"))[-1].unlink()

    return damage


def _swap_crop_image(video: str) -> Callable[[Path], None]:
    """The video's first crop replaced by another image (the tree re-cropped after extraction)."""
    def damage(root: Path) -> None:
        crops = sorted((root / CROPS / video).glob("*.jpg"))
        crops[0].write_bytes(crops[1].read_bytes())

    return damage


def _symlink(link: str, target: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (root / link).parent.mkdir(parents=True, exist_ok=True)
        (root / link).symlink_to(target)

    return damage


def _copy_over(src: str, dst: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        shutil.copyfile(root / src, root / dst)

    return damage


_HELD: list[int] = []


def _hold_lock(folder: str) -> Callable[[Path], None]:
    """Another command writing ``folder``: its writer lock held (by this process, through another open file
    description, which flock treats as another writer)."""
    def damage(root: Path) -> None:
        from abawfeat.train.rundir import writer_lock_path

        lock = writer_lock_path(root / folder)
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _HELD.append(fd)

    return damage


@pytest.fixture(autouse=True)
def _release_held() -> object:
    yield
    while _HELD:
        os.close(_HELD.pop())


# ---------------------------------------------------------------------------------------------- checks


def _warned_old_cache(root: Path, outcome: Outcome) -> None:
    assert "frame numbers only" in outcome.stderr, outcome.stderr


def _no_resume(root: Path, outcome: Outcome) -> None:
    assert "--resume" not in outcome.stderr and "abawfeat cv" in outcome.stderr, outcome.stderr


def _not_cached(video: str) -> Callable[[Path, Outcome], None]:
    def check(root: Path, outcome: Outcome) -> None:
        with h5py.File(root / "x.h5", "r") as fh:
            assert video not in fh["videos"], f"{video} was cached from a file that is not its video"

    return check


LONG = "r" * 300  # longer than any file system's name limit
LONG_OK = "v" * 250  # a valid name whose staging sibling (.NAME.new-PID) would not be

CASES = [
    # -- 1. a cache and a crop tree that do not belong together; the same cache twice
    Case("train-head-cache-of-another-tree-same-names", train("runs/new", "--cache", OTH_CACHE), 2,
         (OTH_CACHE, DATA, "another crop tree")),
    Case("train-head-another-tree-with-its-caches-labels",
         train("runs/new", "--cache", CACHE, data=OTH), 2,
         (CACHE, OTH, "another crop tree")),
    Case("cv-cache-of-another-tree",
         ("cv", "--folds", "2", "--task", "va", "--data", DATA, "--out", "runs/cvn", "--cache", OTH_CACHE,
          *TRAIN), 2, (OTH_CACHE, "another crop tree")),
    Case("train-head-fused-audio-cache-of-another-tree", train("runs/new", "--cache", CACHE, "--cache",
                                                              AUDIO_CACHE), 2,
         (AUDIO_CACHE, "another crop tree", "other crop images"), _crops_attr(AUDIO_CACHE, "0" * 64)),
    Case("evaluate-data-of-another-tree", ("evaluate", VA, "--data", OTH), 2,
         (CACHE, OTH, "another crop tree")),
    Case("ensemble-data-of-another-tree",
         ("ensemble", VA, VA2, "--out", "runs/e2", "--data", OTH), 2,
         (CACHE, OTH, "another crop tree")),
    Case("predict-data-of-another-tree",
         ("predict", VA, "--split", "test", "--out", "p.txt", "--data", OTH), 2,
         (CACHE, OTH, "another crop tree")),
    Case("extract-out-onto-another-trees-cache-same-names", (*FACE_EXTRACT, "--data", OTH, "--out", CACHE), 2,
         (CACHE, OTH, "another crop tree")),
    Case("extract-out-onto-another-trees-cache-other-names",
         (*FACE_EXTRACT, "--data", DATA, "--out", S1_CACHE, "--videos", TEST_VIDEO), 2,
         (S1_CACHE, DATA, "another crop tree")),
    Case("train-head-tree-lost-a-crop-after-extraction", train("runs/new"), 2,
         (CACHE, TRAIN_VIDEO, "has no crop there"), _remove_crop(TRAIN_VIDEO)),
    Case("train-head-tree-recropped-after-extraction", train("runs/new"), 2,
         (CACHE, TRAIN_VIDEO, "other crop images"), _swap_crop_image(TRAIN_VIDEO)),
    Case("evaluate-fused-run-tree-recropped", ("evaluate", "runs/fused"), 2, ("other crop images",),
         _swap_crop_image(VAL_VIDEO)),
    Case("train-head-cache-written-before-crop-identity-is-accepted-with-a-warning", train("runs/new"), 0,
         ("runs/new",), _crops_attr(CACHE, None), channel="ok", check=_warned_old_cache),
    Case("train-head-old-cache-of-another-tree-refused-by-frames",
         train("runs/new", "--cache", OTH_CACHE), 2, (OTH_CACHE, "another crop tree", "10 frames"),
         _crops_attr(OTH_CACHE, None)),
    Case("train-head-same-cache-twice-through-a-symlink", train("runs/new", "--cache", CACHE, "--cache",
                                                               "cache/link.h5"), 2,
         ("cache/link.h5", CACHE, "same file"), _symlink("cache/link.h5", "aff/ddamfn.h5")),
    Case("train-head-same-cache-by-two-relative-paths", train("runs/new", "--cache", CACHE, "--cache",
                                                             f"./cache/../{CACHE}"), 2, ("same file",)),
    Case("verify-tree-lost-a-crop", ("cache", "verify", CACHE, "--data", DATA), 1,
         (CACHE, TRAIN_VIDEO, "another crop tree"), _remove_crop(TRAIN_VIDEO), channel="report"),
    # -- 2. contents that pass the checksums but are wrong
    Case("train-head-frames-all-equal", train("runs/new"), 2, (CACHE, TRAIN_VIDEO, "more than once"),
         _rewrite(CACHE, TRAIN_VIDEO, frames=lambda f: np.full_like(f, f[0]))),
    Case("verify-frames-all-equal", ("cache", "verify", CACHE), 1, (TRAIN_VIDEO, "more than once"),
         _rewrite(CACHE, TRAIN_VIDEO, frames=lambda f: np.full_like(f, f[0])), channel="report"),
    Case("train-head-frames-beyond-the-crops", train("runs/new"), 2,
         (CACHE, TRAIN_VIDEO, "has no crop there"),
         _rewrite(CACHE, TRAIN_VIDEO, frames=lambda f: f + 1000)),
    Case("verify-frames-beyond-the-crops", ("cache", "verify", CACHE), 1, (TRAIN_VIDEO, "another crop tree"),
         _rewrite(CACHE, TRAIN_VIDEO, frames=lambda f: f + 1000), channel="report"),
    Case("train-head-frames-descending", train("runs/new"), 2, (CACHE, TRAIN_VIDEO, "ascending"),
         _rewrite(CACHE, TRAIN_VIDEO, frames=lambda f: f[::-1].copy())),
    Case("train-head-nan-features", train("runs/new"), 2, (CACHE, TRAIN_VIDEO, "NaN/inf"),
         _rewrite(CACHE, TRAIN_VIDEO, features=lambda x: np.where(np.arange(x.size).reshape(x.shape) == 3,
                                                                   np.nan, x).astype(x.dtype))),
    Case("evaluate-inf-features-in-audio-cache", ("evaluate", "runs/fused"), 2, (AUDIO_CACHE, "NaN/inf"),
         _rewrite(AUDIO_CACHE, VAL_VIDEO, features=lambda x: np.full_like(x, np.inf))),
    Case("verify-nan-features", ("cache", "verify", CACHE), 1, (TRAIN_VIDEO, "NaN/inf"),
         _rewrite(CACHE, TRAIN_VIDEO, features=lambda x: np.full_like(x, np.nan)), channel="report"),
    # -- 3. a member changed under an ensemble or a cross-validation
    Case("evaluate-ensemble-member-checkpoint-replaced", ("evaluate", ENS), 2, (ENS, VA, "checkpoint.pt"),
         _copy_over(f"{VA2}/checkpoint.pt", f"{VA}/checkpoint.pt")),
    Case("predict-ensemble-member-checkpoint-replaced", ("predict", ENS, "--split", "test", "--out", "p.txt"),
         2, (ENS, "checkpoint.pt"), _copy_over(f"{VA2}/checkpoint.pt", f"{VA}/checkpoint.pt")),
    Case("predict-cv-fold-checkpoint-replaced", ("predict", CV, "--split", "test", "--out", "p.txt"), 2,
         (CV, f"{CV}/fold-0", "checkpoint.pt"), _copy_over(f"{CV}/fold-1/checkpoint.pt",
                                                             f"{CV}/fold-0/checkpoint.pt")),
    # -- 4. two writers in one folder: the second is refused at once
    Case("train-head-second-writer", train("runs/new"), 2, ("runs/new", "another abawfeat command"),
         _hold_lock("runs/new")),
    Case("train-head-overwrite-second-writer", train(VA, "--overwrite"), 2, (VA, "another abawfeat command"),
         _hold_lock(VA)),
    Case("cv-second-writer", ("cv", "--folds", "2", "--task", "va", "--data", DATA, "--out", "runs/cvn",
                              *TRAIN), 2, ("runs/cvn", "another abawfeat command"), _hold_lock("runs/cvn")),
    Case("ensemble-second-writer", ("ensemble", VA, VA2, "--out", "runs/e2"), 2,
         ("runs/e2", "another abawfeat command"), _hold_lock("runs/e2")),
    Case("ablate-second-writer", ("ablate", RECIPE, "--jobs", "1"), 2, ("grid", "another abawfeat command"),
         both(write_text(RECIPE, recipe()), _hold_lock("grid"))),
    Case("ablate-cell-being-written", ("ablate", RECIPE, "--jobs", "1"), 1, ("FAILED", "another abawfeat"),
         both(write_text(RECIPE, recipe()), _hold_lock("grid/fc/va")), channel="ok", may_change=("grid",)),
    # -- 6. outputs aimed at the wrong place
    Case("ablate-out-onto-a-complete-run", ("ablate", RECIPE, "--out", VA, "--jobs", "1"), 2,
         (VA, "run directory"), write_text(RECIPE, recipe())),
    Case("ablate-out-inside-a-run", ("ablate", RECIPE, "--out", f"{VA}/grid", "--jobs", "1"), 2,
         (VA, "inside"), write_text(RECIPE, recipe())),
    Case("ablate-out-onto-an-ensemble", ("ablate", RECIPE, "--out", ENS, "--jobs", "1"), 2,
         (ENS, "run directory"), write_text(RECIPE, recipe())),
    Case("ablate-out-inside-the-data-tree", ("ablate", RECIPE, "--out", f"{DATA}/grid", "--jobs", "1"), 2,
         (DATA, "data tree"), write_text(RECIPE, recipe())),
    Case("ablate-out-inside-another-crop-tree", ("ablate", RECIPE, "--out", f"{S1}/grid", "--jobs", "1"), 2,
         (S1, "data tree"), write_text(RECIPE, recipe())),
    Case("ablate-out-onto-a-cv-fold", ("ablate", RECIPE, "--out", f"{CV}/fold-0", "--jobs", "1"), 2,
         (f"{CV}/fold-0", "run directory"), write_text(RECIPE, recipe())),
    Case("ablate-labels-in-one-folder", ("ablate", RECIPE, "--dry-run"), 2, (RECIPE, "'FC-a'", "'fc-a'"),
         write_text(RECIPE, recipe(rows='label = "FC a"\nbackbone = "ddamfn"\nhead = "fc"\ntasks = ["va"]\n'
                                        '[[rows]]\nlabel = "FC-a"\nbackbone = "ddamfn"\nhead = "fc"\n'
                                        'tasks = ["va"]\n'))),
    Case("ablate-ensemble-label-in-a-rows-folder", ("ablate", RECIPE, "--dry-run"), 2,
         (RECIPE, "[[ensembles]] #1", "'fc'"),
         write_text(RECIPE, recipe() + '[[ensembles]]\nlabel = "fc"\ntasks = ["va"]\nmembers = ["FC"]\n')),
    # -- 7. messages that must be true
    Case("ensemble-of-an-ensemble", ("ensemble", VA, ENS, "--out", "runs/e2"), 2, (ENS, "an ensemble run")),
    Case("train-head-out-a-dangling-symlink", train("runs/link"), 2,
         ("runs/link", "symbolic link", "nowhere"), _symlink("runs/link", "nowhere")),
    Case("extract-out-under-a-dangling-symlink", (*FACE_EXTRACT, "--data", DATA, "--out", "gone/c.h5"), 2,
         ("gone", "symbolic link"), _symlink("gone", "missing-folder")),
    Case("cv-disk-full-in-a-fold-says-run-cv-again", ("cv", "--folds", "2", "--task", "va", "--data", DATA,
                                                      "--out", "runs/cvn", *TRAIN), 2,
         ("no space left", "abawfeat cv"), disk_full_after=1, check=_no_resume),
    Case("extract-audio-image-named-mp4-not-cached-as-silent", (*AUDIO_EXTRACT, "--out", "x.h5"), 0,
         (f"{TEST_VIDEO}.mp4", "not the video"), _copy_over(f"{CROPS}/{TEST_VIDEO}/00001.jpg",
                                                           f"{DATA}/videos/batch1/{TEST_VIDEO}.mp4"),
         channel="ok", check=_not_cached(TEST_VIDEO)),
    # -- 8. what the operating system refuses: one line
    Case("train-head-out-name-too-long", train(f"runs/{LONG}"), 2, ("longer than the file system allows",)),
    Case("extract-out-name-too-long", (*FACE_EXTRACT, "--data", DATA, "--out", f"{LONG}.h5"), 2,
         ("longer than the file system allows",)),
    Case("train-head-diverged-is-one-line", train("runs/new", "--lr", "1e30"), 2, ("diverged", "--lr")),
    Case("train-head-overwrite-long-name-staging-fits", train(f"runs/{LONG_OK}", "--overwrite"), 0,
         (), lambda root: _run_ok(train(f"runs/{LONG_OK}")), channel="ok",
         may_change=(f"runs/{LONG_OK}",)),
]


def test_same_cache_absolute_and_relative(ws: Path) -> None:
    before = snapshot(ws)
    outcome = run_cli(train("runs/new", "--cache", CACHE, "--cache", str(ws / CACHE)))
    assert_fault(outcome, exit_code=2, names=("same file", str(ws / CACHE)), before=before, root=ws)


def _run_ok(argv: tuple[str, ...]) -> None:
    outcome = run_cli(argv)
    assert outcome.exit_code == 0, outcome.output


@pytest.mark.parametrize("case", params(CASES))
def test_belonging_fault(case: Case, ws: Path, full_disk: Callable[[int], object]) -> None:
    run_case(case, ws, full_disk)


def test_overwrite_in_a_read_only_runs_folder(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runs folder that cannot be written (the new run is built beside the old one): one line naming the
    folder, the old run intact. (Tests run as root, whom a chmod does not stop: the refusal is raised where
    the operating system would raise it, when the staging folder is made.)"""
    import abawfeat.train.rundir as rundir

    real = rundir.staging_path

    def read_only(target: Path) -> Path:
        staging = real(target)
        raise PermissionError(13, "Permission denied", str(staging))

    monkeypatch.setattr(rundir, "staging_path", read_only)
    before = snapshot(ws)
    outcome = run_cli(train(VA, "--overwrite"))
    assert_fault(outcome, exit_code=2, names=("runs/.va.new-", "permission denied"), before=before, root=ws)


def test_abawfeat_home_that_is_a_file(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (ws / "home").write_text("not a folder\n")
    monkeypatch.setenv("ABAWFEAT_HOME", str(ws / "home"))
    before = snapshot(ws)
    outcome = run_cli(("extract", "--backbone", "ddamfn", "--data", DATA, "--out", "x.h5", "--workers", "0",
                       "--no-compile", "--device", "cpu"))
    assert_fault(outcome, exit_code=2, names=("ABAWFEAT_HOME", "is a file, not a folder"), before=before,
                 root=ws)


def test_expr_class_absent_from_training_is_said_and_never_nan() -> None:
    """Inverse class weights give a class with no training frame weight 0: a batch of only such frames
    has a loss of 0, not PyTorch's 0 / 0."""
    import torch

    from abawfeat.losses import class_weights_from_counts, expr_ce_loss

    weights = class_weights_from_counts([5, 0, 3, 0, 1, 1, 1, 1], scheme="inverse")
    loss = expr_ce_loss(torch.randn(4, 8), torch.tensor([1, 1, 3, 1]), class_weight=weights)
    assert torch.isfinite(loss) and float(loss) == 0.0
    loss = expr_ce_loss(torch.randn(4, 8), torch.tensor([1, 0, 3, 1]), class_weight=weights)
    assert torch.isfinite(loss) and float(loss) > 0


# ---------------------------------------------------------------------------------- 4, 5: real processes


SLOW_RECIPE = f"""[grid]
out = "sgrid"
data = "{DATA}"
[defaults]
epochs = 400
batch_size = 1
plots = false
threads = 1
device = "cpu"
[[rows]]
label = "A"
backbone = "ddamfn"
head = "fc"
tasks = ["va"]
[[rows]]
label = "B"
backbone = "ddamfn"
head = "fc"
tasks = ["va"]
lr = 0.002
"""


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (Linux /proc)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            for k in kids:
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="reads the process tree from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_ablate_jobs_signal_reaches_every_worker(ws: Path, sig: signal.Signals) -> None:
    """``ablate --jobs 2`` sent SIGTERM or SIGINT (to the parent alone, as a scheduler or ``kill`` does):
    its workers are told too and waited for; no process outlives the command; one ``interrupted:`` line;
    the grid's cells stay resumable (nothing complete is lost: none was complete)."""
    (ws / "slow.toml").write_text(SLOW_RECIPE)
    proc = subprocess.Popen([sys.executable, "-m", "abawfeat", "ablate", "slow.toml", "--jobs", "2"], cwd=ws,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        histories = [ws / "sgrid" / "a" / "va" / "history.csv", ws / "sgrid" / "b" / "va" / "history.csv"]
        while not all(h.is_file() for h in histories):  # both workers are training
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "worker processes outlived the command"
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = [line for line in (out + err).splitlines() if line.startswith(("error: ", "interrupted: "))]
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), err
    for h in histories:  # interrupted, not complete: a re-run resumes them
        assert not (h.parent / "metrics.json").exists()


def test_two_real_train_heads_into_one_new_folder(ws: Path) -> None:
    """Two ``train-head`` processes into the same new ``--out``: the second is refused at once, the first
    finishes, and the run is the first's alone."""
    slow = ["train-head", "--task", "va", "--data", DATA, "--out", "runs/two", "--epochs", "60",
            "--batch-size", "1", "--no-plots", "--threads", "1", "--device", "cpu"]
    first = subprocess.Popen([sys.executable, "-m", "abawfeat", *slow], cwd=ws, env=subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (ws / "runs" / "two" / "config.json").is_file():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        again = ["train-head", "--task", "va", "--data", DATA, "--out", "runs/two", "--epochs", "2", "--lr",
                 "0.05", "--no-plots", "--threads", "1", "--device", "cpu"]
        second = subprocess.run([sys.executable, "-m", "abawfeat", *again], cwd=ws, env=subprocess_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert "another abawfeat command is writing this run" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
        if first.stderr:
            first.stderr.close()

"""Fault cases of the commands added after the first fault suite: ``cv``, ``ensemble``, ``ablate`` (grid
outputs, [[ensembles]]), ``finetune``, ``synth``, ``extract`` with an audio encoder, ``train-head`` on fused
caches and ``--smooth auto``, and ``evaluate`` / ``predict`` / ``report`` of ensemble and cross-validation
runs. Each case makes the three assertions of helpers.assert_fault on its own copy of the newer commands'
world (conftest.new_world), in the classes of issue 13: outputs that must never land on an artefact, work
interrupted (real ``kill -9``) and re-run, damaged or mismatched inputs, a full disk, messages printed
literally and bad option values."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import h5py
import pytest

from .conftest import SLOW, copy_world
from .helpers import (
    AUDIO_CACHE,
    CACHE,
    CV,
    DATA,
    ENS,
    FUSED,
    GRID,
    KILLED_CV,
    RUNS,
    TEST_VIDEO,
    TRAIN,
    VA2,
    Case,
    Outcome,
    assert_fault,
    both,
    fill,
    params,
    restamp,
    run_case,
    run_cli,
    snapshot,
    write_text,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VA, AU = RUNS["va"], RUNS["au"]
AUDIO_EXTRACT = ("extract", "--backbone", "wav2vec2", "--random-init", "--encoder-opt", "size=tiny", "--data",
                 DATA, "--workers", "0", "--device", "cpu")
FACE_EXTRACT = ("extract", "--backbone", "ddamfn", "--random-init", "--data", DATA, "--workers", "0",
                "--no-compile", "--device", "cpu")
FINETUNE = ("finetune", "--task", "va", "--backbone", "ddamfn", "--random-init", "--data", DATA, "--epochs",
            "1", "--workers", "0", "--device", "cpu", "--no-plots", "--no-augment")
SYNTH = ("synth", "--videos", "3", "--frames", "10", "--workers", "1")
RECIPE = "r.toml"
FUSE = ("--cache", CACHE, "--cache", AUDIO_CACHE)  # the two caches of the fused run, face and audio


def train(out: str, *extra: str) -> tuple[str, ...]:
    return ("train-head", "--task", "va", "--data", DATA, "--out", out, *TRAIN, *extra)


def cv(out: str, *extra: str, folds: str = "2") -> tuple[str, ...]:
    return ("cv", "--folds", folds, "--task", "va", "--data", DATA, "--out", out, *TRAIN, *extra)


def ensemble(*runs: str, out: str = "runs/new", extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return ("ensemble", *runs, "--out", out, *extra)


def predict(run: str, out: str = "p.txt", split: str = "val") -> tuple[str, ...]:
    return ("predict", run, "--split", split, "--out", out)


def recipe(out: str, label: str = "FC", row: str = "") -> str:
    """A one-row grid (a VA head with another learning rate than the world's runs) into ``out``."""
    return (f'[grid]\nout = "{out}"\ndata = "{DATA}"\n[defaults]\nepochs = 2\nplots = false\nthreads = 1\n'
            f'device = "cpu"\nlr = 0.01\n[[rows]]\nlabel = "{label}"\nbackbone = "ddamfn"\nhead = "fc"\n'
            f'tasks = ["va"]\n{row}')


CV_ROW_ENSEMBLE = 'folds = 2\n[[ensembles]]\nlabel = "E"\ntasks = ["va"]\nmembers = ["FC"]\n'


# ---------------------------------------------------------------------------------------------- damage


def _remove(rel: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        import shutil

        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return damage


def _replace_run(src: str, dst: str) -> Callable[[Path], None]:
    """Another complete run put where ``dst`` was (a member retrained by hand, or copied over)."""
    def damage(root: Path) -> None:
        import shutil

        shutil.rmtree(root / dst)
        shutil.copytree(root / src, root / dst)

    return damage


def _cli(*argv: str) -> Callable[[Path], None]:
    """A command that succeeds before the case (a retrained run, an earlier report, a finished grid)."""
    def damage(root: Path) -> None:
        outcome = run_cli(argv)
        assert outcome.exit_code == 0, outcome.output

    return damage


def _re_extracted(rel: str) -> Callable[[Path], None]:
    """A cache extracted again with other encoder settings (another seed): its fingerprint changes."""
    def damage(root: Path) -> None:
        with h5py.File(root / rel, "r") as fh:
            config = json.loads(str(fh.attrs["encoder_config"]).removeprefix("json:"))
        config["seed"] = 7
        restamp(root / rel, encoder_config="json:" + json.dumps(config))

    return damage


def _drop_audio_video(root: Path) -> None:
    with h5py.File(root / AUDIO_CACHE, "r+") as fh:
        del fh[f"videos/{TEST_VIDEO}"]
    restamp(root / AUDIO_CACHE)


# ---------------------------------------------------------------------------------------------- checks


def _no_overwrite_offered(root: Path, outcome: Outcome) -> None:
    """The command has no --overwrite: its message must not offer one."""
    assert "--overwrite" not in outcome.stderr, outcome.stderr


def _no_resume_offered(root: Path, outcome: Outcome) -> None:
    """Ensembles and cross-validations are not continued with --resume: the message must not offer it."""
    assert "--resume" not in outcome.stderr, outcome.stderr


def _complete(run: str) -> Callable[[Path, Outcome], None]:
    def check(root: Path, outcome: Outcome) -> None:
        assert (root / run / "metrics.json").is_file(), f"{run} is not complete"

    return check


def _no_lock_beside(rel: str) -> Callable[[Path, Outcome], None]:
    def check(root: Path, outcome: Outcome) -> None:
        assert not (root / f"{rel}.lock").exists(), "a lock file was left inside a run directory"

    return check


def _grid_finished(root: Path, outcome: Outcome) -> None:
    assert (root / GRID / "results.md").is_file()
    for run in ("fc-a/va", "fc-b/va", "both/va"):
        assert (root / GRID / run / "metrics.json").is_file(), run


SMOOTHING_UNKNOWN_FILTER = json.dumps({"filters": {"va": [{"filter": "box", "window": 5},
                                                          {"filter": "mean", "window": 3}]}})

CASES = [
    # -- outputs never land on an artefact: a run of another kind, a member, a cache, a checkpoint, a file
    Case("cv-out-onto-complete-head-run", cv(VA), 2, (VA, "choose another --out"),
         check=_no_overwrite_offered),
    Case("cv-out-onto-ensemble-run", cv(ENS), 2, (ENS, "choose another --out"), check=_no_overwrite_offered),
    Case("cv-out-onto-cache", cv(CACHE), 2, (CACHE, "--out")),
    Case("cv-out-under-a-file", cv(f"{CACHE}/cv"), 2, (CACHE, "--out")),
    Case("ensemble-out-onto-cv-run", ensemble(VA, VA2, out=CV), 2, (CV, "--overwrite")),
    Case("ensemble-overwrite-onto-its-own-member", ensemble(VA, VA2, out=VA, extra=("--overwrite",)), 2,
         (VA, "member")),
    Case("ensemble-overwrite-onto-run-holding-a-member",
         ensemble(f"{CV}/fold-0", out=CV, extra=("--overwrite",)), 2, (CV, f"{CV}/fold-0")),
    Case("ensemble-out-onto-checkpoint", ensemble(VA, VA2, out=f"{AU}/checkpoint.pt"), 2,
         (f"{AU}/checkpoint.pt", "--out")),
    Case("ensemble-out-under-a-file", ensemble(VA, VA2, out=f"{VA}/metrics.json/ens"), 2,
         (f"{VA}/metrics.json", "--out")),
    Case("report-out-onto-run-metrics", ("report", VA, "--out", f"{AU}/metrics.json"), 2,
         (f"{AU}/metrics.json", "--out")),
    Case("report-out-onto-cache", ("report", ENS, "--out", CACHE), 2, (CACHE, "--out")),
    Case("report-out-onto-a-users-html", ("report", VA, "--out", "notes.html"), 2, ("notes.html", "--out"),
         write_text("notes.html", "<html><body>my notes</body></html>\n")),
    Case("report-out-names-a-directory", ("report", VA, "--out", "runs"), 2, ("runs", "--out")),
    Case("report-replaces-its-earlier-report", ("report", VA, ENS, CV, "--out", "r.html"), 0, ("r.html",),
         _cli("report", VA, "--out", "r.html"), channel="ok", may_change=("r.html",)),
    Case("extract-audio-out-onto-checkpoint", (*AUDIO_EXTRACT, "--out", f"{VA}/checkpoint.pt"), 2,
         (f"{VA}/checkpoint.pt", "not an HDF5"), check=_no_lock_beside(f"{VA}/checkpoint.pt")),
    Case("extract-out-onto-a-text-file", (*FACE_EXTRACT, "--out", "notes.txt"), 2,
         ("notes.txt", "not an HDF5"), write_text("notes.txt", "my notes\n")),
    Case("extract-audio-out-names-a-directory", (*AUDIO_EXTRACT, "--out", VA), 2, (VA, "--out")),
    Case("synth-out-onto-run-dir", (*SYNTH, "--out", VA), 2, (VA, "not a previous synth tree")),
    Case("synth-out-onto-cache", (*SYNTH, "--out", CACHE), 2, (CACHE, "--out")),
    Case("synth-videos-with-audio-out-onto-folder-with-brackets",
         (*SYNTH, "--videos-with-audio", "--out", "d[1]"), 2, ("d[1]", "not a previous synth tree"),
         write_text("d[1]/notes.txt", "mine\n")),
    Case("finetune-out-onto-complete-run", (*FINETUNE, "--out", VA), 2, (VA, "--overwrite")),
    Case("finetune-out-onto-cache", (*FINETUNE, "--out", CACHE), 2, (CACHE, "--out")),
    Case("ablate-out-is-a-file", ("ablate", RECIPE, "--out", CACHE, "--jobs", "1"), 2, (CACHE, "--out"),
         write_text(RECIPE, recipe("grid"))),
    Case("ablate-cell-onto-a-users-run", ("ablate", RECIPE, "--jobs", "1"), 2, (VA,),
         write_text(RECIPE, recipe(".", label="runs"))),
    Case("ablate-grid-runs-record-not-json", ("ablate", RECIPE, "--jobs", "1"), 2, ("grid/grid-runs.json",),
         both(write_text(RECIPE, recipe("grid")), write_text("grid/grid-runs.json", b"\xff{not json"))),
    Case("ablate-grid-runs-record-a-list", ("ablate", RECIPE, "--jobs", "1"), 2,
         ("grid/grid-runs.json", "not a list"),
         both(write_text(RECIPE, recipe("grid")), write_text("grid/grid-runs.json", "[]"))),
    # -- interrupted work (a real kill -9), then the same command again
    Case("cv-killed-between-folds-rerun-finishes",
         ("cv", "--folds", "2", "--task", "va", "--data", DATA, "--out", KILLED_CV, *SLOW), 0, (KILLED_CV,),
         channel="ok", may_change=(f"{KILLED_CV}/fold-1",), fixtures=("killed_cv",),
         check=_complete(KILLED_CV)),
    Case("cv-killed-rerun-with-other-settings-keeps-folds",
         ("cv", "--folds", "2", "--task", "va", "--data", DATA, "--out", KILLED_CV, *SLOW, "--lr", "0.01"), 2,
         (f"{KILLED_CV}/fold-0", "lr", "choose another --out"), fixtures=("killed_cv",)),
    Case("ablate-killed-rerun-finishes", ("ablate", "grid.toml", "--jobs", "1"), 0, ("results.md",),
         channel="ok", may_change=(f"{GRID}/fc-b",), fixtures=("killed_grid",), check=_grid_finished),
    Case("ensemble-interrupted-rerun-rebuilds", ensemble(VA, VA2, out=ENS, extra=("--smooth", "auto")), 0,
         (ENS,), _remove(f"{ENS}/metrics.json"), channel="ok", may_change=(ENS,), check=_complete(ENS)),
    Case("evaluate-interrupted-ensemble", ("evaluate", ENS), 2, (ENS, "abawfeat ensemble"),
         _remove(f"{ENS}/metrics.json"), check=_no_resume_offered),
    Case("predict-interrupted-cv", predict(CV, split="test"), 2, (CV, "abawfeat cv"),
         _remove(f"{CV}/metrics.json"), check=_no_resume_offered),
    # -- damaged or mismatched inputs
    Case("evaluate-ensemble-member-deleted", ("evaluate", ENS), 2, (ENS, VA2), _remove(VA2)),
    Case("predict-ensemble-member-incomplete", predict(ENS), 2, (VA2, "incomplete"),
         _remove(f"{VA2}/metrics.json")),
    Case("evaluate-ensemble-member-retrained-with-other-settings", ("evaluate", ENS), 2,
         (ENS, VA2, "changed"), _cli(*train(VA2, "--lr", "0.05", "--overwrite"))),
    Case("predict-cv-fold-replaced-by-another-run", predict(CV, split="test"), 2,
         (CV, f"{CV}/fold-1", "changed"), _replace_run(VA2, f"{CV}/fold-1")),
    Case("predict-cv-fold-missing", predict(CV, split="test"), 2, (CV, f"{CV}/fold-1"),
         _remove(f"{CV}/fold-1")),
    Case("evaluate-cv-fold-config-damaged", ("evaluate", CV), 2, (f"{CV}/fold-0/config.json",),
         write_text(f"{CV}/fold-0/config.json", '{"kind": "head", "task":')),
    Case("evaluate-cv-fold-checkpoint-missing", ("evaluate", CV), 2, (f"{CV}/fold-1", "checkpoint.pt"),
         _remove(f"{CV}/fold-1/checkpoint.pt")),
    Case("evaluate-smoothing-json-a-list", ("evaluate", VA2), 2, (f"{VA2}/smoothing.json",),
         write_text(f"{VA2}/smoothing.json", "[]\n")),
    Case("predict-smoothing-json-without-filters", predict(VA2), 2, (f"{VA2}/smoothing.json",),
         write_text(f"{VA2}/smoothing.json", '{"va": 3}\n')),
    Case("evaluate-smoothing-json-unknown-filter", ("evaluate", VA2), 2, (f"{VA2}/smoothing.json", "'box'"),
         write_text(f"{VA2}/smoothing.json", SMOOTHING_UNKNOWN_FILTER)),
    Case("evaluate-ensemble-smoothing-garbage", ("evaluate", ENS), 2, (f"{ENS}/smoothing.json",),
         write_text(f"{ENS}/smoothing.json", b"\xff\xfe garbage")),
    Case("evaluate-fused-second-cache-re-extracted", ("evaluate", FUSED), 2, (AUDIO_CACHE, "fingerprint"),
         _re_extracted(AUDIO_CACHE)),
    Case("predict-fused-second-cache-re-extracted", predict(FUSED, split="test"), 2,
         (AUDIO_CACHE, "fingerprint"), _re_extracted(AUDIO_CACHE)),
    Case("evaluate-fused-second-cache-missing", ("evaluate", FUSED), 2, (AUDIO_CACHE,), _remove(AUDIO_CACHE)),
    Case("predict-ensemble-member-cache-re-extracted", predict(ENS, split="test"), 2, (CACHE, "fingerprint"),
         _re_extracted(CACHE)),
    Case("extract-audio-damaged-source-video-is-skipped", (*AUDIO_EXTRACT, "--out", "x.h5"), 0,
         (f"{DATA}/videos/batch1/{TEST_VIDEO}.mp4", "not written"),
         write_text(f"{DATA}/videos/batch1/{TEST_VIDEO}.mp4", "not a video\n"), channel="ok"),
    Case("ablate-folds-row-with-one-fold", ("ablate", RECIPE, "--dry-run"), 2, (RECIPE, "'FC'", "--folds 1"),
         write_text(RECIPE, recipe("grid", row="folds = 1\n"))),
    Case("ablate-ensemble-of-a-cross-validated-row", ("ablate", RECIPE, "--dry-run"), 2,
         (RECIPE, "[[ensembles]] #1", "'FC'", "folds"),
         write_text(RECIPE, recipe("grid", row=CV_ROW_ENSEMBLE))),
    Case("ensemble-runs-of-different-tasks", ensemble(VA, AU), 2, (AU, "one task")),
    Case("ensemble-of-a-cv-run", ensemble(VA, CV), 2, (CV, "cross-validation run")),
    Case("ensemble-runs-of-different-splits", ensemble(VA, f"{CV}/fold-0"), 2, (f"{CV}/fold-0", "validat")),
    Case("cv-one-fold", cv("runs/new", folds="1"), 2, ("--folds",)),
    Case("cv-more-folds-than-videos", cv("runs/new", folds="10"), 2, ("--folds 10",)),
    # -- a full disk (simulated: every atomic write fails with ENOSPC after the first n)
    Case("cv-disk-full-first-write", cv("runs/new"), 2, ("runs/new/fold-0", "no space left"),
         disk_full_after=0),
    Case("cv-disk-full-writing-its-record", cv(CV), 2, (f"{CV}/config.json", "no space left", "kept"),
         _remove(f"{CV}/metrics.json"), disk_full_after=0),
    Case("ensemble-disk-full", ensemble(VA, VA2), 2, ("runs/new", "no space left"), disk_full_after=0),
    Case("ensemble-overwrite-disk-full-keeps-old-run", ensemble(VA, VA2, out=ENS, extra=("--overwrite",)), 2,
         ("no space left", ENS), disk_full_after=1),
    Case("ablate-disk-full-writing-results", ("ablate", RECIPE, "--jobs", "1"), 2,
         ("grid/results.md", "no space left", "kept"),
         both(write_text(RECIPE, recipe("grid")), _cli("ablate", RECIPE, "--jobs", "1")), disk_full_after=0),
    Case("report-disk-full", ("report", VA, ENS, "--out", "r.html"), 2, ("r.html", "no space left"),
         disk_full_after=0),
    Case("synth-disk-full-new-tree", (*SYNTH, "--out", "new"), 2, ("new", "no space left", "incomplete"),
         disk_full_after=2),
    Case("train-head-fused-disk-full", train("runs/new", *FUSE, "--smooth", "auto"), 2,
         ("runs/new", "no space left"), disk_full_after=1),
    Case("synth-disk-full-replacing-a-synth-tree", (*SYNTH, "--out", DATA), 2, (DATA, "no space left"),
         disk_full_after=2),
    Case("extract-audio-disk-full-writing-a-part", (*AUDIO_EXTRACT, "--out", "new.h5"), 2,
         ("new.h5", "no space left"), disk_full_after=1),
    Case("extract-audio-disk-full-consolidating", (*AUDIO_EXTRACT, "--videos", TEST_VIDEO), 2,
         (AUDIO_CACHE, "no space left", "kept"), _drop_audio_video, disk_full_after=2),
    # -- user text printed literally
    Case("ensemble-brackets-in-missing-member", ensemble(VA, "runs/v[a]2"), 2, ("runs/v[a]2",)),
    Case("cv-brackets-in-data", (*cv("runs/new"), "--data", "aw[v2]"), 2, ("aw[v2]",)),
    Case("report-brackets-in-run", ("report", "runs/[x]"), 2, ("runs/[x]",)),
    Case("extract-audio-brackets-in-out-folder", (*AUDIO_EXTRACT, "--out", "c[1]/a.h5"), 2, ("c[1]",),
         write_text("c[1]", "a file, not a folder\n")),
    # -- bad option values: one line naming the option
    Case("ensemble-weights-unknown", ensemble(VA, VA2, extra=("--weights", "best")), 2, ("--weights",)),
    Case("ensemble-smooth-unknown", ensemble(VA, VA2, extra=("--smooth", "yes")), 2, ("--smooth",)),
    Case("ensemble-without-out", ("ensemble", VA), 2, ("--out",), subprocess=True),
    Case("cv-folds-not-a-number", ("cv", "--folds", "two", "--task", "va"), 2, ("--folds",), subprocess=True),
    Case("extract-audio-size-unknown", (*AUDIO_EXTRACT[:5], "size=huge", *AUDIO_EXTRACT[6:], "--out", "x.h5"),
         2, ("--encoder-opt", "size", "huge")),
    Case("finetune-schedule-unknown", (*FINETUNE, "--out", "runs/ft", "--schedule", "steps"), 2,
         ("--schedule",)),
    Case("train-head-fusion-unknown", train("runs/new", *FUSE, "--fusion", "middle"), 2, ("--fusion",)),
    Case("train-head-smooth-unknown", train("runs/new", "--smooth", "always"), 2, ("--smooth",)),
    Case("predict-ensemble-with-cache-override", (*predict(ENS), "--cache", CACHE), 2, ("--cache", ENS)),
    Case("evaluate-cv-split-train", ("evaluate", CV, "--split", "train"), 2, (CV,)),
    Case("extract-audio-without-source-videos", (*AUDIO_EXTRACT, "--out", "x.h5"), 2,
         (DATA, "no source videos"), _remove(f"{DATA}/videos")),
    # -- reproduce: the run is only read; the reproduction goes to a scratch folder (issue 23)
    Case("reproduce-head-run-is-equal", ("reproduce", VA), 0, ("equal: all",), channel="ok"),
    Case("reproduce-cv-is-equal", ("reproduce", CV), 0, ("equal: all",), channel="ok"),
    Case("reproduce-ensemble-is-equal", ("reproduce", ENS), 0, ("equal: all",), channel="ok"),
    Case("reproduce-not-a-run", ("reproduce", DATA), 2, (DATA, "not a run directory")),
    Case("reproduce-killed-cv", ("reproduce", KILLED_CV), 2, (KILLED_CV, "not a run directory"),
         fixtures=("killed_cv",)),
    Case("reproduce-out-onto-the-run", ("reproduce", VA, "--out", VA), 2, (VA, "never over the original")),
    Case("reproduce-out-onto-cache", ("reproduce", VA, "--out", CACHE), 2, (CACHE, "not empty")),
    Case("reproduce-brackets-in-run", ("reproduce", "runs/[x]"), 2, ("runs/[x]",)),
    Case("reproduce-disk-full", ("reproduce", VA, "--out", "runs/new"), 2, ("runs/new", "no space left"),
         disk_full_after=1),
]


@pytest.mark.parametrize("case", params(CASES))
def test_new_command_fault(case: Case, request: pytest.FixtureRequest, new_world: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch, full_disk: Callable[[int], object]) -> None:
    for name in case.fixtures:
        request.getfixturevalue(name)  # into the world, before it is copied
    run_case(case, copy_world(new_world, tmp_path, monkeypatch), full_disk)


def test_synth_into_a_real_full_tmpfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      small_tmpfs: Callable[[int], Path]) -> None:
    """A real full device (tmpfs): synth runs out of space writing crops (not only its atomic writes); one
    line, and nothing that was there before is touched."""
    disk = small_tmpfs(256)
    (disk / "mine.txt").write_text("a file of the user's\n")
    fill(disk, leave_kib=48)
    monkeypatch.chdir(tmp_path)
    before = snapshot(disk)
    outcome = run_cli((*SYNTH, "--out", disk / "tree"))
    assert_fault(outcome, exit_code=2, names=(str(disk / "tree"), "no space left on the device"),
                 before=before, root=disk)

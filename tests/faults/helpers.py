"""The fault suite's machinery (fixtures are in conftest.py): running a command, the three assertions every
case makes, a case table, full-disk simulation and the damage a case does to its copy of the world.

Every case asserts (docs/failures.md):

1. the exit code;
2. one message line (the ``error:`` line, last on stderr after any progress lines; or for ``cache verify``
   the one problem line) that names the file or option at fault, and no Python traceback or exception line
   anywhere in the output;
3. every file that existed before the command is byte-identical after it (except the ones a successful
   command is meant to change, which the case names).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DATA = "aff"  # the synthetic tree's folder: also the dataset name in the default cache path
CACHE = f"cache/{DATA}/ddamfn.h5"
RUNS = {"va": "runs/va", "au": "runs/au"}
KILLED = "runs/killed"
KILLED_EPOCHS = 150  # of the killed run: it dies after its second epoch
# The newer commands' world (conftest.new_world): the world plus sound, an audio cache and runs of every kind.
AUDIO_CACHE = f"cache/{DATA}/wav2vec2.h5"
VA2, ENS, CV, FUSED = "runs/va2", "runs/ens", "runs/cv", "runs/fused"
KILLED_CV = "runs/cvk"  # a cross-validation killed after its first fold (conftest.killed_cv)
GRID = "grid"  # an ablation grid killed after its first cell (conftest.killed_grid), recipe grid.toml
TRAIN = ("--epochs", "2", "--no-plots", "--threads", "1", "--device", "cpu")
ANN = f"{DATA}/8th_ABAW_Annotations"
CROPS = f"{DATA}/cropped_aligned"
# Videos of the synthetic world (abawfeat synth --videos 6 --frames 10 --seed 0: 57 crops).
TRAIN_VIDEO = "video44_left"  # VA, EXPR, AU train
TEST_VIDEO = "video28"  # crops and test lists only, no annotations
VAL_VIDEO = "64-25-640x480"
N_CROPS = 57

_PYTHON_ERROR = re.compile(r"^(Traceback|\w+(Error|Exception|Interrupt)\b.*:)", re.MULTILINE)


# ---------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(argv: Sequence[str]) -> Outcome:
    """The real CLI in this process (typer's CliRunner); an exception escaping it counts as a traceback."""
    from typer.testing import CliRunner

    from abawfeat.cli import app

    result = CliRunner().invoke(app, [str(a) for a in argv], catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # An exception the CLI did not turn into a message: show it as the user would have seen it.
        stderr += "".join(traceback.format_exception(result.exception))
    return Outcome(int(result.exit_code or 0), result.stdout, stderr)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, ABAWFEAT_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_subprocess(argv: Sequence[str], cwd: Path, timeout: float = 300) -> Outcome:
    """``python -m abawfeat ...`` in a fresh process (for real disks, signals and anything process-wide)."""
    proc = subprocess.run([sys.executable, "-m", "abawfeat", *map(str, argv)], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------------------------------------- assertions


Roots = Path | Mapping[str, Path]


def snapshot(root: Roots) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (symlinks by target text), keyed by relative path, lock files
    aside; several roots as ``{prefix: folder}`` (e.g. the workspace and a tmpfs mounted elsewhere)."""
    roots = {"": root} if isinstance(root, Path) else root
    out = {}
    for prefix, folder in roots.items():
        for path in sorted(folder.rglob("*")):
            rel = prefix + path.relative_to(folder).as_posix()
            if path.name.endswith(".lock"):
                continue  # single-writer locks: no artefact, only the pid of their last holder
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def message_lines(outcome: Outcome, channel: str) -> list[str]:
    """The lines that make up the command's message: ``error:`` (and ``interrupted:``) lines on either
    stream, or for ``report`` (cache verify's problems) every stdout line."""
    if channel == "report":
        return outcome.stdout.strip().splitlines()
    return [line for line in outcome.output.splitlines() if line.startswith(("error: ", "interrupted: "))]


def assert_fault(
    outcome: Outcome,
    *,
    exit_code: int,
    names: Sequence[str],
    before: Mapping[str, str],
    root: Roots,
    channel: str = "error",
    may_change: Sequence[str] = (),
) -> None:
    """The three assertions of every case (see the module docstring). ``channel``: ``error`` (one
    ``error:`` line; other stderr lines may only be warnings), ``report`` (one stdout line: cache verify) or
    ``ok`` (a command that succeeds: its output names what it did)."""
    assert outcome.exit_code == exit_code, (
        f"exit code {outcome.exit_code}, expected {exit_code}\n--- stdout\n{outcome.stdout}\n--- stderr\n"
        f"{outcome.stderr}")
    assert not _PYTHON_ERROR.search(outcome.output), f"a Python traceback or exception:\n{outcome.output}"
    if channel == "ok":
        message = outcome.output
    else:
        lines = message_lines(outcome, channel)
        assert len(lines) == 1, f"expected one message line, found {len(lines)}:\n{outcome.output}"
        if channel == "error":
            # Progress lines (epochs, warnings) may come before it; nothing comes after the message.
            last = [line for line in outcome.stderr.splitlines() if line.strip()][-1:]
            assert last == lines, f"the message is not the last line on stderr:\n{outcome.stderr}"
        message = lines[0]
    for name in names:
        assert name in message, f"{name!r} not in the message: {message!r}"
    after = snapshot(root)

    def allowed(rel: str) -> bool:
        return any(rel == m or rel.startswith(m.rstrip("/") + "/") for m in may_change)

    changed = sorted(rel for rel, digest in before.items() if after.get(rel) != digest and not allowed(rel))
    assert not changed, f"changed or removed by the command: {changed}"


# ---------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One fault: damage a copy of the world, run one command, check the three assertions.

    ``argv``, ``names`` and ``may_change`` may hold ``{data}``, ``{cache}``, ``{run_va}``, ``{run_au}``,
    ``{killed}`` (paths relative to the workspace, the current directory). ``fix`` names who is fixing a
    case that fails today; such a case is a strict xfail, so the suite turns red the day it passes.
    """

    id: str
    argv: tuple[str, ...]
    exit_code: int
    names: tuple[str, ...]
    damage: Callable[[Path], None] | None = None
    channel: str = "error"
    may_change: tuple[str, ...] = ()
    fix: str | None = None
    disk_full_after: int | None = None  # simulate a full device after this many successful atomic writes
    killed: bool = False  # needs the killed run
    fixtures: tuple[str, ...] = ()  # other session fixtures to build into the world first (killed_cv, ...)
    subprocess: bool = False
    check: Callable[[Path, Outcome], None] | None = None  # extra assertions on success


FIELDS = {"data": DATA, "cache": CACHE, "run_va": RUNS["va"], "run_au": RUNS["au"], "killed": KILLED,
          "audio_cache": AUDIO_CACHE, "va2": VA2, "ens": ENS, "cv": CV, "fused": FUSED,
          "killed_cv": KILLED_CV, "grid": GRID}


def expected_to_fail(reason: str | None) -> list[Any]:
    """The strict xfail mark of a case someone is fixing; none with ABAWFEAT_FAULTS_ALL=1 (to see the real
    state of every case, e.g. while fixing them)."""
    if not reason or os.environ.get("ABAWFEAT_FAULTS_ALL") == "1":
        return []
    return [pytest.mark.xfail(strict=True, reason=reason)]


def params(cases: Sequence[Case]) -> list[Any]:
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return [pytest.param(c, id=c.id, marks=expected_to_fail(c.fix)) for c in cases]


def run_case(case: Case, root: Path, full_disk: Callable[[int], Any] | None = None) -> None:
    """Damage, snapshot, run, assert. ``root`` is the workspace and the current directory."""
    if case.damage is not None:
        case.damage(root)
    before = snapshot(root)
    argv = [a.format_map(FIELDS) for a in case.argv]
    if case.disk_full_after is not None:
        assert full_disk is not None
        full_disk(case.disk_full_after)
    outcome = run_subprocess(argv, root) if case.subprocess else run_cli(argv)
    assert_fault(outcome, exit_code=case.exit_code, names=[n.format_map(FIELDS) for n in case.names],
                 before=before, root=root, channel=case.channel,
                 may_change=[m.format_map(FIELDS) for m in case.may_change])
    if case.check is not None:
        case.check(root, outcome)


# ---------------------------------------------------------------------------------------------- full disks


class FullDisk:
    """Every ``atomic_write`` after the first ``allow`` fails the way a full device does: the temporary file
    is written, then ENOSPC. Every artefact is written through ``abawfeat.utils.io.atomic_write``; modules
    that imported it by name are patched too."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, allow: int) -> None:
        import abawfeat.utils.io as io

        self.calls = 0
        self.allow = allow
        self.failed: list[Path] = []
        real = io.atomic_write

        def full(path: Any, write: Callable[[Path], None], *, durable: bool = False) -> Path:
            self.calls += 1
            if self.calls <= self.allow:
                return real(path, write, durable=durable)

            def write_then_fill(tmp: Path) -> None:
                write(tmp)
                self.failed.append(Path(path))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

            return real(path, write_then_fill, durable=durable)

        for name, module in list(sys.modules.items()):
            if name.startswith("abawfeat") and getattr(module, "atomic_write", None) is real:
                monkeypatch.setattr(module, "atomic_write", full)


def fill(folder: Path, leave_kib: int) -> Path:
    """Fill a (tmpfs) folder with one file until only about ``leave_kib`` KiB are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    filler = folder / "filler.bin"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_kib * 1024))
    return filler


# ---------------------------------------------------------------------------------------------- damage


def flip(path: Path, dataset: str, at: int = 5) -> None:
    """Flip one byte of a dataset's stored data in the file, as a failing disk or a bad copy would (the
    offset from h5py: ``get_offset`` for contiguous data, the first chunk's offset for chunked data)."""
    import h5py

    with h5py.File(path, "r") as fh:
        ds = fh[dataset]
        offset = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + at] ^= 0x5A
    path.write_bytes(bytes(raw))


def flip_text(path: Path, needle: bytes, replacement: bytes) -> None:
    """Overwrite bytes of the file where ``needle`` first occurs (inside an attribute's stored text)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(needle)
    assert at >= 0, needle
    raw[at : at + len(replacement)] = replacement
    path.write_bytes(bytes(raw))


def restamp(path: Path, **attrs: Any) -> None:
    """Set root attributes of a cache and re-sign its digest: what a buggy writer (not a failing disk)
    would leave, so that the check under test, not the digest, is what must catch it."""
    import h5py

    from abawfeat.cache import CHECKSUM_ATTR, metadata_digest

    with h5py.File(path, "r+") as fh:
        for key, value in attrs.items():
            fh.attrs[key] = value
        fh.attrs[CHECKSUM_ATTR] = metadata_digest(fh)


def write_v1_cache(path: Path) -> None:
    """Rewrite a cache in the version-1 layout (contiguous datasets, no checksums), same content."""
    import h5py

    from abawfeat.cache import CHECKSUM_ATTR

    tmp = path.with_name(path.name + ".v1")
    with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
        for key, value in src.attrs.items():
            if key != CHECKSUM_ATTR:
                dst.attrs[key] = value
        dst.attrs["format_version"] = 1
        for video, group in src["videos"].items():
            out = dst.create_group(f"videos/{video}")
            for name, ds in group.items():
                out[name] = ds[()]
            for key, value in group.attrs.items():
                out.attrs[key] = value
    tmp.replace(path)


def write_text(rel: str, text: str | bytes) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode() if isinstance(text, str) else text)

    return damage


def rename(rel: str, new_name: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (root / rel).rename((root / rel).with_name(new_name))

    return damage


def copy_file(src: str, dst: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        (root / dst).write_bytes((root / src).read_bytes())

    return damage


def both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        for step in steps:
            step(root)

    return damage


def remove_annotations(root: Path) -> None:
    """Crops alone: the annotations folder, test lists and sample files are gone."""
    import shutil

    for rel in (ANN, f"{DATA}/names_of_videos_in_each_test_set", f"{DATA}/prediction_files_format"):
        shutil.rmtree(root / rel)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())

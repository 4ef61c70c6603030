"""The stage-one feature cache: one HDF5 file per encoder, one group per video (see docs/cache-format.md).

HDF5 is not crash-safe: a process killed while it writes can leave the whole file unreadable. So the
consolidated ``<out>.h5`` is never modified in place. ``CacheWriter`` writes each finished video as its own
small part file (``<out>.parts/<video>.h5``, written to a temporary name and renamed, so a part either exists
whole or not at all); ``consolidate()`` builds a new complete file under a temporary name from the old file
plus the parts, renames it over the old one, and only then deletes the parts. A ``kill -9`` at any moment
therefore loses at most the videos in flight, and a re-run (or torchrun with one writer per rank) resumes
from whatever parts and file exist. An exclusive ``flock`` on ``<out>.lock`` keeps a second run off the same
output.

Integrity (format version 2): every numeric dataset is stored with HDF5's fletcher32 checksum, one chunk per
dataset, so HDF5 itself refuses damaged bytes on every read, by any program; what fletcher32 cannot cover
(attributes, and the variable-length strings of /text, which HDF5 does not filter) is covered by one SHA-256
over them all in the root attribute ``metadata_sha256``. ``FeatureCache`` checks that digest when it opens a
file and turns a failed fletcher32 read into one line naming the video; ``verify_cache`` reads everything.
Version-1 caches (no checksums) are still read; ``cache verify`` says they have nothing to check.

``FeatureCache`` is the read-only side used by stage two; it never needs torch or the encoder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from abawfeat import __version__
from abawfeat.data.names import video_name_problem
from abawfeat.errors import AbawfeatError, CacheError, DiskFullError
from abawfeat.utils.io import acquire_lock as _acquire
from abawfeat.utils.io import atomic_write, atomic_write_bytes, is_disk_full, lock_holder, release_lock

FORMAT_NAME = "abawfeat-features"
FORMAT_VERSION = 2
# Versions this abawfeat reads. Version 1 (before checksums) is read as it is; it is never written to again.
READABLE_VERSIONS = (1, 2)
# The root attribute holding the SHA-256 of every attribute and /text string (version 2).
CHECKSUM_ATTR = "metadata_sha256"
# One chunk per dataset up to this size (a 50,000-frame video of 512 float32 features is 100 MB): stage two
# reads whole videos, and one chunk is one read and one checksum. Larger datasets are split in row blocks.
_CHUNK_BYTES = 2**28
FEATURE_DTYPES = ("float16", "float32")

# Provenance keys that may differ between the runs that fill one cache (when it was written, the options of
# the latest run). Every other key must match exactly, or the cache would mix features of two encoders.
VOLATILE_KEYS = frozenset({"created", "extract_config", "package_version", "tree"})
# The video group attribute naming the crops a video's rows were extracted from (``AffWild2.crop_identity``).
CROPS_ATTR = "crops_sha256"
# Keys a stage-two checkpoint records and must find again (``FeatureCache.fingerprint``).
FINGERPRINT_KEYS = (
    "encoder", "encoder_config", "weights_sha256", "preprocessing", "feature_dim", "calibration",
)
REQUIRED_KEYS = (
    "format", "format_version", "encoder", "encoder_config", "weights_sha256", "preprocessing",
    "calibration", "feature_dim", "dtype", "package_version", "created",
)

_PARTS_PROVENANCE = "provenance.json"
_TEXT_PART = "_text.h5"  # leading underscore: never a video name from a crop folder listing


def default_cache_path(dataset_name: str, backbone: str, root: str | Path = "cache") -> Path:
    """``cache/<dataset name>/<backbone>.h5``: one file per encoder, grouped by dataset."""
    return Path(root) / dataset_name / f"{backbone}.h5"


def parts_dir(path: str | Path) -> Path:
    """Where finished videos wait (one small HDF5 each) until they are consolidated into ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


def acquire_lock(path: str | Path, holder: str = "another extraction is writing this cache") -> int:
    """Take the exclusive lock of the cache at ``path`` (``<path>.lock``, through the project's one lock,
    ``utils.io.acquire_lock``) without waiting; returns its descriptor for ``release_lock``. A held lock is a
    one-line CacheError. Extraction takes it before anything expensive, so a second run into the same cache
    is refused at once. Other single-writer artefacts (``abawfeat crop``'s trees) take it too; ``holder``
    says who holds it in the message."""
    path = Path(path)

    def busy(lock: Path) -> CacheError:
        return CacheError(f"{path}: {holder} (lock {lock} is held"
                          f"{lock_holder(lock)}); wait for it to finish or choose another --out")

    return _acquire(lock_path(path), busy)


def make_provenance(
    encoder_provenance: dict[str, Any],
    *,
    feature_dim: int,
    dtype: str,
    precision: str,
    logit_names: Sequence[str] | None = None,
    extract_config: dict[str, Any] | None = None,
    tree: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The cache's root attributes, built from an encoder's ``provenance()`` and the run's choices.

    ``tree`` (``{"root", "name"}``) says which crop tree the cache was extracted from; it names the tree in
    messages, while each video's ``crops_sha256`` is what is checked (a subset or a resumed run of the same
    tree matches video by video, and the same tree moved elsewhere still matches).

    ``precision`` is part of the identity (bf16 and fp32 features must not be mixed in one file); the
    ``extract_config`` (batch size, workers, ...) is informational and may change between resumed runs.
    """
    if dtype not in FEATURE_DTYPES:
        raise CacheError(f"unknown feature dtype {dtype!r}: use one of {', '.join(FEATURE_DTYPES)}")
    name = encoder_provenance.get("name")
    if not name:
        raise CacheError("encoder provenance has no 'name'")
    return _jsonable({
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "encoder": name,
        "encoder_config": encoder_provenance.get("config", {}),
        "weights_sha256": encoder_provenance.get("weights_sha256", "unknown"),
        "preprocessing": encoder_provenance.get("preprocessing", {}),
        "calibration": encoder_provenance.get("calibration"),
        "encoder_provenance": encoder_provenance,
        "feature_dim": int(feature_dim),
        "dtype": dtype,
        "precision": precision,
        "logit_names": list(logit_names) if logit_names is not None else None,
        "extract_config": extract_config or {},
        "tree": tree or {},
        "package_version": __version__,
        "created": _now(),
    })


def provenance_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the identity keys (all but ``VOLATILE_KEYS``) whose values differ, sorted. Where the weights
    are identified by their sha256, the path they were given by is not compared."""
    stored, current = _without_weight_paths(stored), _without_weight_paths(current)
    keys = (set(stored) | set(current)) - VOLATILE_KEYS
    return sorted(k for k in keys if _canonical(stored.get(k)) != _canonical(current.get(k)))


def _without_weight_paths(provenance: dict[str, Any]) -> dict[str, Any]:
    # `--weights ./ddamfn.pth` and `--weights /data/ddamfn.pth` are the same encoder when the file hashes
    # agree; the sha256 identifies the weights, the path only says where they were that day.
    sha = provenance.get("weights_sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        return provenance
    out = dict(provenance)
    if isinstance(out.get("encoder_config"), dict):
        out["encoder_config"] = {k: v for k, v in out["encoder_config"].items() if k != "weights"}
    if isinstance(out.get("encoder_provenance"), dict):
        enc = {k: v for k, v in out["encoder_provenance"].items() if k != "weights_source"}
        if isinstance(enc.get("config"), dict):
            enc["config"] = {k: v for k, v in enc["config"].items() if k != "weights"}
        out["encoder_provenance"] = enc
    return out


# --------------------------------------------------------------------------------------------------- writer


class CacheWriter:
    """Writes videos into a cache, one atomic part file per finished video; resumes what exists.

    Use as a context manager. On a clean exit (or Ctrl-C) the parts are consolidated into the single ``.h5``;
    on any other exception they are left for the next run. ``lock=False`` is for torchrun ranks other than 0,
    which write parts under rank 0's lock and leave consolidation to it (``consolidate_on_exit=False``).
    ``held_lock`` is a descriptor from ``acquire_lock`` that the caller already holds: the writer uses it
    instead of locking, and leaves releasing it to the caller.
    """

    def __init__(
        self,
        path: str | Path,
        provenance: dict[str, Any],
        *,
        lock: bool = True,
        consolidate_on_exit: bool = True,
        held_lock: int | None = None,
        tree: Any = None,
    ) -> None:
        self.path = Path(path)
        self._tree = tree  # the AffWild2 being extracted: an existing cache must come from it (check_tree)
        self.parts = parts_dir(self.path)
        self.provenance = _jsonable(dict(provenance))
        for key in ("encoder", "feature_dim", "dtype"):
            if key not in self.provenance:
                raise CacheError(f"{self.path}: provenance lacks {key!r} (build it with make_provenance)")
        self.dtype = np.dtype(self.provenance["dtype"])
        self.feature_dim = int(self.provenance["feature_dim"])
        self._lock_wanted = lock
        self._consolidate_on_exit = consolidate_on_exit
        self._lock_fd: int | None = None
        self._held_lock = held_lock
        self._consolidated: set[str] = set()
        self._has_text = False
        self._open = False

    # -- lifecycle
    def __enter__(self) -> CacheWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._lock_wanted:
            self._acquire_lock()
        try:
            self._check_existing()
            if self._lock_wanted:
                self._clean_stale_temporaries()
                if self._tree is not None and not self.path.exists():
                    self.check_tree(self._tree)  # parts alone (an interrupted first run)
            self._open = True
        except BaseException:
            self._release_lock()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            # Ctrl-C keeps completed videos in the consolidated file, not only as parts.
            if self._consolidate_on_exit and (exc_type is None or issubclass(exc_type, KeyboardInterrupt)):
                self.consolidate()
        finally:
            self._open = False
            self._release_lock()

    def _acquire_lock(self) -> None:
        self._lock_fd = self._held_lock if self._held_lock is not None else acquire_lock(self.path)

    def _release_lock(self) -> None:
        if self._lock_fd is not None and self._lock_fd != self._held_lock:
            release_lock(self._lock_fd)
        self._lock_fd = None

    def _check_existing(self) -> None:
        """Refuse to add to a cache (file or parts) made with a different encoder configuration."""
        if self.path.exists():
            with _open_h5(self.path) as fh:
                stored = read_provenance(fh, self.path)
                if stored["format_version"] >= 2:
                    check_metadata(fh, self.path)  # never add to a file whose attributes are damaged
                self._consolidated = set(fh["videos"].keys()) if "videos" in fh else set()
                self._has_text = "text" in fh
            if self._tree is not None and self._lock_wanted:
                # Another tree's cache is said as such first (its random-init calibration, drawn from that
                # tree's frames, would otherwise make it "a different encoder configuration").
                self.check_tree(self._tree)
            self._refuse_old_format(stored, self.path)
            self._refuse_if_different(stored, self.path)
            # Keep the first creation time: the cache was created then, this run only adds to it.
            self.provenance["created"] = stored.get("created", self.provenance["created"])
        prov_file = self.parts / _PARTS_PROVENANCE
        if prov_file.exists():
            try:
                stored = json.loads(prov_file.read_text())
            except (OSError, ValueError) as exc:
                raise CacheError(
                    f"{prov_file}: unreadable ({exc}); delete {self.parts} to start over"
                ) from None
            if not isinstance(stored, dict):
                raise CacheError(f"{prov_file}: not a provenance object; delete {self.parts} to start over")
            self._refuse_old_format(stored, self.parts)
            self._refuse_if_different(stored, self.parts)
            if not self.path.exists():
                self.provenance["created"] = stored.get("created", self.provenance["created"])
        elif self._lock_wanted:
            self.parts.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.provenance, indent=2, sort_keys=True)
            atomic_write_bytes(prov_file, text.encode(), durable=True)

    def _refuse_old_format(self, stored: dict[str, Any], where: Path) -> None:
        # Adding checksummed videos to a version-1 file would make a file that claims checksums it lacks.
        version = stored.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{where}: cache format version {version} (this abawfeat writes version {FORMAT_VERSION}, "
                "with checksums) cannot be added to; extract into another --out, or delete it to start over"
            )

    def _refuse_if_different(self, stored: dict[str, Any], where: Path) -> None:
        diff = provenance_differences(stored, self.provenance)
        if diff:
            raise CacheError(
                f"{where}: was made with a different encoder configuration (differs in: {', '.join(diff)}); "
                "use another --out, or delete it to start over"
            )

    def _clean_stale_temporaries(self) -> None:
        # We hold the lock, so any temporary left here belongs to a run that died.
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
        if self.parts.is_dir():
            for tmp in self.parts.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    @property
    def lock_fd(self) -> int | None:
        """The lock's file descriptor. Forked children (DataLoader workers) inherit it and would keep the
        lock alive after the parent is killed; they should close it (see ``abawfeat.extract``)."""
        return self._lock_fd

    def check_tree(self, data: Any) -> None:
        """Refuse (one line naming the cache and the tree) to add to a cache whose videos, already complete
        in the file or as parts, were extracted from another crop tree than ``data``: its "already complete"
        videos would be another tree's, and this tree's new ones would be mixed with them. A video of the
        cache that this tree has no crop folder for means the same."""
        tree = data.videos_with_crops()
        known = set(tree)
        sources: dict[str, tuple[np.ndarray, str | None]] = {}
        if self.path.exists() and self._consolidated:
            with _open_h5(self.path) as fh:
                for video in sorted(self._consolidated):
                    sources[video] = _group_source(self.path, video, fh["videos"][video])
        for video in _part_videos(self.parts):
            part = self.parts / f"{video}.h5"
            with _open_h5(part) as fh:
                if f"videos/{video}" in fh:
                    sources[video] = _group_source(part, video, fh["videos"][video])
        foreign = sorted(v for v in sources if v not in known)
        recorded = self._recorded_tree()
        if foreign:
            listed = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            raise CacheError(
                f"{self.path}: holds {len(foreign)} video(s) that {data.root} has no crops of ({listed}): "
                f"it was extracted from another crop tree{recorded}; extract {data.root} into another --out")
        for video, (listed_frames, digest) in sorted(sources.items()):
            why = source_problem(listed_frames, digest, data, video)
            if why:
                raise CacheError(
                    f"{self.path}: video {video!r} was extracted from another crop tree than {data.root} "
                    f"({why}){recorded}; extract {data.root} into another --out")

    def _recorded_tree(self) -> str:
        if not self.path.exists():
            return ""
        try:
            with _open_h5(self.path) as fh:
                return _tree_note(read_provenance(fh, self.path))
        except CacheError:
            return ""

    # -- writing
    def done_videos(self) -> set[str]:
        """Videos already complete, in the consolidated file or as parts."""
        return self._consolidated | set(_part_videos(self.parts))

    def has_text(self) -> bool:
        """Whether text embeddings are stored already (in the file or as a part)."""
        return self._has_text or (self.parts / _TEXT_PART).exists()

    def has_video(self, video: str) -> bool:
        return video in self._consolidated or (self.parts / f"{video}.h5").exists()

    def write_video(
        self,
        video: str,
        frames: np.ndarray | Sequence[int],
        features: np.ndarray,
        logits: np.ndarray | None = None,
        bad_frames: Iterable[int] = (),
        crops_sha256: str | None = None,
    ) -> None:
        """Write one complete video atomically. ``frames`` are the 1-based frames whose crops decoded
        (strictly ascending); ``bad_frames`` those that did not. Features are cast to the cache dtype.
        ``crops_sha256``: the identity of the crops it was extracted from (``AffWild2.crop_identity``)."""
        if not self._open:
            raise RuntimeError("CacheWriter.write_video outside its `with` block")
        _check_video_name(video)
        frames = np.asarray(frames, dtype=np.int64)
        bad = np.asarray(sorted(set(int(b) for b in bad_frames)), dtype=np.int32)
        features = np.asarray(features)
        if frames.ndim != 1 or features.ndim != 2 or features.shape != (len(frames), self.feature_dim):
            raise ValueError(
                f"video {video}: features {features.shape} do not match frames ({len(frames)},) "
                f"and feature_dim {self.feature_dim}"
            )
        if len(frames) and (frames[0] < 1 or np.any(np.diff(frames) <= 0)):
            raise ValueError(f"video {video}: frame numbers must be 1-based and strictly ascending")
        if np.intersect1d(frames, bad).size:
            raise ValueError(f"video {video}: a frame is listed both as decoded and as bad")
        with np.errstate(over="ignore"):  # overflow is reported below, as a CacheError naming the video
            stored = features.astype(self.dtype, copy=False)
        n_bad_values = int(np.size(stored) - np.count_nonzero(np.isfinite(stored)))
        if n_bad_values:
            raise CacheError(
                f"{self.path}: video {video}: {n_bad_values} feature values are NaN/inf after casting to "
                f"{self.dtype} (try --dtype float32, or check the encoder)"
            )
        if logits is not None:
            logits = np.asarray(logits, dtype=np.float32)
            if logits.ndim != 2 or logits.shape[0] != len(frames):
                raise ValueError(f"video {video}: logits {logits.shape} do not match {len(frames)} frames")

        if crops_sha256 is None and self._tree is not None:
            crops_sha256 = self._tree.crop_identity(video)
        self.parts.mkdir(parents=True, exist_ok=True)
        target = self.parts / f"{video}.h5"

        def fill(fh: Any) -> None:
            group = fh.create_group(f"videos/{video}")
            _write_video_group(group, frames.astype(np.int32), stored, logits, bad)
            if crops_sha256 is not None:
                group.attrs[CROPS_ATTR] = str(crops_sha256)

        _write_h5_atomic(target, fill)

    def set_text_embeddings(
        self,
        names: Sequence[str],
        embeddings: np.ndarray,
        template: str = "",
        prompts: Sequence[str] | None = None,
    ) -> None:
        """Store an encoder's class-prompt text embeddings [C, D] (CLIP), so stage two never loads CLIP:
        ``names`` are the classes, ``prompts`` the texts encoded, ``template`` how they were made."""
        if not self._open:
            raise RuntimeError("CacheWriter.set_text_embeddings outside its `with` block")
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(names):
            raise ValueError(f"text embeddings {emb.shape} do not match {len(names)} names")
        self.parts.mkdir(parents=True, exist_ok=True)

        if prompts is not None and len(prompts) != len(names):
            raise ValueError(f"{len(prompts)} prompts for {len(names)} names")

        def fill(fh: Any) -> None:
            _write_text_group(fh, list(names), emb, template, list(prompts or names))

        _write_h5_atomic(self.parts / _TEXT_PART, fill)

    # -- consolidation
    def consolidate(self) -> Path:
        """Fold the parts into the single ``.h5`` (a new file renamed over the old), then delete the parts.
        Needs the lock; safe to interrupt at any point (the next run redoes it)."""
        if self._lock_fd is None:
            raise RuntimeError("only the CacheWriter holding the lock may consolidate")
        import h5py

        videos = _part_videos(self.parts)
        text_part = self.parts / _TEXT_PART
        if not videos and not text_part.exists() and self.path.exists():
            self._remove_parts()
            return self.path  # nothing new: leave the file (and its bytes) untouched

        # The new file is the old one plus the parts: refuse at once if the device cannot hold it.
        old = self.path.stat().st_size if self.path.exists() else 0
        _check_room(self.path, old + sum(p.stat().st_size for p in self.parts.glob("*.h5")))
        _quiet_h5_teardown_on_full_disk()  # should the device fill up all the same while HDF5 writes

        def fill(tmp: Path) -> None:
            if self.path.exists():
                shutil.copyfile(self.path, tmp)  # sequential copy: far cheaper than re-writing per dataset
            with h5py.File(tmp, "r+" if self.path.exists() else "w") as out:
                _set_root_attrs(out, self.provenance)
                root = out.require_group("videos")
                for video in videos:
                    if video in root:
                        continue  # a previous run renamed the file but died before deleting this part
                    with _open_h5(self.parts / f"{video}.h5") as part:
                        part.copy(part[f"videos/{video}"], root, name=video)
                if text_part.exists():
                    if "text" in out:
                        del out["text"]
                    with _open_h5(text_part) as part:
                        part.copy(part["text"], out, name="text")
                # Last: the digest covers every attribute and text string now in the file.
                out.attrs[CHECKSUM_ATTR] = metadata_digest(out)

        atomic_write(self.path, fill, durable=True)
        self._consolidated |= set(videos)
        self._remove_parts()
        return self.path

    def _remove_parts(self) -> None:
        if self.parts.is_dir():
            shutil.rmtree(self.parts, ignore_errors=True)


# -------------------------------------------------------------------------------------------- modality


class RowWords(NamedTuple):
    """How messages speak of a cache's rows, by what the encoder read."""

    rows: str  # what the rows are
    missing: str  # what a frame without a row lacks
    bad: str  # what bad_frames lists


_ROW_WORDS = {
    "face": RowWords("crops", "without a crop", "bad frames"),
    "audio": RowWords("frames with audio", "without audio", "frames without audio"),
}


def modality_of(record: Any) -> str:
    """"face" or "audio": what a cache's rows come from, read from its provenance or fingerprint (the audio
    encoders record ``preprocessing.modality``; face caches, older than that, do not)."""
    pre = record.get("preprocessing") if isinstance(record, dict) else None
    return str(pre.get("modality", "face")) if isinstance(pre, dict) else "face"


def row_words(modalities: Iterable[str]) -> RowWords:
    """The words for the rows of caches of these modalities (fused caches of several: rows of any cache)."""
    kinds = set(modalities) or {"face"}
    if len(kinds) == 1 and next(iter(kinds)) in _ROW_WORDS:
        return _ROW_WORDS[kinds.pop()]
    return RowWords("rows", "in no cache", "frames without a row")


# --------------------------------------------------------------------------------------------------- reader


class FeatureCache:
    """Read-only access to a consolidated cache. Opening is cheap; ``load_all`` reads everything at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            hint = ""
            if parts_dir(self.path).is_dir():
                hint = f" ({parts_dir(self.path)} holds unconsolidated videos: re-run `abawfeat extract`)"
            raise CacheError(f"{self.path}: no such cache file{hint}")
        self._fh = _open_h5(self.path)
        try:
            self.provenance: dict[str, Any] = read_provenance(self._fh, self.path)
            if self.provenance["format_version"] >= 2:
                check_metadata(self._fh, self.path)
            self.encoder: str = str(self.provenance["encoder"])
            self.feature_dim: int = _positive_int(self.provenance["feature_dim"], self.path, "feature_dim")
            self.dtype: np.dtype = _feature_dtype(self.provenance["dtype"], self.path)
            self._videos = sorted(self._fh["videos"].keys()) if "videos" in self._fh else []
            self._sources_ok: set[str] = set()
            self._warned_unrecorded = False
            self._warned_no_crops = False
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_fh", None) is not None:
            self._fh.close()
            self._fh = None

    @property
    def format_version(self) -> int:
        return int(self.provenance["format_version"])

    @property
    def modality(self) -> str:
        """"face" (rows are crops) or "audio" (rows are crop frames with audio); see ``modality_of``."""
        return modality_of(self.provenance)

    @property
    def has_checksums(self) -> bool:
        """Whether the file carries checksums (format version 2 on); version-1 files have none."""
        return self.format_version >= 2

    def _read(self, video: str, name: str, dataset: Any) -> np.ndarray:
        """The whole dataset, or one line naming it if HDF5 cannot read it (a failed fletcher32 check)."""
        return _read_dataset(self.path, f"/videos/{video}/{name}", dataset)

    def _checked(self, video: str) -> Any:
        """The video's group, after checking its shapes against the provenance (a feature size in the
        attributes that disagrees with the data would otherwise surface as a broadcast error in stage two)."""
        group = self._group(video)
        problem = _shape_problem(group, self.feature_dim)
        if problem:
            raise CacheError(f"{self.path}: /videos/{video}: {problem}; "
                             f"run `abawfeat cache verify {self.path}`")
        return group

    def __contains__(self, video: object) -> bool:
        return video in self._videos

    def __len__(self) -> int:
        return len(self._videos)

    def videos(self) -> list[str]:
        return list(self._videos)

    def _group(self, video: str) -> Any:
        if video not in self._videos:
            raise CacheError(f"{self.path}: video {video!r} is not in the cache")
        return self._fh["videos"][video]

    def frames(self, video: str) -> np.ndarray:
        """int32 [T]: the 1-based frame numbers of the rows, strictly ascending (checked: rows of repeated
        or unordered frames would be aligned to the wrong labels without a word)."""
        group = self._checked(video)
        frames = self._read(video, "frames", group["frames"]).astype(np.int32, copy=False)
        problem = _frames_problem(frames)
        if problem:
            raise CacheError(f"{self.path}: /videos/{video}/frames: {problem}; the cache is not usable for "
                             f"this video: run `abawfeat cache verify {self.path}` and re-extract it")
        return frames

    def features(self, video: str, dtype: Any = np.float32) -> np.ndarray:
        """[T, D] features; float32 by default (contract), ``dtype=None`` keeps the stored dtype. NaN or
        infinite values are refused here, naming the video (they would poison training after an epoch)."""
        arr = self._read(video, "features", self._checked(video)["features"])
        self._check_finite(video, arr)
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def _check_finite(self, video: str, arr: np.ndarray) -> None:
        if arr.size and not np.isfinite(arr).all():
            n = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise CacheError(f"{self.path}: /videos/{video}/features: {n} NaN/inf values; the cache is "
                             f"not usable for this video: run `abawfeat cache verify {self.path}` and "
                             "re-extract it")

    def check_source(self, video: str, data: Any) -> None:
        """Refuse (one line naming the cache, the video and the tree) a video whose rows were extracted from
        another crop tree than ``data`` (``AffWild2``): its frame numbers, or its crops, differ from the
        tree's. Videos written before caches recorded their crops are checked by frame numbers alone, with
        one warning per cache."""
        if video in self._sources_ok:
            return
        if data.crop_dir(video) is None:
            # A tree without this video's crops (annotations beside caches, the crops kept elsewhere):
            # nothing to check against; said once.
            if not self._warned_no_crops:
                from abawfeat.utils.progress import warn

                self._warned_no_crops = True
                warn(f"{self.path}: {data.root} has no crop folder of {video} (and maybe other videos): "
                     "the cache's rows of such videos cannot be checked against the crops they came from")
            self._sources_ok.add(video)
            return
        self.frames(video)  # unordered or repeated frames are said as such first
        listed, digest = _group_source(self.path, video, self._group(video))
        why = source_problem(listed, digest, data, video)
        if why:
            raise CacheError(f"{self.path}: video {video!r} was extracted from another crop tree than "
                             f"{data.root} ({why}){_tree_note(self.provenance)}; re-extract it from "
                             f"{data.root} (`abawfeat extract --data {data.root}`) into another --out")
        if digest is None and not self._warned_unrecorded:
            from abawfeat.utils.progress import warn

            self._warned_unrecorded = True
            warn(f"{self.path}: written before caches recorded the crops they come from: checked against "
                 f"{data.root} by frame numbers only; re-extract it to have its crops checked too")
        self._sources_ok.add(video)

    def logits(self, video: str) -> np.ndarray | None:
        group = self._checked(video)
        return self._read(video, "logits", group["logits"]) if "logits" in group else None

    def bad_frames(self, video: str) -> np.ndarray:
        group = self._group(video)
        if "bad_frames" not in group:
            return np.zeros(0, np.int32)
        return self._read(video, "bad_frames", group["bad_frames"]).astype(np.int32, copy=False)

    def n_frames(self, video: str) -> int:
        return int(self._group(video)["frames"].shape[0])

    def load_all(
        self, videos: Iterable[str] | None = None, dtype: Any = None
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{video: (frames int32 [T], features [T, D])}`` for all (or the named) videos, in the stored
        dtype unless ``dtype`` is given: 1.7 M x 512 fp16 frames are 1.7 GB, float32 would double that."""
        names = self._videos if videos is None else list(videos)
        root = self._fh.get("videos", {})
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for video in names:
            if video not in root:
                raise CacheError(f"{self.path}: video {video!r} is not in the cache")
            group = self._checked(video)
            fds = group["features"]
            # read_direct into a preallocated array skips one copy inside h5py.
            feats = np.empty(fds.shape, dtype=fds.dtype)
            if feats.size:
                try:
                    fds.read_direct(feats)
                except OSError as exc:
                    raise _damaged(self.path, f"/videos/{video}/features", exc) from None
            self._check_finite(video, feats)
            if dtype is not None:
                feats = feats.astype(dtype, copy=False)
            out[video] = (self.frames(video), feats)
        return out

    def text_embeddings(self) -> tuple[list[str], np.ndarray] | None:
        if "text" not in self._fh:
            return None
        text = self._fh["text"]
        raw = _read_dataset(self.path, "/text/names", text["names"])
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
        return names, _read_dataset(self.path, "/text/embeddings", text["embeddings"])

    def text_prompts(self) -> list[str] | None:
        """The texts that were encoded, one per class (None without text embeddings)."""
        if "text" not in self._fh or "prompts" not in self._fh["text"]:
            return None
        return [n.decode() if isinstance(n, bytes) else str(n) for n in self._fh["text"]["prompts"][()]]

    def text_template(self) -> str | None:
        return None if "text" not in self._fh else str(self._fh["text"].attrs.get("template", ""))

    def fingerprint(self) -> dict[str, Any]:
        """What a stage-two checkpoint records and must find again: the encoder, its configuration and
        weights, preprocessing, feature size and calibration (not the dtype or when it was written)."""
        return fingerprint_of(self.provenance)

    def total_frames(self) -> int:
        return sum(self.n_frames(v) for v in self._videos)


def fingerprint_of(provenance: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint (see ``FeatureCache.fingerprint``) of a provenance dict; the weights appear by their
    sha256 only, not by the path they were loaded from."""
    provenance = _without_weight_paths(provenance)
    return {key: _jsonable(provenance.get(key)) for key in FINGERPRINT_KEYS}


# --------------------------------------------------------------------------------------------- inspection


def cache_info(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary (what ``abawfeat cache info`` prints)."""
    path = Path(path)
    with FeatureCache(path) as cache:
        per_video = []
        n_frames = n_bad = 0
        for video in cache.videos():
            group = cache._group(video)
            t = int(group["frames"].shape[0])
            bad = cache.bad_frames(video)
            n_frames += t
            n_bad += len(bad)
            per_video.append({"video": video, "frames": t, "bad_frames": bad.tolist()})
        text = cache.text_embeddings()
        info = {
            "path": str(path),
            "size_bytes": path.stat().st_size,
            "encoder": cache.encoder,
            "modality": cache.modality,
            "feature_dim": cache.feature_dim,
            "dtype": str(cache.dtype),
            "videos": len(per_video),
            "frames": n_frames,
            "bad_frames": n_bad,
            "text_classes": None if text is None else text[0],
            "format_version": cache.format_version,
            "checksums": cache.has_checksums,
            "provenance": cache.provenance,
            "fingerprint": cache.fingerprint(),
            "unconsolidated_parts": len(_part_videos(parts_dir(path))),
            "per_video": per_video,
        }
    return info


def verify_cache(path: str | Path, data: Any = None) -> list[str]:
    """Every problem found, one line each (empty when the cache is sound): every checksum (each dataset's
    fletcher32, read in full, and the digest of the attributes and text strings), provenance present and
    decodable, every video complete, frames ascending int32, shapes and dtypes consistent, no NaN/inf.
    A version-1 cache has no checksums; its structure and values are checked all the same.

    ``data`` (an ``AffWild2``): also check that every video's frames are the crops of that tree's video
    (``FeatureCache.check_source``)."""
    path = Path(path)
    if not path.is_file():
        return [f"{path}: no such file"]
    try:
        fh = _open_h5(path)
    except CacheError as exc:
        return [str(exc)]
    problems: list[str] = []
    with fh:
        try:
            raw = _raw_attrs(fh, path)
        except CacheError as exc:
            return [str(exc)]
        attrs: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                attrs[key] = _decode_attr(value, key, path)
            except CacheError as exc:
                problems.append(str(exc))
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            problems.append(f"{path}: provenance lacks {', '.join(missing)}")
        version = attrs.get("format_version")
        if attrs.get("format") not in (None, FORMAT_NAME) or (
            "format_version" in attrs and version not in READABLE_VERSIONS
        ):
            problems.append(
                f"{path}: format {attrs.get('format')!r} version {version!r} is not {FORMAT_NAME} version "
                f"{' or '.join(map(str, READABLE_VERSIONS))}"
            )
        checked = isinstance(version, int) and version >= 2
        if checked:
            try:
                check_metadata(fh, path)
            except CacheError as exc:
                problems.append(str(exc))
        dim = attrs.get("feature_dim")
        dtype = attrs.get("dtype")
        if "videos" not in fh:
            problems.append(f"{path}: no /videos group")
            return problems
        for video in sorted(fh["videos"].keys()):
            problems += _verify_video(path, video, fh["videos"][video], dim, dtype, checked)
            if data is not None:
                problems += _verify_source(path, video, fh["videos"][video], data)
        if "text" in fh:
            problems += _verify_text(path, fh["text"], dim, checked)
    if parts_dir(path).is_dir() and _part_videos(parts_dir(path)):
        problems.append(
            f"{parts_dir(path)}: unconsolidated videos left by an interrupted run; re-run extract"
        )
    return problems


def _verify_video(path: Path, video: str, group: Any, dim: Any, dtype: Any, checked: bool) -> list[str]:
    where = f"{path}: /videos/{video}"
    problems = []
    for name in ("features", "frames", "bad_frames"):
        if name not in group:
            problems.append(f"{where}: missing dataset {name}")
    if problems:
        return problems
    names = [n for n in ("features", "frames", "bad_frames", "logits") if n in group]
    values: dict[str, np.ndarray] = {}
    for name in names:
        if checked and not group[name].fletcher32:
            problems.append(f"{where}/{name}: stored without its checksum (fletcher32)")
        try:
            values[name] = _read_dataset(path, f"/videos/{video}/{name}", group[name])
        except CacheError as exc:
            problems.append(str(exc))
    feats, frames, bad = group["features"], group["frames"], group["bad_frames"]
    if frames.dtype != np.int32 or frames.ndim != 1:
        problems.append(f"{where}/frames: expected int32 [T], found {frames.dtype} {frames.shape}")
    if bad.dtype != np.int32 or bad.ndim != 1:
        problems.append(f"{where}/bad_frames: expected int32 [K], found {bad.dtype} {bad.shape}")
    if dtype is not None and str(feats.dtype) != str(dtype):
        problems.append(f"{where}/features: dtype {feats.dtype}, provenance says {dtype}")
    if feats.ndim != 2 or feats.shape[0] != frames.shape[0] or (dim is not None and feats.shape[1] != dim):
        problems.append(f"{where}/features: shape {feats.shape}, expected ({frames.shape[0]}, {dim})")
    if "frames" in values and "bad_frames" in values:
        f, b = values["frames"], values["bad_frames"]
        order = _frames_problem(np.asarray(f))
        if order:
            problems.append(f"{where}/frames: {order} (frames must be 1-based, ascending and unique)")
        if np.intersect1d(f, b).size:
            problems.append(f"{where}: frames also listed in bad_frames")
        n_crops = group.attrs.get("n_crops")
        if n_crops is None or int(n_crops) != f.size + b.size:
            problems.append(
                f"{where}: incomplete: {f.size} frames + {b.size} bad frames != n_crops {n_crops}"
            )
    if "features" in values and values["features"].ndim == 2 and values["features"].size:
        x = values["features"]
        n_nonfinite = int(x.size - np.count_nonzero(np.isfinite(x)))
        if n_nonfinite:
            problems.append(f"{where}/features: {n_nonfinite} NaN/inf values")
    if "logits" in group:
        logits = group["logits"]
        if logits.ndim != 2 or logits.shape[0] != frames.shape[0]:
            problems.append(f"{where}/logits: shape {logits.shape}, expected ({frames.shape[0]}, C)")
        elif "logits" in values and not np.all(np.isfinite(values["logits"])):
            problems.append(f"{where}/logits: NaN/inf values")
    return problems


def recorded_tree(path: str | Path) -> Path | None:
    """The crop tree a cache says it was extracted from, when that folder still exists; else None."""
    try:
        with _open_h5(Path(path)) as fh:
            tree = _decode_attr(fh.attrs.get("tree"), "tree", path)
    except (CacheError, OSError):
        return None
    root = tree.get("root") if isinstance(tree, dict) else None
    return Path(root) if root and Path(root).is_dir() else None


def _verify_source(path: Path, video: str, group: Any, data: Any) -> list[str]:
    if video not in set(data.videos_with_crops()):
        return [f"{path}: /videos/{video}: {data.root} has no crops of this video (another crop tree's)"]
    try:
        listed, digest = _group_source(path, video, group)
        if "frames" in group and _frames_problem(np.asarray(group["frames"][()])):
            return []  # _verify_video has said what is wrong with its frames
        why = source_problem(listed, digest, data, video)
    except CacheError:
        return []  # its frames cannot be read: _verify_video has said so already
    except AbawfeatError as exc:
        return [str(exc)]
    if not why:
        return []
    return [f"{path}: /videos/{video}: extracted from another crop tree than {data.root} ({why})"]


def _verify_text(path: Path, text: Any, dim: Any, checked: bool) -> list[str]:
    if "names" not in text or "embeddings" not in text:
        return [f"{path}: /text lacks names or embeddings"]
    problems = []
    if checked and not text["embeddings"].fletcher32:
        problems.append(f"{path}: /text/embeddings: stored without its checksum (fletcher32)")
    for name in ("names", "prompts", "embeddings"):
        if name in text:
            try:
                _read_dataset(path, f"/text/{name}", text[name])
            except CacheError as exc:
                problems.append(str(exc))
    if text["embeddings"].shape != (len(text["names"]), dim):
        problems.append(f"{path}: /text/embeddings has shape {text['embeddings'].shape}, expected "
                        f"({len(text['names'])}, {dim})")
    return problems


# -------------------------------------------------------------------------------------------------- helpers


def read_provenance(fh: Any, path: Path) -> dict[str, Any]:
    """The root attributes, decoded; a ``CacheError`` (one line) for anything that is not a readable cache:
    no format attribute, an unknown version, an attribute that is not valid JSON, a missing key."""
    raw = _raw_attrs(fh, path)
    if raw.get("format") != FORMAT_NAME:
        raise CacheError(f"{path}: not an abawfeat feature cache (no '{FORMAT_NAME}' format attribute)")
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise CacheError(
            f"{path}: cache format version {version} is not supported by this abawfeat (it reads versions "
            f"{readable}); re-extract it, or use the abawfeat that wrote it"
        )
    attrs = {k: _decode_attr(v, k, path) for k, v in raw.items() if k != CHECKSUM_ATTR}
    for key in ("encoder", "feature_dim", "dtype"):
        if key not in attrs:
            raise CacheError(f"{path}: provenance attribute {key!r} is missing")
    return attrs


def metadata_digest(fh: Any) -> str:
    """SHA-256 of every attribute in the file (root, each video group, /text) and of the /text strings, as
    stored (before any JSON decoding), in one canonical JSON text. ``CHECKSUM_ATTR`` itself is left out."""
    def attrs(obj: Any) -> dict[str, Any]:
        return {k: _plain(v) for k, v in obj.attrs.items() if k != CHECKSUM_ATTR}

    doc: dict[str, Any] = {"root": attrs(fh), "videos": {}}
    if "videos" in fh:
        doc["videos"] = {name: attrs(group) for name, group in fh["videos"].items()}
    if "text" in fh:
        text = fh["text"]
        doc["text"] = {"attrs": attrs(text)}
        for name in ("names", "prompts"):
            if name in text:
                doc["text"][name] = [_plain(v) for v in text[name][()]]
    blob = json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def check_metadata(fh: Any, path: Path) -> None:
    """Refuse (one line) a version-2 file whose attributes or text strings do not match their digest."""
    stored = fh.attrs.get(CHECKSUM_ATTR)
    if stored is None:
        raise CacheError(f"{path}: attribute {CHECKSUM_ATTR!r} is missing (a version-2 cache always has it); "
                         f"the file is damaged or was edited outside abawfeat")
    try:
        actual = metadata_digest(fh)
    except (OSError, ValueError, KeyError) as exc:
        raise _damaged(path, "the attributes", exc) from None
    if _plain(stored) != actual:
        raise CacheError(f"{path}: the attributes or /text strings do not match their checksum "
                         f"({CHECKSUM_ATTR}): the file is damaged or was edited outside abawfeat; "
                         "re-extract it into another --out")


def _raw_attrs(fh: Any, path: Path) -> dict[str, Any]:
    try:
        return {k: _plain(v) for k, v in fh.attrs.items()}
    except (OSError, KeyError, RuntimeError) as exc:
        raise _damaged(path, "the root attributes", exc) from None


def _plain(value: Any) -> Any:
    """An attribute or string value as plain Python (str for text, int/float, lists for arrays)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    return value


def _read_dataset(path: Path, name: str, dataset: Any) -> np.ndarray:
    try:
        return dataset[()]
    except OSError as exc:
        raise _damaged(path, name, exc) from None


def _damaged(path: Path, what: str, exc: BaseException) -> CacheError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    reason = "checksum mismatch" if "filter returned failure" in text else f"unreadable: {text}"
    return CacheError(f"{path}: {what}: {reason}, the file is damaged; run `abawfeat cache verify {path}` "
                      "and re-extract into another --out")


def _frames_problem(frames: np.ndarray) -> str | None:
    """Why frame numbers are not 1-based and strictly ascending (hence unique), or None."""
    if not frames.size:
        return None
    if int(frames.min()) < 1:
        return f"frame number {int(frames.min())} (frames are 1-based)"
    steps = np.diff(frames.astype(np.int64))
    if np.any(steps == 0):
        return f"frame {int(frames[1:][steps == 0][0])} appears more than once"
    if np.any(steps < 0):
        return "not in ascending order"
    return None


def _group_source(path: Path, video: str, group: Any) -> tuple[np.ndarray, str | None]:
    """(the crop frames a video's rows account for: its frames and bad frames, sorted; its recorded
    ``crops_sha256`` or None) of a video group."""
    frames = _read_dataset(path, f"/videos/{video}/frames", group["frames"]) if "frames" in group else []
    bad = _read_dataset(path, f"/videos/{video}/bad_frames", group["bad_frames"]) if "bad_frames" in group \
        else []
    digest = group.attrs.get(CROPS_ATTR)
    return np.union1d(np.asarray(frames, np.int64), np.asarray(bad, np.int64)), (
        None if digest is None else str(_plain(digest)))


def source_problem(listed: np.ndarray, digest: str | None, data: Any, video: str) -> str | None:
    """Why a cache's video (``listed``: its frames and bad frames; ``digest``: its ``crops_sha256``) was
    not extracted from ``data``'s crops of ``video``, in a few words; None when it was. The frame numbers
    say it first (every crop of the folder is a row or a bad frame, exactly); the digest also catches another
    tree's video with the same frame numbers (other images)."""
    tree = np.asarray(data.crop_frames(video), np.int64)
    if not np.array_equal(listed, tree):
        def span(f: np.ndarray) -> str:
            return f"{len(f)} frames" + (f", {int(f[0])}-{int(f[-1])}" if len(f) else "")

        extra = np.setdiff1d(listed, tree)
        note = f"; frame {int(extra[0])} has no crop there" if extra.size else ""
        return f"the cache has {span(listed)}, the tree's crop folder {span(tree)}{note}"
    if digest is not None and digest != data.crop_identity(video):
        return "the same frame numbers but other crop images"
    return None


def _tree_note(provenance: dict[str, Any]) -> str:
    tree = provenance.get("tree")
    root = tree.get("root") if isinstance(tree, dict) else None
    return f"; the cache says it was extracted from {root}" if root else ""


def _shape_problem(group: Any, dim: int) -> str | None:
    """Why a video group cannot be read as [T, dim] features for T frames, or None."""
    for name in ("features", "frames"):
        if name not in group:
            return f"missing dataset {name}"
    feats, frames = group["features"], group["frames"]
    if feats.ndim != 2:
        return f"features have shape {feats.shape}, not [frames, {dim}]"
    if feats.shape[1] != dim:
        return f"features are {feats.shape[1]}-d but the cache's feature_dim attribute says {dim}"
    if frames.ndim != 1 or frames.shape[0] != feats.shape[0]:
        return f"{feats.shape[0]} feature rows for frames of shape {frames.shape}"
    if "logits" in group and (group["logits"].ndim != 2 or group["logits"].shape[0] != feats.shape[0]):
        return f"logits of shape {group['logits'].shape} for {feats.shape[0]} frames"
    return None


def _positive_int(value: Any, path: Path, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CacheError(f"{path}: attribute {key!r} is {value!r}, not a positive integer")
    return value


def _feature_dtype(value: Any, path: Path) -> np.dtype:
    if value not in FEATURE_DTYPES:
        raise CacheError(f"{path}: attribute 'dtype' is {value!r}, not one of {', '.join(FEATURE_DTYPES)}")
    return np.dtype(value)


def _open_h5(path: Path) -> Any:
    import h5py

    try:
        # No HDF5 file locking: a consolidated file is never modified in place (we replace it whole),
        # and HDF5's own locks fail on some network filesystems.
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        # h5py's message may run over several lines (a time stamp, the file descriptor): its first one.
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CacheError(f"{path}: not a readable HDF5 file ({first})") from None


def _write_video_group(
    group: Any, frames: np.ndarray, features: np.ndarray, logits: np.ndarray | None, bad: np.ndarray
) -> None:
    _create_checked(group, "features", features)
    _create_checked(group, "frames", frames.astype(np.int32))
    _create_checked(group, "bad_frames", bad.astype(np.int32))
    if logits is not None:
        _create_checked(group, "logits", logits.astype(np.float32))
    group.attrs["n_crops"] = int(len(frames) + len(bad))


def _create_checked(group: Any, name: str, data: np.ndarray) -> None:
    """A dataset with HDF5's fletcher32 checksum: chunked (one chunk per dataset up to ``_CHUNK_BYTES``,
    uncompressed), because HDF5 filters only apply to chunks. Stage two reads whole videos; what the check
    costs against a plain contiguous read is measured in docs/performance.md ("Reading a cache"). An empty
    dataset gets a one-row chunk and an extensible first axis (HDF5 needs both)."""
    data = np.ascontiguousarray(data)
    if data.size == 0:
        chunks = (1, *data.shape[1:])
        maxshape: tuple[int | None, ...] | None = (None, *data.shape[1:])
    else:
        row_bytes = max(1, data[:1].nbytes)
        chunks = (min(data.shape[0], max(1, _CHUNK_BYTES // row_bytes)), *data.shape[1:])
        maxshape = None
    group.create_dataset(name, data=data, chunks=chunks, maxshape=maxshape, fletcher32=True)


def _write_text_group(
    fh: Any, names: list[str], embeddings: np.ndarray, template: str, prompts: list[str]
) -> None:
    import h5py

    text = fh.create_group("text")
    # Variable-length strings cannot take HDF5 filters: the names and prompts are covered by metadata_sha256.
    text.create_dataset("names", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
    text.create_dataset("prompts", data=np.array(prompts, dtype=object), dtype=h5py.string_dtype())
    _create_checked(text, "embeddings", np.asarray(embeddings))
    text.attrs["template"] = template


def _write_h5_atomic(target: Path, fill: Any) -> None:
    """A small HDF5 file (one video, or the text embeddings), built in memory and written as bytes: HDF5
    never writes to the device itself, so a full disk is a plain ENOSPC from one write (a DiskFullError
    naming the part), never a half-closed HDF5 file whose objects fail again when they are freed."""
    import io

    import h5py

    def write(tmp: Path) -> None:
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as fh:
            fill(fh)
        tmp.write_bytes(buffer.getvalue())

    atomic_write(target, write, durable=True)


def _check_room(path: Path, needed: int) -> None:
    """Refuse, before writing anything, a consolidation the device has clearly no room for."""
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        kept = "its previous content is kept" if path.exists() else "nothing was written there"
        raise DiskFullError(
            f"{path}: no space left on the device to consolidate it (needs about {needed / 1e6:,.1f} MB, "
            f"{free / 1e6:,.1f} MB free); {kept}, and the finished videos wait in {parts_dir(path)}"
        )


def _quiet_h5_teardown_on_full_disk() -> None:
    """HDF5 objects of a file whose last write hit a full device fail again when Python frees them, and
    Python prints each failure as an "Exception ignored" traceback. The full disk has already been reported
    in one line (DiskFullError), so those echoes are dropped; every other unraisable error still shows."""
    previous = sys.unraisablehook
    if getattr(previous, "_abawfeat_h5_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        from_h5py = "h5py" in f"{unraisable.err_msg} {unraisable.object!r}"
        error = unraisable.exc_value
        if from_h5py and error is not None and (is_disk_full(error) or "errno = 28" in str(error)):
            return  # HDF5 says "errno = 28" (ENOSPC) in its own words
        previous(unraisable)

    hook._abawfeat_h5_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _part_videos(parts: Path) -> list[str]:
    if not parts.is_dir():
        return []
    return sorted(p.name[:-3] for p in parts.glob("*.h5") if not p.name.startswith((".", "_")))


def _set_root_attrs(fh: Any, provenance: dict[str, Any]) -> None:
    for key in list(fh.attrs.keys()):
        del fh.attrs[key]
    for key, value in sorted(provenance.items()):
        # Scalars stay native (h5dump shows them plainly); anything nested is stored as JSON text.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            fh.attrs[key] = value
        else:
            fh.attrs[key] = "json:" + json.dumps(value, sort_keys=True)


def _decode_attr(value: Any, key: str = "?", path: Path | str = "?") -> Any:
    value = _plain(value)
    if isinstance(value, str) and value.startswith("json:"):
        try:
            return json.loads(value[5:])
        except ValueError as exc:
            at = f" ({exc.msg} at character {exc.pos + 5})" if isinstance(exc, json.JSONDecodeError) else ""
            raise CacheError(f"{path}: attribute {key!r} is not valid JSON{at}; the file is damaged or "
                             "was edited outside abawfeat") from None
    return value


def _check_video_name(video: str) -> None:
    # The reader refuses such names first, in one line naming the folder; reaching here is a caller's bug.
    problem = video_name_problem(video)
    if problem is not None:
        raise ValueError(f"video name {video!r} cannot be stored: {problem}")


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so stored and compared provenance have one canonical form."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"provenance value {value!r} is not JSON-serialisable")


def _canonical(value: Any) -> str:
    return json.dumps(_jsonable(value), sort_keys=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

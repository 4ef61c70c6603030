"""Finding each video's source file (the audio's container) in an Aff-Wild2 tree.

The release ships the source videos beside the crops, but folder names differ between releases and copies
(``videos/batch1``, ``videos/batch2``, ``raw_video``, ``new_vids``, ...), so the tree is searched rather than
a path assumed. A file counts when its name is ``<video>.<ext>`` with a video extension; the crop folders and
the annotations folder are never descended into (they hold millions of files and no videos). A
``<video>_left`` / ``<video>_right`` pair names the two people of ONE source video ``<video>``: they map to
its file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from abawfeat.data.names import source_video

# Extensions looked for, in order of preference when one video has several files (the release uses the first
# two; the others are what users' own copies come as).
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm")
_MAX_DEPTH = 8  # deep enough for any release layout; bounds a walk that a symlink loop could make endless


@dataclass
class SourceIndex:
    """Source video files by name (the file name without its extension), as found under a root."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)
    # name -> every file found for it, when there was more than one (the first is used)
    duplicates: dict[str, list[Path]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    def find(self, video: str) -> Path | None:
        """The file for ``video``: its own name first, then its pair's source name (``X`` for ``X_left``)."""
        if video in self.files:
            return self.files[video]
        return self.files.get(source_video(video))


def find_source_videos(root: str | Path, skip: Iterable[str | Path] = ()) -> SourceIndex:
    """Every video file under ``root`` (not following into ``skip`` folders, hidden folders or symlinked
    folders), by name. Several files for one name: the preferred extension wins, then the shortest path,
    then the path in sorting order; the others are listed in ``duplicates``."""
    root = Path(root)
    skipped = {os.path.normcase(os.path.abspath(p)) for p in skip}
    found: dict[str, list[Path]] = {}
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable folder: nothing to find there
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth < _MAX_DEPTH and os.path.normcase(os.path.abspath(entry.path)) not in skipped:
                        stack.append((Path(entry.path), depth + 1))
                    continue
                is_file = entry.is_file()
            except OSError:
                continue
            stem, ext = os.path.splitext(entry.name)
            if is_file and stem and ext.lower() in VIDEO_SUFFIXES:
                found.setdefault(stem, []).append(Path(entry.path))
    index = SourceIndex(root=root)
    for name in sorted(found):
        paths = sorted(found[name],
                       key=lambda p: (VIDEO_SUFFIXES.index(p.suffix.lower()), len(p.parts), str(p)))
        index.files[name] = paths[0]
        if len(paths) > 1:
            index.duplicates[name] = paths
    return index

"""The one atomic write and the one registry class."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from abawfeat.errors import ConfigError, DiskFullError
from abawfeat.utils.io import atomic_write, atomic_write_text, is_disk_full, torch_save, write_json
from abawfeat.utils.registry import Registry


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        paths = [
            write_json(tmp_path / "a.json", {"x": 1}),
            atomic_write_text(tmp_path / "b.txt", "hello\n"),
            torch_save(tmp_path / "c.pt", {"x": 1}),
        ]
    finally:
        os.umask(old)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_disk_full_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"old": True})
    before = target.read_bytes()

    def full(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as info:
        atomic_write(target, full)
    message = str(info.value)
    assert str(target) in message and "no space left" in message and "previous content is kept" in message
    assert "\n" not in message
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_disk_full_is_recognised_through_wrapping_errors() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from inner
    except RuntimeError as exc:
        assert is_disk_full(exc)
    assert not is_disk_full(RuntimeError("something else"))


def test_a_writer_that_loses_the_errno_on_a_full_device_is_still_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save on a full device raises "unexpected pos" without ENOSPC; the device's free space tells."""
    import shutil

    def torch_like(tmp: Path) -> None:
        tmp.write_bytes(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2240 vs 2134")

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
    with pytest.raises(DiskFullError, match="no space left on the device"):
        atomic_write(tmp_path / "checkpoint.pt", torch_like)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room left it is not a full disk
        atomic_write(tmp_path / "checkpoint.pt", torch_like)
    assert list(tmp_path.iterdir()) == []


def test_other_failures_propagate_and_clean_up(tmp_path: Path) -> None:
    def boom(tmp: Path) -> None:
        tmp.write_text("x")
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        atomic_write(tmp_path / "out.txt", boom)
    assert list(tmp_path.iterdir()) == []


def test_registry_names_entries_and_refuses_duplicates() -> None:
    reg: Registry[type] = Registry("widget")

    @reg.register("b")
    class B:
        name = ""

    @reg.register("a")
    class A:
        name = ""

    assert reg.names() == ["a", "b"] and A.name == "a" and reg.get("b") is B
    assert "a" in reg and len(reg) == 2
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", B)
    assert A.name == "a" and reg.get("a") is A
    with pytest.raises(ConfigError, match=r"unknown widget 'c'; choose one of a, b"):
        reg.get("c")

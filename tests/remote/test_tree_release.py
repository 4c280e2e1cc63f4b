"""The destination side's landing bookkeeping, driven directly (no daemon): a file whose commit
fails must not release its directory twice, or a sibling landing through the same directory fd
could see it closed (and its number reused for another directory) mid-write."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from blit import fsops
from blit.transport import protocol
from blit.transport.tree import DestTree, SourceTree, TreeSpec


def _open_root(p: Path) -> int:
    return os.open(p, os.O_RDONLY | os.O_DIRECTORY)


def test_a_failed_commit_releases_its_directory_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (dst / "d").mkdir(parents=True)
    for name in ("a", "b"):
        (src / "d" / name).write_bytes(name.encode() * 100)
    source = SourceTree(_open_root(src))
    dest = DestTree(_open_root(dst), TreeSpec())
    try:
        manifest = source.scan("d")
        planned = dest.plan("d", "d", False, None, manifest.entries, False)
        assert planned.packed_need is not None
        fids, names = protocol.unpack_needs(planned.packed_need)
        ids = dict(zip(names, fids))
        assert set(ids) == {b"a", b"b"}
        fa, fb = dest.open(ids[b"a"]), dest.open(ids[b"b"])
        held = dest.dirs._fds["d"][1]
        assert held == 2  # each open file holds the directory

        cls = type(fa.landing)
        real_commit = cls.commit

        def commit(self: object, *args: object) -> None:
            if self is fa.landing:  # the disk fills up just as this one file is named
                raise OSError(errno.ENOSPC, "No space left on device")
            real_commit(self, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(cls, "commit", commit)
        os.pwrite(fa.fd, b"a" * 100, 0)
        with pytest.raises(OSError):
            fa.commit(100)
        fa.abort()  # what the data stream does after a failed commit
        assert dest.dirs._fds["d"][1] == 1, "the failed file released its directory twice"

        os.pwrite(fb.fd, b"b" * 100, 0)
        fb.commit(100)
        assert dest.dirs._fds["d"][1] == 0
    finally:
        source.close()
        dest.close()
    assert (dst / "d" / "b").read_bytes() == b"b" * 100
    assert not (dst / "d" / "a").exists()
    assert [n for n in os.listdir(dst / "d") if n.startswith(fsops.TMP_PREFIX)] == []

"""A receiver lands the whole small files already in its buffer in one call (data.receive_loop ->
DestTree.land_many -> scan.land_many): files come out byte-exact with their metadata, in batches,
per-file failures stay per file, and a repeated or unknown file id is a protocol error that
lands nothing of its batch."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from blit.errors import RemoteProtocolError
from blit.fsops import Meta
from blit.transport import data, tree
from blit.transport.protocol import FrameType, pack_frame
from blit.transport.tree import DestTree, TreeSpec

T0 = 1_700_000_000_000_000_000


def _small(fid: int, content: bytes) -> bytes:
    if not content:
        return pack_frame(FrameType.END, fid, 0, 0)
    return pack_frame(FrameType.DATA, fid, 0, len(content)) + content + pack_frame(FrameType.END, fid, len(content), 0)


def _meta(size: int, i: int, mode: int = 0o100640) -> Meta:
    return Meta(mode, size, T0 + i * 1_000_001, T0 - i, 4242 + i, 4343, 1, 1, 1, 0, 0)


def _tree(dst: Path, files: dict[int, tuple[str, str, Meta]]) -> DestTree:
    """A destination tree with `files` (id -> directory, name, source Meta) announced, as a
    plan would leave them."""
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    t = DestTree(fd, TreeSpec())
    for fid, (rel, name, m) in files.items():
        t.pending[fid] = tree._Pending(dst_rel=rel, dname=name, meta=m, xattrs=None, replace=False, rel=rel, name=name)
    return t


def _receive(t: DestTree, stream: bytes) -> tuple[data.StreamStats, list[list[int]]]:
    """Run receive_loop over `stream` (then DONE) from a real socket; returns its stats and the
    file ids of each land_many call."""
    a, b = socket.socketpair()
    calls: list[list[int]] = []
    real = t.land_many

    def spy(batch: list[tuple[int, int, int]], buf: bytearray) -> list[tuple[int, OSError]]:
        calls.append([fid for fid, _, _ in batch])
        return real(batch, buf)

    t.land_many = spy  # type: ignore[method-assign]
    sender = threading.Thread(target=lambda: (a.sendall(stream + pack_frame(FrameType.DONE, 0, 0, 0)), a.close()))
    sender.start()
    stats = data.StreamStats()
    try:
        data.receive_loop(data.StreamIO(b, what="test", stall=10), t, stats)
    finally:
        sender.join()
        b.close()
    return stats, calls


def test_small_files_in_the_buffer_land_in_batches_byte_exact(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    for d in ("", "a", "b"):
        (dst / d).mkdir(exist_ok=True)
    files: dict[int, tuple[str, str, Meta]] = {}
    contents: dict[int, bytes] = {}
    stream = b""
    for i in range(1, 601):  # 600 files over three directories, sizes 0 to ~6 KiB
        rel = ("", "a", "b")[i // 200 % 3]
        content = os.urandom((i * 37) % 6000) if i % 50 else b""
        files[i] = (rel, f"f{i:04d}", _meta(len(content), i))
        contents[i] = content
        stream += _small(i, content)
    big = os.urandom(data.SMALL_FILE + 1)  # not a whole small file: the per-file path, mid-stream
    files[1000] = ("a", "big", _meta(len(big), 1000))
    contents[1000] = big
    cut = sum(len(_small(i, contents[i])) for i in range(1, 301))
    stream = stream[:cut] + pack_frame(FrameType.DATA, 1000, 0, len(big)) + big + pack_frame(FrameType.END, 1000, len(big), 0) + stream[cut:]
    t = _tree(dst, files)
    try:
        stats, calls = _receive(t, stream)
    finally:
        t.close()
    assert stats.done and stats.files == 601 and not stats.failures
    batched = [fid for c in calls for fid in c]
    assert batched == list(range(1, 601))  # every small file went through land_many, in order
    assert max(len(c) for c in calls) > 1 and max(len(c) for c in calls) <= data.LAND_BATCH
    assert any(len({files[f][0] for f in c}) > 1 for c in calls)  # a batch across directories
    for fid, (rel, name, m) in files.items():
        p = dst / rel / name
        st = os.lstat(p)
        assert p.read_bytes() == contents[fid], name
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == m.st_mtime_ns, name
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (m.st_uid, m.st_gid), name
    assert t.files_copied == 601 and t.bytes_copied == sum(map(len, contents.values()))
    assert not t.pending


def test_a_file_that_cannot_land_fails_alone_inside_its_batch(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "f05").mkdir()  # a directory holds the name: linking the file there fails (EEXIST)
    files = {i: ("", f"f{i:02d}", _meta(10, i)) for i in range(1, 11)}
    t = _tree(dst, files)
    try:
        stats, calls = _receive(t, b"".join(_small(i, b"%010d" % i) for i in range(1, 11)))
    finally:
        t.close()
    assert len(calls) == 1 and len(calls[0]) == 10
    assert [fid for fid, _ in stats.failures] == [5]
    assert [(path, op) for path, op, _ in t.failures] == [("f05", "copy")]
    assert stats.files == 9 and t.files_copied == 9
    assert sorted(os.listdir(dst)) == [f"f{i:02d}" for i in range(1, 11)]  # no temporary left
    assert (dst / "f05").is_dir()
    for i in set(range(1, 11)) - {5}:
        assert (dst / f"f{i:02d}").read_bytes() == b"%010d" % i


@pytest.mark.parametrize("bad", ["repeated", "unknown"])
def test_a_repeated_or_unknown_file_id_lands_nothing_of_its_batch(tmp_path: Path, bad: str) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    files = {i: ("", f"f{i}", _meta(3, i)) for i in range(1, 5)}
    t = _tree(dst, files)
    ids = [1, 2, 2, 3] if bad == "repeated" else [1, 2, 99, 3]
    try:
        with pytest.raises(RemoteProtocolError, match="never announced"):
            _receive(t, b"".join(_small(i, b"abc") for i in ids))
    finally:
        t.close()
    assert os.listdir(dst) == []
    assert sorted(t.pending) == [1, 2, 3, 4]  # still owed: reported as not landed



def test_empty_files_land_in_batches_too(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    files = {i: ("", f"e{i:04d}", _meta(0, i)) for i in range(1, 501)}
    t = _tree(dst, files)
    try:
        stats, calls = _receive(t, b"".join(_small(i, b"") for i in range(1, 501)))
    finally:
        t.close()
    assert stats.files == 500 and not stats.failures
    assert [fid for c in calls for fid in c] == list(range(1, 501))
    assert len(calls) <= 500 // data.LAND_BATCH + 3  # not one call per file
    assert sorted(os.listdir(dst)) == [f"e{i:04d}" for i in range(1, 501)]
    assert all(os.stat(dst / f"e{i:04d}").st_size == 0 for i in range(1, 501))

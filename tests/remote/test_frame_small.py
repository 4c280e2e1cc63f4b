"""The sender's small-file framer (scan.frame_small, decisions R28): a directory's small plain
files read into the exact frames the per-file path sends, everything else handed back with its
reason; and a sender that takes its files in batches still spreads large files over its
streams and lands every file."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from blit.ffi import scan as cscan
from blit.transport import data, tree
from blit.transport.protocol import FRAME, FRAME_SIZE, FrameType
from blit.transport.tree import TopJob, TreeSpec, push_tree

from .conftest import Daemon

FLAGS = tree._SRC_FLAGS
LIMIT = data.SMALL_FILE


@pytest.fixture
def dir_fd(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    if not cscan.HAVE_CMPDIR:
        pytest.fail("blit.ffi._scan is not built")
    d = tmp_path / "d"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield d, fd
    finally:
        os.close(fd)


def _frames(parts: list[bytes]) -> list[tuple[int, int, int, int, bytes]]:
    """(kind, id, offset, length, payload) of each frame in the concatenated parts."""
    blob = b"".join(parts)
    out, pos = [], 0
    while pos < len(blob):
        kind, flags, reserved, fid, offset, length = FRAME.unpack_from(blob, pos)
        assert (flags, reserved) == (0, 0)
        pos += FRAME_SIZE
        payload = blob[pos : pos + length] if kind == FrameType.DATA else b""
        pos += len(payload)
        out.append((kind, fid, offset, length, payload))
    assert pos == len(blob)
    return out


def _expected(fid: int, content: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """What the per-file path (data._send_one) sends for a small file."""
    end = (FrameType.END, fid, len(content), 0, b"")
    return [(FrameType.DATA, fid, 0, len(content), content), end] if content else [end]


def _names_framed(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The names scan.frame_small is asked to read from now on, in order."""
    read: list[bytes] = []
    frame_small = cscan.frame_small

    def spy_frame(dfd: int, names: list[bytes], *args: int | list[int]) -> tuple[list[bytes], int, int, list[int]]:
        read.extend(names)
        return frame_small(dfd, names, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(cscan, "frame_small", spy_frame)
    return read


def test_small_files_become_the_frames_the_per_file_path_sends(dir_fd: tuple[Path, int]) -> None:
    d, fd = dir_fd
    sizes = {b"empty": 0, b"one": 1, b"page": 4096, b"odd": 65537, b"limit": LIMIT, "caf\u00e9 \n".encode(): 300, b"\xff\xfe": 7}
    contents = {}
    for name, size in sizes.items():
        contents[name] = os.urandom(size)
        (d / os.fsdecode(name)).write_bytes(contents[name])
    names = list(sizes)
    ids = [7 + 1000 * i for i in range(len(names))] + [(1 << 32) - 1]
    names.append(b"top-id")
    contents[b"top-id"] = b"x"
    (d / "top-id").write_bytes(b"x")
    parts, nbytes, frames, status = cscan.frame_small(fd, names, ids, FLAGS, LIMIT)
    assert status == [cscan.FRAMED] * len(names)
    want = [f for fid, n in zip(ids, names) for f in _expected(fid, contents[n])]
    assert _frames(parts) == want
    assert nbytes == sum(len(c) for c in contents.values())
    assert frames == len(want)


def test_everything_else_goes_back_with_its_reason(dir_fd: tuple[Path, int]) -> None:
    d, fd = dir_fd
    (d / "big").write_bytes(os.urandom(LIMIT + 1))
    with open(d / "sparse", "wb") as f:  # 200 KiB long, 4 KiB of data: its holes are kept elsewhere
        f.seek(196 * 1024)
        f.write(os.urandom(4096))
    os.mkfifo(d / "fifo")
    (d / "sub").mkdir()
    os.symlink("big", d / "link")
    (d / "ok").write_bytes(b"ok")
    names = [b"big", b"sparse", b"fifo", b"sub", b"link", b"gone", b"ok"]
    parts, nbytes, frames, status = cscan.frame_small(fd, names, list(range(len(names))), FLAGS, LIMIT)
    assert status == [cscan.CALLER, cscan.CALLER, cscan.NOT_REGULAR, cscan.NOT_REGULAR, -errno.ELOOP, -errno.ENOENT, cscan.FRAMED]
    assert _frames(parts) == _expected(6, b"ok")
    assert (nbytes, frames) == (2, 2)


def test_a_batch_larger_than_the_buffer_is_read_in_several_calls(dir_fd: tuple[Path, int]) -> None:
    d, fd = dir_fd
    contents = {}
    for i in range(40):  # 40 x ~200 KiB: 8 MiB, four times the C buffer
        name = f"f{i:02d}".encode()
        contents[name] = os.urandom(200_000 + i)
        (d / os.fsdecode(name)).write_bytes(contents[name])
    names = sorted(contents)
    parts, nbytes, frames, status = cscan.frame_small(fd, names, list(range(len(names))), FLAGS, LIMIT)
    assert len(parts) > 1
    assert status == [cscan.FRAMED] * 40
    assert _frames(parts) == [f for i, n in enumerate(names) for f in _expected(i, contents[n])]
    assert (nbytes, frames) == (sum(map(len, contents.values())), 80)


async def test_large_files_taken_in_one_batch_are_offered_to_every_stream(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six large files among small ones in one directory, taken in one batch: the stream sends
    one and gives the others back to the queue (whichever stream asks first takes the next,
    without opening them in C again), and every file lands."""
    src = tmp_path / "src"
    src.mkdir()
    want = {}
    for i in range(6):
        want[f"big{i}"] = os.urandom(LIMIT * 4 + i)
    for i in range(50):
        want[f"small{i:02d}"] = os.urandom(i * 100)
    for name, content in want.items():
        (src / name).write_bytes(content)
    given_back: list[list[int]] = []
    put_front = data.JobQueue.put_front

    def spy(self: data.JobQueue, ids: list[int]) -> None:
        given_back.append(list(ids))
        put_front(self, ids)

    monkeypatch.setattr(data.JobQueue, "put_front", spy)
    read = _names_framed(monkeypatch)
    dst = daemon.modules["data"] / "dst"
    dst.mkdir()
    async with daemon.session() as s:
        done = await push_tree(s, os.fsencode(src), "data", b"dst", TopJob(), TreeSpec(), streams=2)
    assert not done.failures and done.files_copied == len(want)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == want
    assert [len(ids) for ids in given_back] == [5, 4, 3, 2, 1], given_back
    assert sorted(read) == sorted(n.encode() for n in want), "a file handed back was read again"


async def test_a_pull_reads_small_files_in_batches_on_the_daemon(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon sending a pull reads its small plain files through the batched framer (as a
    pushing client does), large ones one by one, and the tree lands identical."""
    src = daemon.modules["data"] / "src"
    (src / "sub").mkdir(parents=True)
    want = {f"small{i:02d}": os.urandom(i * 97) for i in range(40)}
    want |= {f"sub/s{i}": os.urandom(3000 + i) for i in range(10)}
    want |= {"big": os.urandom(LIMIT * 3 + 1)}
    for name, content in want.items():
        (src / name).write_bytes(content)
    read = _names_framed(monkeypatch)
    dst = tmp_path / "dst"
    dst.mkdir()
    async with daemon.session() as s:
        done = await tree.pull_tree(s, "data", b"src", os.fsencode(dst), TopJob(), TreeSpec())
    assert not done.failures and done.files_copied == len(want)
    assert {str(p.relative_to(dst)): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == want
    assert sorted(read) == sorted(os.path.basename(n).encode() for n in want)  # "big" is handed back, then sent alone


def test_a_file_holding_more_than_its_fstat_said_is_changed() -> None:
    """A regular file whose reads bring more bytes than its fstat size (a file that grew; a
    procfs file is one, always): CHANGED, no frames."""
    fd = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.stat("status", dir_fd=fd).st_size == 0
        parts, nbytes, frames, status = cscan.frame_small(fd, [b"status"], [1], FLAGS, LIMIT)
    finally:
        os.close(fd)
    assert (status, parts, nbytes, frames) == ([cscan.CHANGED], [], 0, 0)

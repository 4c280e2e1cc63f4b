"""A directory whose manifest is too large for one control message goes in parts (hello feature
manifest-parts-1, decisions R32): pushed and pulled, the tree lands exactly, mirror deletes
exactly the extras (never a name of an earlier part), --checksum and hard links work across
parts, and parts out of order are refused. The part limits are made small here, so a few
thousand entries make several parts; tests/remote/test_huge_listing.py runs the real limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blit.plan import Compare
from blit.transport import protocol
from blit.transport.protocol import ErrorCode, Refused, TreeDone
from blit.transport.tree import DestTree, SourceTree, TopJob, TreeSpec, pull_tree, push_tree

from .conftest import Daemon
from .treeutil import assert_same_tree

N = 2_500


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "PART_ENTRIES", 700)  # both sides run in this process
    monkeypatch.setattr(protocol, "PART_BYTES", 96 << 10)


def _wide(d: Path) -> None:
    """One directory of N entries of every kind: files (some with xattrs large enough to cut
    parts by bytes), symlinks, subdirectories, a hard-link pair far apart in the listing."""
    d.mkdir(parents=True)
    for i in range(N):
        p = d / f"e{i:05d}"
        if i % 97 == 5:
            p.mkdir()
            (p / "inner").write_bytes(b"inner %d" % i)
        elif i % 89 == 7:
            p.symlink_to(f"target-{i}")
        else:
            p.write_bytes(b"%d" % i * (i % 7))
            if i % 53 == 0:
                os.setxattr(p, "user.pad", b"x" * 2000)
    os.link(d / "e00001", d / "hardlink-far")  # sorts after every e* name: another part
    os.utime(d, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))


def _parts_of(d: Path) -> int:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return len(SourceTree(fd).scan_parts("", pack=True))
    finally:
        os.close(fd)


async def _transfer(daemon: Daemon, direction: str, src: Path, dst: Path, spec: TreeSpec) -> TreeDone:
    """Push local `src` to the module's "wide", or pull it into local `dst`."""
    async with daemon.session() as s:
        if direction == "push":
            return await push_tree(s, os.fsencode(src), "data", b"wide", TopJob(), spec)
        return await pull_tree(s, "data", b"wide", os.fsencode(dst), TopJob(), spec)


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_a_directory_in_parts_lands_exactly(daemon: Daemon, tmp_path: Path, direction: str) -> None:
    local = tmp_path / "wide"
    remote = daemon.modules["data"] / "wide"
    src, dst = (local, remote) if direction == "push" else (remote, local)
    await trio.to_thread.run_sync(_wide, src)
    assert _parts_of(src) >= 4  # by count and by bytes
    dst.mkdir()
    done = await _transfer(daemon, direction, src, dst, TreeSpec())
    assert not done.failures, done.failures
    await trio.to_thread.run_sync(assert_same_tree, src, dst)
    assert os.stat(dst / "e00001").st_ino == os.stat(dst / "hardlink-far").st_ino


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_mirror_in_parts_deletes_the_extras_only(daemon: Daemon, tmp_path: Path, direction: str) -> None:
    local = tmp_path / "wide"
    remote = daemon.modules["data"] / "wide"
    src, dst = (local, remote) if direction == "push" else (remote, local)
    await trio.to_thread.run_sync(_wide, src)
    dst.mkdir()
    # Extras spread over the whole listing (between the names of every part), one a directory;
    # and destination copies of source names from every part, which must stay.
    for i in range(0, N, 50):
        (dst / f"e{i:05d}x").write_bytes(b"extra")
    (dst / "e01234y").mkdir()
    (dst / "e01234y" / "f").write_bytes(b"extra too")
    spec = TreeSpec(operation="mirror")
    done = await _transfer(daemon, direction, src, dst, spec)
    assert not done.failures, done.failures
    assert done.files_deleted >= N // 50 + 1
    await trio.to_thread.run_sync(assert_same_tree, src, dst)


async def test_checksum_in_parts_settles_every_part(daemon: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "wide"
    await trio.to_thread.run_sync(_wide, src)
    dst = daemon.modules["data"] / "wide"
    dst.mkdir()
    async with daemon.session() as s:
        await push_tree(s, os.fsencode(src), "data", b"wide", TopJob(), TreeSpec())
    # Same size and mtime, other bytes, in the first and the last part: only --checksum sees it.
    for name in ("e00010", "e02490"):
        st = os.stat(dst / name)
        data = (dst / name).read_bytes()
        (dst / name).write_bytes(bytes(b ^ 1 for b in data))
        os.utime(dst / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    async with daemon.session() as s:
        done = await push_tree(s, os.fsencode(src), "data", b"wide", TopJob(), TreeSpec(compare=Compare.CHECKSUM))
    assert not done.failures and done.files_copied == 2, done
    await trio.to_thread.run_sync(assert_same_tree, src, dst)


def test_parts_out_of_order_are_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    dest = DestTree(fd, TreeSpec())
    try:
        with pytest.raises(Refused) as e:
            dest.plan("d", "d", False, None, [], False, None, part=1, more=True)
        assert e.value.code is ErrorCode.BAD_REQUEST and "out of order" in e.value.message
        dest.plan("d", "d", False, None, [], False, None, part=0, more=True)
        with pytest.raises(Refused):
            dest.plan("d", "d", False, None, [], False, None, part=2, more=False)  # 1 skipped
        with pytest.raises(Refused):
            dest.plan("d", "d", False, None, [], False, None, part=0, more=True)  # restarted
    finally:
        dest.close()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    source = SourceTree(fd)
    try:
        with pytest.raises(Refused) as e:
            source.scan_part("d", 1, True)  # never offered
        assert e.value.code is ErrorCode.BAD_REQUEST
    finally:
        source.close()

"""Small files landed in one step at a tree transfer's destination (DestTree.land_many,
decisions R20, R33): the same owner, mode, times, replacement, hard links and per-file failures as the general
landing, in C and in Python, pushed and pulled."""

from __future__ import annotations

import os
import resource
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from blit.ffi import scan as cscan
from blit.transport import tree
from blit.transport.tree import TopJob, TreeSpec, pull_tree, push_tree

from .conftest import Daemon

ROOT = os.geteuid() == 0
MODES = {"m644": 0o644, "m666": 0o666, "m777": 0o777, "m600": 0o600, "m400": 0o400, "m2755": 0o2755, "m4755": 0o4755}


@pytest.fixture(params=[(1, 0), (-1, 0), (1, 2), None], ids=["c", "c-named-tmp", "c-proc-link", "python"])
def c_land(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """One landing path for the transfers of a test (both sides run in this process): the C
    landing (O_TMPFILE + linkat, named temporaries + rename, a link through /proc/self/fd) or
    fsops.Landing."""
    if request.param is None:
        monkeypatch.setattr(tree, "_C_LAND", False)
        yield False
        return
    if not cscan.HAVE_CMPDIR:
        pytest.fail("blit.ffi._scan is not built")
    monkeypatch.setattr(tree, "_C_LAND", True)
    cscan.set_copy_modes(*request.param)
    try:
        yield True
    finally:
        cscan.set_copy_modes(1, 0)


def _make(src: Path) -> None:
    src.mkdir()
    t = 1_700_000_000_123_456_789
    for i, (name, mode) in enumerate(MODES.items()):
        p = src / name
        p.write_bytes(name.encode() * (i + 1))
        os.chmod(p, mode)
    (src / "empty").write_bytes(b"")
    (src / "replaced").write_bytes(b"new content, longer than the old one")
    (src / "hard1").write_bytes(b"linked")
    os.link(src / "hard1", src / "hard2")
    if ROOT:
        os.chown(src / "m644", 4242, 4343)
        os.chown(src / "empty", 0, 4343)
    for i, n in enumerate(sorted(os.listdir(src))):
        os.utime(src / n, ns=(t - i * 1_000_003, t + i * 1_000_003))


def _check(src: Path, dst: Path) -> None:
    assert sorted(os.listdir(dst)) == sorted(os.listdir(src))  # nothing else: no temporaries
    for n in os.listdir(src):
        a, b = os.lstat(src / n), os.lstat(dst / n)
        assert (dst / n).read_bytes() == (src / n).read_bytes(), n
        assert stat.S_IMODE(b.st_mode) == stat.S_IMODE(a.st_mode), (n, oct(b.st_mode), oct(a.st_mode))
        assert b.st_mtime_ns == a.st_mtime_ns, n
        if ROOT:
            assert (b.st_uid, b.st_gid) == (a.st_uid, a.st_gid), n
    assert os.lstat(dst / "hard1").st_ino == os.lstat(dst / "hard2").st_ino


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_small_files_land_with_owner_mode_times_and_links(daemon: Daemon, tmp_path: Path, c_land: bool, direction: str) -> None:
    if direction == "push":
        src, dst = tmp_path / "src", daemon.modules["data"] / "dst"
    else:
        src, dst = daemon.modules["data"] / "src", tmp_path / "dst"
    _make(src)
    dst.mkdir()
    (dst / "replaced").write_bytes(b"old")
    async with daemon.session() as s:
        if direction == "push":
            done = await push_tree(s, os.fsencode(src), "data", b"dst", TopJob(), TreeSpec())
        else:
            done = await pull_tree(s, "data", b"src", os.fsencode(dst), TopJob(), TreeSpec())
    assert not done.failures, done.failures
    assert done.files_copied == len(MODES) + 3 and done.links_created == 1
    _check(src, dst)


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_a_small_file_that_cannot_land_fails_alone(daemon: Daemon, tmp_path: Path, c_land: bool, direction: str) -> None:
    if direction == "push":
        src, dst = tmp_path / "src", daemon.modules["data"] / "dst"
    else:
        src, dst = daemon.modules["data"] / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(20):
        (src / f"ok{i:02d}").write_bytes(b"x" * (i * 100))
    (src / "too-big").write_bytes(os.urandom(100 << 10))  # small (one frame), above the limit
    dst.mkdir()
    with _limited():
        async with daemon.session() as s:
            if direction == "push":
                done = await push_tree(s, os.fsencode(src), "data", b"dst", TopJob(), TreeSpec())
            else:
                done = await pull_tree(s, "data", b"src", os.fsencode(dst), TopJob(), TreeSpec())
    assert [(f.path, f.op) for f in done.failures] == [(b"too-big", "copy")], done.failures
    assert "too large" in done.failures[0].message.lower(), done.failures[0].message
    assert done.files_copied == 20
    assert sorted(os.listdir(dst)) == [f"ok{i:02d}" for i in range(20)]  # no partial file, no temporary
    for i in range(20):
        assert (dst / f"ok{i:02d}").read_bytes() == b"x" * (i * 100)


class _limited:
    """Writes past 64 KiB fail with EFBIG in this process (RLIMIT_FSIZE, SIGXFSZ ignored), where
    the test daemon runs too: a real per-file landing failure on either side."""

    def __enter__(self) -> None:
        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, self.old[1]))

    def __exit__(self, *exc: object) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)
        signal.signal(signal.SIGXFSZ, self.handler)

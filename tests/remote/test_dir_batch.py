"""Several directories per control request (hello feature dir-batch-1, decisions R42): a push
sends new directories' manifests in tree/dirs, a pull asks for manifests with tree/scans. Pushed
and pulled, a tree of many small directories (and one in parts, and every kind of entry) lands
exactly, in fewer requests than it has directories, with batches cut by the entry budget; the
daemon refuses batches that break the rules and keeps serving. The limits are made small here
(both sides run in this process)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from blit.daemon import handlers
from blit.errors import RemoteError
from blit.transport import protocol as p
from blit.transport.tree import TopJob, TreeSpec, pull_tree, push_tree

from .conftest import Daemon
from .treeutil import assert_same_tree

DIRS = 60


@pytest.fixture(autouse=True)
def small_limits(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    monkeypatch.setattr(p, "BATCH_ENTRIES", 120)
    monkeypatch.setattr(p, "PART_ENTRIES", 400)
    calls: Counter[str] = Counter()
    for msg_type in (p.TreeDir, p.TreeDirs, p.TreeScan, p.TreeScans):
        real = handlers._HANDLERS[msg_type]

        async def counted(s: Any, msg: Any, real: Any = real, name: str = msg_type.__name__) -> Any:
            calls[name] += 1
            return await real(s, msg)

        monkeypatch.setitem(handlers._HANDLERS, msg_type, counted)
    return calls


def _many(d: Path) -> None:
    """DIRS directories of 0-44 files below a top, some nested; one of 1,000 files (parts), a
    hard link across directories, symlinks, xattrs, an empty directory."""
    d.mkdir(parents=True)
    for j in range(DIRS):
        sub = d / f"d{j:03d}"
        sub.mkdir()
        for i in range(j % 45):
            (sub / f"f{i}").write_bytes(b"%d-%d" % (j, i) * (i % 5))
        if j % 7 == 3:
            (sub / "inner").mkdir()
            (sub / "inner" / "x").write_bytes(b"inner")
            (sub / "link").symlink_to("inner/x")
        if j % 11 == 2 and j % 45 > 1:
            os.setxattr(sub / "f1", "user.k", b"v%d" % j)
        os.utime(sub, ns=(1_600_000_000_000_000_000 + j, 1_600_000_000_000_000_000 + j))
    big = d / "d030" / "big"
    big.mkdir()
    for i in range(1000):
        (big / f"b{i:04d}").write_bytes(b"b" * (i % 3))
    os.link(d / "d005" / "f2", d / "d050" / "hard")
    (d / "empty").mkdir()


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_many_small_directories_land_exactly_in_few_requests(daemon: Daemon, tmp_path: Path, direction: str, small_limits: Counter[str]) -> None:
    local = tmp_path / "many"
    remote = daemon.modules["data"] / "many"
    src, dst = (local, remote) if direction == "push" else (remote, local)
    await trio.to_thread.run_sync(_many, src)
    dst.mkdir()
    async with daemon.session() as s:
        assert p.FEATURE_DIR_BATCH in s.peer.features
        if direction == "push":
            done = await push_tree(s, os.fsencode(src), "data", b"many", TopJob(), TreeSpec())
        else:
            done = await pull_tree(s, "data", b"many", os.fsencode(dst), TopJob(), TreeSpec())
    assert not done.failures, done.failures
    await trio.to_thread.run_sync(assert_same_tree, src, dst)
    assert os.stat(dst / "d005" / "f2").st_ino == os.stat(dst / "d050" / "hard").st_ino
    dirs = DIRS + DIRS // 7 + 3  # the subdirectories, the inner ones, big, empty, the top
    batched, single = ("TreeDirs", "TreeDir") if direction == "push" else ("TreeScans", "TreeScan")
    # More than one batch (the entry budget cuts them), and far fewer requests than directories:
    # the top alone, the directory in parts part by part, a few stragglers.
    assert small_limits[batched] >= 3, small_limits
    assert small_limits[batched] + small_limits[single] < dirs // 2, small_limits


async def test_mirror_through_batches_deletes_only_extras(daemon: Daemon, tmp_path: Path, small_limits: Counter[str]) -> None:
    src = tmp_path / "many"
    await trio.to_thread.run_sync(_many, src)
    dst = daemon.modules["data"] / "many"
    dst.mkdir()
    (dst / "d010").mkdir()
    (dst / "d010" / "extra").write_bytes(b"x")  # an existing directory: digests, then tree/dir
    (dst / "gone").mkdir()
    (dst / "gone" / "f").write_bytes(b"x")
    async with daemon.session() as s:
        done = await push_tree(s, os.fsencode(src), "data", b"many", TopJob(), TreeSpec(operation="mirror"))
    assert not done.failures, done.failures
    assert done.files_deleted >= 2  # d010/extra, gone and its file
    await trio.to_thread.run_sync(assert_same_tree, src, dst)
    assert small_limits["TreeDirs"] >= 3


async def test_the_daemon_refuses_batches_that_break_the_rules(daemon: Daemon, tmp_path: Path) -> None:
    (daemon.modules["data"] / "src").mkdir()
    async with daemon.session() as s:
        push = await s.call(p.OpenTree(module="data", path=b"", direction="push", operation="copy", compare=0))

        def tree_dir(**kw: Any) -> p.TreeDir:
            return p.TreeDir(transfer=push.transfer, rel=b"a", dst_rel=b"a", dst_new=False, entries=[], **kw)

        for bad in (
            [tree_dir(only=[p.Rename(name=b"x", dname=b"y")])],
            [tree_dir(more=True)],
            [tree_dir(part=1)],
            [],
        ):
            with pytest.raises(RemoteError) as info:
                await s.call(p.TreeDirs(transfer=push.transfer, dirs=bad))
            assert info.value.code == "bad-request", info.value
        pull = await s.call(p.OpenTree(module="data", path=b"src", direction="pull", operation="copy", compare=0))
        with pytest.raises(RemoteError) as info:
            await s.call(p.TreeScans(transfer=pull.transfer, rels=[]))
        assert info.value.code == "bad-request", info.value
        with pytest.raises(RemoteError) as info:
            await s.call(p.TreeScans(transfer=pull.transfer, rels=[b"../etc"]))
        assert info.value.code == "path-refused", info.value
        # Still serving: a good batch is answered, one manifest per directory asked for.
        got = await s.call(p.TreeScans(transfer=pull.transfer, rels=[b"", b""]))
        assert len(got.manifests) == 2 and not got.manifests[0].incomplete
    assert sorted(os.listdir(daemon.modules["data"])) == ["src"]

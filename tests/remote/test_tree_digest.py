"""Unchanged directories travel as digests, on a push (docs/decisions.md R18, tree/digests) and
on a pull (R72, tree/have): no manifest for a directory the destination already has exactly,
nothing written there, and every kind of drift at the destination repaired as by a full
manifest."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from blit.transport import protocol
from blit.transport.tree import TopJob, TreeSpec, pull_tree, push_tree

from .conftest import Daemon
from .treeutil import assert_same_tree, snapshot


def make_tree(root: Path) -> None:
    """Two levels of directories with files, a symlink and a FIFO, distinct times."""
    for d in ("d1", "d1/sub", "d2", "d3"):
        (root / d).mkdir(parents=True)
        for i in range(5):
            (root / d / f"f{i}").write_bytes(b"x" * (100 + i))
    os.symlink("f0", root / "d2" / "link")
    os.mkfifo(root / "d3" / "fifo")
    os.chmod(root / "d1" / "f1", 0o600)
    t = 1_600_000_000_000_000_000
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            t += 1_000_003
            os.utime(os.path.join(dirpath, n), ns=(t, t), follow_symlinks=False)
        os.utime(dirpath, ns=(t + 5, t + 5))


class Spy:
    """Counts the manifests a transfer moves, by source directory (a push's tree/dir and each of
    a tree/dirs batch; a pull's tree/scan and each manifest a tree/scans brought), and the
    directories offered as digests (a push's tree/digests, a pull's tree/have) with how many
    were equal."""

    def __init__(self) -> None:
        self.manifests: Counter[bytes] = Counter()
        self.entries = 0
        self.digests: list[bytes] = []
        self.equal = 0

    def wrap(self, session) -> None:  # type: ignore[no-untyped-def]
        real = session.call

        async def call(msg):  # type: ignore[no-untyped-def]
            reply = await real(msg)
            for d in [msg] if isinstance(msg, protocol.TreeDir) else msg.dirs if isinstance(msg, protocol.TreeDirs) else []:
                self.manifests[d.rel] += 1
                self.entries += len(d.entries)
            if isinstance(msg, protocol.TreeDigests):
                self.digests += [d.rel for d in msg.dirs]
                self.equal += sum(reply.equal)
            elif isinstance(msg, protocol.TreeScan):
                self.manifests[msg.rel] += 1
            elif isinstance(msg, protocol.TreeScans):
                for rel in msg.rels[: len(reply.manifests)]:
                    self.manifests[rel] += 1
            elif isinstance(msg, protocol.TreeHave):
                self.digests += [d.rel for d in msg.dirs]
                self.equal += sum(a.equal for a in reply.dirs)
            return reply

        session.call = call


async def _push(daemon: Daemon, src: Path, spec: TreeSpec | None = None, spy: Spy | None = None) -> protocol.TreeDone:
    async with daemon.session() as s:
        if spy is not None:
            spy.wrap(s)
        return await push_tree(s, os.fsencode(src), "data", b"dst", TopJob(), spec or TreeSpec(operation="mirror"))


async def _pull(daemon: Daemon, dst: Path, spec: TreeSpec | None = None, spy: Spy | None = None) -> protocol.TreeDone:
    async with daemon.session() as s:
        if spy is not None:
            spy.wrap(s)
        return await pull_tree(s, "data", b"src", os.fsencode(dst), TopJob(), spec or TreeSpec(operation="mirror"), create_root=True)


async def _sides(daemon: Daemon, tmp_path: Path, direction: str) -> tuple[Path, Path]:
    """make_tree's source and the destination of `direction`, the local one in tmp_path and the
    daemon's in its module ("dst" for a push, "src" for a pull)."""
    if direction == "push":
        src, dst = tmp_path / "src", daemon.modules["data"] / "dst"
        dst.mkdir()
    else:
        src, dst = daemon.modules["data"] / "src", tmp_path / "dst"
    await trio.to_thread.run_sync(make_tree, src)
    return src, dst


async def _run(daemon: Daemon, direction: str, src: Path, dst: Path, spec: TreeSpec | None = None, spy: Spy | None = None) -> protocol.TreeDone:
    return await (_push(daemon, src, spec, spy) if direction == "push" else _pull(daemon, dst, spec, spy))


def _ctimes(root: Path) -> dict[str, int]:
    out = {str(root): os.lstat(root).st_ctime_ns}  # the top too: an unchanged run leaves it be
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[p] = os.lstat(p).st_ctime_ns
    return out


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_an_unchanged_run_sends_no_manifest_below_the_top(daemon: Daemon, tmp_path: Path, direction: str) -> None:
    """Push (tree/digests, R18) and pull (tree/have, R72)."""
    src, dst = await _sides(daemon, tmp_path, direction)
    first = await _run(daemon, direction, src, dst)
    assert first.files_copied == 20 and not first.failures, first
    before = _ctimes(dst)
    spy = Spy()
    again = await _run(daemon, direction, src, dst, spy=spy)
    assert not again.failures and again.files_copied == 0 and again.links_created == 0 and again.files_deleted == 0, again
    # The top travels as a manifest (its own metadata and its subdirectories); below it only
    # digests, all equal: nothing else to send.
    assert spy.manifests == Counter({b"": 1}), spy.manifests
    assert sorted(spy.digests) == [b"d1", b"d1/sub", b"d2", b"d3"] and spy.equal == 4
    assert again.files_skipped == first.files_copied + 2 and again.entries_seen == first.entries_seen, again
    # Nothing was written at the destination (no chmod, chown, utime, xattr: ctimes unchanged).
    assert _ctimes(dst) == before
    await trio.to_thread.run_sync(assert_same_tree, src, dst)


def _set_mtime(p: Path, ns: int) -> None:
    os.utime(p, ns=(ns, ns), follow_symlinks=False)


def _keep_dir_time(p: Path, change: Callable[[], None]) -> None:
    """Apply `change` inside directory p and put back its mtime (a drift only a full listing
    can see, not the parent's digest)."""
    ns = os.lstat(p).st_mtime_ns
    change()
    _set_mtime(p, ns)


DRIFTS: dict[str, Callable[[Path, Path], None]] = {
    "mode": lambda s, d: os.chmod(d / "d1" / "f2", 0o640),
    "mtime": lambda s, d: _set_mtime(d / "d1" / "f2", 1_500_000_000_000_000_000),
    "size": lambda s, d: _keep_dir_time(d / "d1", lambda: (d / "d1" / "f2").write_bytes(b"short")) or None,
    "extra file": lambda s, d: _keep_dir_time(d / "d1", lambda: (d / "d1" / "extra").write_bytes(b"e")),
    "extra dir": lambda s, d: _keep_dir_time(d / "d1", lambda: (d / "d1" / "xdir" / "deep").mkdir(parents=True)),
    "missing file": lambda s, d: _keep_dir_time(d / "d1", lambda: (d / "d1" / "f3").unlink()),
    "missing dir": lambda s, d: _keep_dir_time(d / "d1", lambda: __import__("shutil").rmtree(d / "d1" / "sub")),
    "dir mode": lambda s, d: os.chmod(d / "d1" / "sub", 0o700),
    "dir mtime": lambda s, d: _set_mtime(d / "d1" / "sub", 1_500_000_000_000_000_000),
    "xattr at the destination": lambda s, d: os.setxattr(d / "d1" / "f2", "user.drift", b"x"),
    "xattr at the source": lambda s, d: os.setxattr(s / "d1" / "f2", "user.new", b"y"),
    "xattr on a directory": lambda s, d: os.setxattr(d / "d1" / "sub", "user.drift", b"x"),
    "symlink retargeted": lambda s, d: _keep_dir_time(
        d / "d2", lambda: ((d / "d2" / "link").unlink(), os.symlink("f1", d / "d2" / "link"), _set_mtime(d / "d2" / "link", os.lstat(s / "d2" / "link").st_mtime_ns))
    ),
    "file became a directory": lambda s, d: _keep_dir_time(
        d / "d3", lambda: ((d / "d3" / "f0").unlink(), (d / "d3" / "f0").mkdir(), _set_mtime(d / "d3" / "f0", os.lstat(s / "d3" / "f0").st_mtime_ns))
    ),
    "stale temporary": lambda s, d: _keep_dir_time(d / "d1", lambda: (d / "d1" / ".blit-0123456789abcdef.tmp").write_bytes(b"partial")),
    "hard link at the source": lambda s, d: os.link(s / "d3" / "f4", s / "d3" / "f4-link"),
    "hard link at the destination": lambda s, d: _keep_dir_time(d / "d3", lambda: os.link(d / "d3" / "f4", d / "d3" / "f4-link")),
}


@pytest.mark.parametrize("direction", ["push", "pull"])
@pytest.mark.parametrize("drift", list(DRIFTS))
async def test_drift_at_the_destination_is_repaired(daemon: Daemon, tmp_path: Path, drift: str, direction: str) -> None:
    src, dst = await _sides(daemon, tmp_path, direction)
    await _run(daemon, direction, src, dst)
    DRIFTS[drift](src, dst)
    spy = Spy()
    done = await _run(daemon, direction, src, dst, spy=spy)
    assert not done.failures, done.failures
    await trio.to_thread.run_sync(assert_same_tree, src, dst)
    assert os.listdir(dst / "d1").count(".blit-0123456789abcdef.tmp") == 0
    # Directories that did not drift still went as digests.
    assert spy.equal >= 1, (spy.digests, spy.manifests)


async def test_same_size_and_mtime_is_not_looked_into(daemon: Daemon, tmp_path: Path) -> None:
    """As rsync (and the full listing) by default: content alone changed, size and mtime the
    same, is left alone."""
    src = tmp_path / "src"
    await trio.to_thread.run_sync(make_tree, src)
    dst = daemon.modules["data"] / "dst"
    dst.mkdir()
    await _push(daemon, src)
    f = dst / "d1" / "f2"
    st = os.lstat(f)
    f.write_bytes(b"Y" * st.st_size)
    _set_mtime(f, st.st_mtime_ns)
    done = await _push(daemon, src)
    assert done.files_copied == 0 and not done.failures, done
    assert f.read_bytes() == b"Y" * st.st_size


@pytest.mark.skipif(os.geteuid() != 0, reason="owners are preserved only as root")
@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_owner_drift_is_repaired_as_root(daemon: Daemon, tmp_path: Path, direction: str) -> None:
    src, dst = await _sides(daemon, tmp_path, direction)
    await _run(daemon, direction, src, dst)
    os.chown(dst / "d1" / "f2", 65534, 65534, follow_symlinks=False)
    os.chown(dst / "d1" / "sub", 65534, 65534)
    done = await _run(daemon, direction, src, dst)
    assert not done.failures, done.failures
    for rel in ("d1/f2", "d1/sub"):
        s, d = os.lstat(src / rel), os.lstat(dst / rel)
        assert (d.st_uid, d.st_gid) == (s.st_uid, s.st_gid), rel


async def test_the_full_listing_is_used_where_digests_do_not_apply(daemon: Daemon, tmp_path: Path) -> None:
    """Filters, --checksum and dry runs keep the manifest path: same outcome as before."""
    src = tmp_path / "src"
    await trio.to_thread.run_sync(make_tree, src)
    dst = daemon.modules["data"] / "dst"
    dst.mkdir()
    await _push(daemon, src)
    (dst / "d2" / "f1").write_bytes(b"changed!!" * 3)
    from blit.filters import Filters
    from blit.plan import Compare

    for spec in (
        TreeSpec(operation="mirror", filters=Filters.from_args([(False, "*.nothing")])),
        TreeSpec(operation="mirror", compare=Compare.CHECKSUM),
        TreeSpec(operation="mirror", dry_run=True),
    ):
        spy = Spy()
        await _push(daemon, src, spec, spy)
        assert spy.digests == [] and set(spy.manifests) == {b"", b"d1", b"d1/sub", b"d2", b"d3"}, spec
    await trio.to_thread.run_sync(assert_same_tree, src, dst)
    assert snapshot(src) == snapshot(dst)


# --- pull digests only (hello feature pull-digest-1, decisions R72) ------------------------------


async def test_a_daemon_without_pull_digests_sends_manifests(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older daemon (no pull-digest-1): the client never sends tree/have, and the daemon
    refuses one it did not agree to."""
    from blit.daemon import handlers
    from blit.errors import RemoteError

    real = handlers._features
    monkeypatch.setattr(handlers, "_features", lambda asked: [f for f in real(asked) if f != protocol.FEATURE_PULL_DIGEST])
    src = daemon.modules["data"] / "src"
    await trio.to_thread.run_sync(make_tree, src)
    dst = tmp_path / "dst"
    await _pull(daemon, dst)
    spy = Spy()
    again = await _pull(daemon, dst, spy=spy)
    assert not again.failures and again.files_copied == 0, again
    assert spy.digests == [] and set(spy.manifests) == {b"", b"d1", b"d1/sub", b"d2", b"d3"}
    async with daemon.session() as s:
        opened = await s.call(protocol.OpenTree(module="data", path=b"src", direction="pull", operation="copy", compare=0, filters=[], dry_run=False, streams=1))
        with pytest.raises(RemoteError, match="tree/have needs the hello feature pull-digest-1") as info:
            await s.call(protocol.TreeHave(transfer=opened.transfer, flags=0, dirs=[protocol.DirHave(rel=b"d1", digest=b"\0" * 16)]))
        assert info.value.code == "bad-request"


async def test_the_daemon_answers_only_what_the_digest_proves(daemon: Daemon, tmp_path: Path) -> None:
    """tree/have by hand: a wrong digest, a directory outside the module's reach and a missing
    one answer not equal; a right one answers equal with the source's subdirectories."""
    from blit.ffi import scan as cscan

    src = daemon.modules["data"] / "src"
    await trio.to_thread.run_sync(make_tree, src)
    os.symlink("/etc", src / "escape")
    fd = os.open(src / "d1", os.O_RDONLY | os.O_DIRECTORY)
    try:
        right = cscan.digest_dir(fd, 0)
    finally:
        os.close(fd)
    assert right is not None
    async with daemon.session() as s:
        opened = await s.call(protocol.OpenTree(module="data", path=b"src", direction="pull", operation="copy", compare=0, filters=[], dry_run=False, streams=1))
        reply = await s.call(
            protocol.TreeHave(
                transfer=opened.transfer,
                flags=0,
                dirs=[
                    protocol.DirHave(rel=b"d1", digest=right[0]),
                    protocol.DirHave(rel=b"d1", digest=b"\x01" * 16),
                    protocol.DirHave(rel=b"escape", digest=right[0]),
                    protocol.DirHave(rel=b"nowhere", digest=right[0]),
                ],
            )
        )
    assert [a.equal for a in reply.dirs] == [True, False, False, False]
    assert [e[0] for e in reply.dirs[0].subdirs] == [b"sub"] and all(a.subdirs == [] for a in reply.dirs[1:])
    assert reply.dirs[0].subdirs[0][3] == os.lstat(src / "d1" / "sub").st_mtime_ns

"""Move and --checksum through a daemon: push and pull of a tree with every kind of entry, the
trailing-slash forms, sources kept when their copy failed, a read-only module refusing a pull
move, and the hash exchange (equal content is not re-sent, different content of the same size
and mtime is)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blit.errors import RemoteError
from blit.plan import Compare
from blit.transport import tree
from blit.transport.remote import remote_transfer

from .conftest import Daemon
from .treeutil import checksum_case, make_full_tree, snapshot


def host(d: Daemon) -> str:
    return f"127.0.0.1:{d.info.port}"


async def run(d: Daemon, op: str, src: str, dst: str, **kw: object):  # type: ignore[no-untyped-def]
    return await remote_transfer(op, src, dst, tls_enabled=d.tls, known_hosts=d.known_hosts, **kw)  # type: ignore[arg-type]


def leftovers(root: Path) -> list[str]:
    """Everything still below root (the entries a move left behind)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob(".blit-*")]


# --- push move (the client removes what the daemon confirmed) --------------------------------


@pytest.mark.parametrize("force_h2", [False, True], ids=["raw", "h2"])
async def test_push_move_of_a_full_tree_removes_the_source(daemon: Daemon, tmp_path: Path, force_h2: bool) -> None:
    src = tmp_path / "src"
    await trio.to_thread.run_sync(make_full_tree, src)
    want = await trio.to_thread.run_sync(snapshot, src)
    s = await run(daemon, "move", str(src), f"{host(daemon)}:/data/out", force_h2_data=force_h2)
    assert s.exit_code == 0, s.failures
    out = daemon.modules["data"] / "out"
    assert await trio.to_thread.run_sync(snapshot, out) == want
    assert not src.exists(), leftovers(src)  # `src` form: the directory itself goes too
    assert s.files_removed == sum(1 for v in want.values() if v[0] != 0o040000)  # all but directories
    assert no_temporaries(out)


async def test_pull_move_of_a_full_tree_removes_the_source(daemon: Daemon, tmp_path: Path) -> None:
    src = daemon.modules["data"] / "src"
    await trio.to_thread.run_sync(make_full_tree, src)
    want = await trio.to_thread.run_sync(snapshot, src)
    s = await run(daemon, "move", f"{host(daemon)}:/data/src", str(tmp_path / "out"))
    assert s.exit_code == 0, s.failures
    assert await trio.to_thread.run_sync(snapshot, tmp_path / "out") == want
    assert os.listdir(daemon.modules["data"]) == []
    assert s.files_removed == sum(1 for v in want.values() if v[0] != 0o040000)


@pytest.mark.parametrize("direction", ["push", "pull"])
@pytest.mark.parametrize(
    ("form", "dst", "expected_dst", "src_left"),
    [
        ("tree/", "out", {"out/f", "out/sub/g"}, ["tree"]),  # contents: the directory stays, empty
        ("tree", "out", {"out/f", "out/sub/g"}, []),  # dir lands as DST and goes
        ("tree", "have/", {"have/tree/f", "have/tree/sub/g"}, []),  # dir into an existing dir
        ("tree/f", "have/", {"have/f"}, ["tree", "tree/sub", "tree/sub/g"]),  # one file
        ("tree/f", "renamed", {"renamed"}, ["tree", "tree/sub", "tree/sub/g"]),
    ],
)
async def test_move_follows_the_slash_rules(
    daemon: Daemon, tmp_path: Path, direction: str, form: str, dst: str, expected_dst: set[str], src_left: list[str]
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    remote = daemon.modules["data"]
    src_root, dst_root = (local, remote) if direction == "push" else (remote, local)
    (src_root / "tree" / "sub").mkdir(parents=True)
    (src_root / "tree" / "f").write_text("f")
    (src_root / "tree" / "sub" / "g").write_text("g")
    (dst_root / "have").mkdir()
    r = f"{host(daemon)}:/data"
    if direction == "push":
        s = await run(daemon, "move", f"{local}/{form}", f"{r}/{dst}")
    else:
        s = await run(daemon, "move", f"{r}/{form}", f"{local}/{dst}")
    assert s.exit_code == 0, s.failures
    assert {str(p.relative_to(dst_root)) for p in dst_root.rglob("*") if p.is_file()} == expected_dst
    left = [x for x in leftovers(src_root) if x != "have"]
    assert left == src_left


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_move_keeps_a_source_whose_copy_failed(daemon: Daemon, tmp_path: Path, direction: str) -> None:
    """`x` cannot replace a non-empty directory at the destination: it stays at the source (and
    so does its directory); everything else moves; exit 3."""
    local = tmp_path / "local"
    local.mkdir()
    remote = daemon.modules["data"]
    src_root, dst_root = (local, remote) if direction == "push" else (remote, local)
    src = src_root / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "x").write_text("cannot land")
    (src / "ok").write_text("ok")
    (src / "sub" / "y").write_text("y")
    os.symlink("ok", src / "link")
    (dst_root / "out" / "x").mkdir(parents=True)
    (dst_root / "out" / "x" / "keep").write_text("in the way")
    r = f"{host(daemon)}:/data"
    if direction == "push":
        s = await run(daemon, "move", f"{src}/", f"{r}/out")
    else:
        s = await run(daemon, "move", f"{r}/tree/", f"{local}/out")
    assert s.exit_code == 3
    assert [f.path for f in s.failures] == ["x"], s.failures
    assert leftovers(src) == ["x"]
    assert (src / "x").read_text() == "cannot land"
    assert (dst_root / "out" / "ok").read_text() == "ok" and (dst_root / "out" / "sub" / "y").read_text() == "y"
    assert os.readlink(dst_root / "out" / "link") == "ok"
    assert (dst_root / "out" / "x" / "keep").read_text() == "in the way"


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_move_confirms_in_pages_during_the_walk(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direction: str) -> None:
    """With tiny pages, sources are removed while the walk goes on (hard-link members only at
    the end, or the source would report a smaller link count for the members not scanned yet),
    and the tree still lands exactly, links included."""
    monkeypatch.setattr(tree, "LANDED_DRAIN", 3)
    monkeypatch.setattr(tree, "LANDED_PAGE", 2)
    monkeypatch.setattr(tree, "WALK_CONCURRENCY", 1)  # scans strictly after earlier removals
    local = tmp_path / "local"
    remote = daemon.modules["data"] / "src"
    src, dst = (local, daemon.modules["data"] / "out") if direction == "push" else (remote, tmp_path / "out")
    await trio.to_thread.run_sync(make_full_tree, src)
    for i in range(12):
        (src / "a" / f"more{i}").write_text(str(i))
    want = await trio.to_thread.run_sync(snapshot, src)
    r = f"{host(daemon)}:/data"
    a, b = (f"{src}/", f"{r}/out") if direction == "push" else (f"{r}/src/", str(dst))
    s = await run(daemon, "move", a, b)
    assert s.exit_code == 0, s.failures
    assert await trio.to_thread.run_sync(snapshot, dst) == want
    assert leftovers(src) == []


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_move_dry_run_changes_nothing(daemon: Daemon, tmp_path: Path, direction: str) -> None:
    local = tmp_path / "local"
    src = local if direction == "push" else daemon.modules["data"] / "src"
    await trio.to_thread.run_sync(make_full_tree, src)
    (tmp_path / "out").mkdir()
    before = await trio.to_thread.run_sync(snapshot, src)
    r = f"{host(daemon)}:/data"
    a, b = (f"{src}/", f"{r}/") if direction == "push" else (f"{r}/src/", str(tmp_path / "out"))
    s = await run(daemon, "move", a, b, dry_run=True)
    assert s.exit_code == 0 and s.files_copied > 0 and s.files_removed == 0, s
    assert await trio.to_thread.run_sync(snapshot, src) == before
    assert os.listdir(tmp_path / "out") == [] and os.listdir(daemon.modules["data"]) == ([] if direction == "push" else ["src"])


async def test_push_move_onto_an_up_to_date_destination_removes_the_source(daemon: Daemon, tmp_path: Path) -> None:
    """Up-to-date files count as landed: the destination holds the same data."""
    src = tmp_path / "src"
    await trio.to_thread.run_sync(make_full_tree, src)
    want = await trio.to_thread.run_sync(snapshot, src)
    r = f"{host(daemon)}:/data/out"
    assert (await run(daemon, "copy", f"{src}/", r)).exit_code == 0
    s = await run(daemon, "move", f"{src}/", r)
    assert s.exit_code == 0 and s.files_copied == 0, s
    assert leftovers(src) == []
    assert await trio.to_thread.run_sync(snapshot, daemon.modules["data"] / "out") == want


async def test_a_source_changed_after_its_copy_is_kept(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The remover checks size and mtime against what was copied: a file rewritten in between
    stays (with a failure), the rest goes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    (src / "b").write_text("b")
    real_remove = tree.SourceTree.remove

    def remove_after_a_change(self: tree.SourceTree, groups):  # type: ignore[no-untyped-def]
        (src / "b").write_text("b changed")
        return real_remove(self, groups)

    monkeypatch.setattr(tree.SourceTree, "remove", remove_after_a_change)
    s = await run(daemon, "move", f"{src}/", f"{host(daemon)}:/data/out")
    assert s.exit_code == 3
    assert [(f.path, f.message) for f in s.failures] == [("b", "changed since it was copied; kept")]
    assert os.listdir(src) == ["b"] and (src / "b").read_text() == "b changed"


async def test_pull_move_from_a_read_only_module_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    src = daemon.modules["ro"] / "tree"
    src.mkdir()
    (src / "f").write_text("stays")
    before = await trio.to_thread.run_sync(snapshot, daemon.modules["ro"])
    with pytest.raises(RemoteError, match="module 'ro' is read-only: a move from it would remove its files") as info:
        await run(daemon, "move", f"{host(daemon)}:/ro/tree", str(tmp_path / "out"))
    assert info.value.code == "read-only"
    assert await trio.to_thread.run_sync(snapshot, daemon.modules["ro"]) == before
    assert not (tmp_path / "out").exists()


async def test_tree_remove_stays_inside_the_module(daemon: Daemon, tmp_path: Path) -> None:
    """A hostile client naming '..', '/' or a symlinked directory removes nothing outside."""
    from blit.transport import protocol as p

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("v")
    mod = daemon.modules["data"]
    (mod / "d").mkdir()
    os.symlink(outside, mod / "d" / "escape")
    st = os.stat(outside / "victim")
    victim = p.Landed(name=b"victim", size=st.st_size, mtime_ns=st.st_mtime_ns)
    async with daemon.session() as s:
        opened = await s.call(p.OpenTree(module="data", path=b"d", direction="pull", operation="move", compare=0))
        for group in (
            p.RemoveGroup(rel=b"escape", files=[victim], dirs=[]),
            p.RemoveGroup(rel=b"../../outside", files=[victim], dirs=[]),
            p.RemoveGroup(rel=b"", files=[p.Landed(name=b"escape/victim", size=1, mtime_ns=0)], dirs=[]),
        ):
            try:
                reply = await s.call(p.TreeRemove(transfer=opened.transfer, groups=[group]))
            except RemoteError as exc:
                assert exc.code == "path-refused"
            else:
                assert reply.removed == 0 and reply.failures, reply
    assert (outside / "victim").read_text() == "v"
    assert os.path.islink(mod / "d" / "escape")


# --- --checksum: the hash exchange --------------------------------------------------------------


async def _checksum_case(daemon: Daemon, tmp_path: Path, direction: str) -> tuple[Path, Path, int, str, str]:
    """`checksum_case` between a local tree and the module's "tree", the source one way or the
    other: (source, destination, bytes that must be sent, blit's source and destination args)."""
    local = tmp_path / "local"
    remote = daemon.modules["data"] / "tree"
    src, dst = (local, remote) if direction == "push" else (remote, local)
    must_send = await trio.to_thread.run_sync(checksum_case, src, dst)
    r = f"{host(daemon)}:/data/tree/"
    a, b = (f"{local}/", r) if direction == "push" else (r, f"{local}/")
    return src, dst, must_send, a, b


@pytest.mark.parametrize("direction", ["push", "pull"])
@pytest.mark.parametrize("force_h2", [False, True], ids=["raw", "h2"])
async def test_checksum_sends_only_what_differs(daemon: Daemon, tmp_path: Path, direction: str, force_h2: bool) -> None:
    src, dst, must_send, a, b = await _checksum_case(daemon, tmp_path, direction)
    want = await trio.to_thread.run_sync(snapshot, src)
    s = await run(daemon, "copy", a, b, compare=Compare.CHECKSUM, force_h2_data=force_h2)
    assert s.exit_code == 0, s.failures
    assert (s.files_copied, s.bytes_copied) == (2, must_send), s
    assert s.files_skipped == 4, s  # same, big, h1 and its link h2
    assert await trio.to_thread.run_sync(snapshot, dst) == want  # content, mtimes, the link
    again = await run(daemon, "copy", a, b, compare=Compare.CHECKSUM)
    assert (again.files_copied, again.bytes_copied, again.exit_code) == (0, 0, 0), again


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_checksum_dry_run_counts_without_changing(daemon: Daemon, tmp_path: Path, direction: str) -> None:
    _src, dst, must_send, a, b = await _checksum_case(daemon, tmp_path, direction)
    before = await trio.to_thread.run_sync(snapshot, dst)
    s = await run(daemon, "copy", a, b, compare=Compare.CHECKSUM, dry_run=True)
    assert (s.files_copied, s.bytes_copied, s.exit_code) == (2, must_send, 0), s
    assert await trio.to_thread.run_sync(snapshot, dst) == before


async def test_checksum_move_removes_equal_sources(daemon: Daemon, tmp_path: Path) -> None:
    local = tmp_path / "local"
    remote = daemon.modules["data"] / "tree"
    await trio.to_thread.run_sync(checksum_case, local, remote)
    want = await trio.to_thread.run_sync(snapshot, local)
    s = await run(daemon, "move", f"{local}/", f"{host(daemon)}:/data/tree/", compare=Compare.CHECKSUM)
    assert s.exit_code == 0, s.failures
    assert leftovers(local) == []
    assert await trio.to_thread.run_sync(snapshot, remote) == want


async def test_a_source_file_replaced_after_its_copy_is_kept(daemon: Daemon, tmp_path: Path) -> None:
    """A confirmation names the source's inode (FEATURE_LANDED_INO): a file that another took
    the place of between the copy and the removal (same size, same mtime to the nanosecond, a
    new inode: an atomic save that kept the time) stays. Before, size and mtime alone were
    compared and the new file was removed. The same confirmation for the file that was copied
    removes it."""
    from blit.transport import protocol as p

    mod = daemon.modules["data"]
    (mod / "d").mkdir()
    for name in ("kept", "gone"):
        (mod / "d" / name).write_bytes(b"old content")
    copied = {name: os.stat(mod / "d" / name) for name in ("kept", "gone")}
    # Replaced: same size, same ns mtime, another inode.
    (mod / "d" / ".tmp").write_bytes(b"NEW CONTENT")
    os.utime(mod / "d" / ".tmp", ns=(copied["kept"].st_atime_ns, copied["kept"].st_mtime_ns))
    os.rename(mod / "d" / ".tmp", mod / "d" / "kept")
    now = os.stat(mod / "d" / "kept")
    assert (now.st_size, now.st_mtime_ns) == (copied["kept"].st_size, copied["kept"].st_mtime_ns) and now.st_ino != copied["kept"].st_ino
    async with daemon.session() as s:
        assert p.FEATURE_LANDED_INO in s.peer.features
        opened = await s.call(p.OpenTree(module="data", path=b"d", direction="pull", operation="move", compare=0))
        files = [p.Landed(name=n.encode(), size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino) for n, st in copied.items()]
        reply = await s.call(p.TreeRemove(transfer=opened.transfer, groups=[p.RemoveGroup(rel=b"", files=files, dirs=[])]))
    assert reply.removed == 1
    assert [(f.path, f.message) for f in reply.failures] == [(b"kept", "changed since it was copied; kept")]
    assert (mod / "d" / "kept").read_bytes() == b"NEW CONTENT" and not (mod / "d" / "gone").exists()


@pytest.mark.parametrize("peer_reads_ino", [True, False])
def test_move_confirmations_name_the_inode_only_for_a_peer_that_reads_it(peer_reads_ino: bool) -> None:
    from blit.fsops import Meta
    from blit.transport import protocol as p

    log = tree.LandedLog()
    log.with_ino = peer_reads_ino
    log.add("a", "f", Meta(0o100644, 3, 5, 5, 0, 0, 77, 1, 1, 0, 1))
    (group,) = log.take()
    (landed,) = group.files
    assert (landed.name, landed.size, landed.mtime_ns, landed.ino) == (b"f", 3, 5, 77 if peer_reads_ino else None)
    # Without it the array is the three fields an older peer decodes.
    import cbor2

    assert len(cbor2.loads(p.encode(p.TreeRemove(transfer=1, groups=[group])))["groups"][0][1][0]) == (4 if peer_reads_ino else 3)

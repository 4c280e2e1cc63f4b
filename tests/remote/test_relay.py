"""Remote to remote: `blit copy|mirror A:/m/x B:/n/y` between two real daemons on 127.0.0.1
(in-process, different ports and module directories). The destination daemon B pulls from A
when its config consents; the client only talks to B."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from blit.errors import RemoteError, TransportError, UsageError
from blit.plan import Compare
from blit.transport import tree
from blit.transport.client import Timeouts
from blit.transport.remote import remote_transfer

from .conftest import Daemon, start_daemon
from .treeutil import assert_same_tree, checksum_case, make_full_tree, snapshot, sparse_ok


async def make_pair(nursery: trio.Nursery, tmp: Path, tls: bool = True) -> tuple[Daemon, Daemon]:
    """(A, B): A is the source; B's module "data" may pull from other daemons."""
    a = await start_daemon(nursery, tmp / "A", tls=tls, stall=10.0)
    b = await start_daemon(nursery, tmp / "B", tls=tls, stall=10.0, peer_pull=True)
    return a, b


@pytest.fixture
async def pair(nursery: trio.Nursery, tmp_path: Path) -> tuple[Daemon, Daemon]:
    return await make_pair(nursery, tmp_path)


def ep(d: Daemon, path: str) -> str:
    return f"127.0.0.1:{d.info.port}:/{path}"


async def run(client: Daemon, op: str, src: str, dst: str, **kw: object):  # type: ignore[no-untyped-def]
    """The client's side, with its own known_hosts (it pins B only)."""
    return await remote_transfer(op, src, dst, tls_enabled=client.tls, known_hosts=client.known_hosts.parent / "client_known_hosts", **kw)  # type: ignore[arg-type]


def files_below(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(("tls", "force_h2"), [(True, False), (True, True), (False, False)], ids=["tls-raw", "tls-h2", "cleartext-raw"])
async def test_copy_a_tree_with_every_kind_of_entry_between_two_daemons(nursery: trio.Nursery, tmp_path: Path, tls: bool, force_h2: bool) -> None:
    a, b = await make_pair(nursery, tmp_path, tls)
    src = a.modules["data"] / "src"
    await trio.to_thread.run_sync(make_full_tree, src)
    s = await run(b, "copy", ep(a, "data/src/"), ep(b, "data/dst"), force_h2_data=force_h2)
    assert s.exit_code == 0, s.failures
    assert s.strategy == f"relay:{'h2' if force_h2 else 'tcp'}:2"
    dst = b.modules["data"] / "dst"
    await trio.to_thread.run_sync(assert_same_tree, src, dst)
    assert sparse_ok(dst / "sparse.img")
    assert os.stat(dst).st_mtime_ns == os.stat(src).st_mtime_ns
    assert s.files_copied >= 8 and s.dirs_created == 5
    assert [n for n in os.listdir(dst) if n.startswith(".blit-")] == []
    if a.tls:  # B pinned A in its own known_hosts (its state dir), the client did not
        pins = (b.config_path.parent / "state" / "known_hosts").read_text()
        assert pins.startswith(f"127.0.0.1:{a.info.port} sha256:")
        client_pins = (b.known_hosts.parent / "client_known_hosts").read_text()
        assert f"127.0.0.1:{b.info.port} " in client_pins and f":{a.info.port} " not in client_pins
    again = await run(b, "copy", ep(a, "data/src/"), ep(b, "data/dst"), force_h2_data=force_h2)
    assert (again.files_copied, again.links_created, again.exit_code) == (0, 0, 0), again.failures


async def test_mirror_between_two_daemons_deletes_extras_on_b(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    src = a.modules["data"] / "m"
    await trio.to_thread.run_sync(make_full_tree, src)
    dst = b.modules["data"] / "m"
    (dst / "a").mkdir(parents=True)
    (dst / "a" / "extra.txt").write_text("only on B")
    (dst / "gone" / "deep").mkdir(parents=True)
    (dst / "small.txt").write_text("stale")
    s = await run(b, "mirror", ep(a, "data/m/"), ep(b, "data/m/"))
    assert s.exit_code == 0, s.failures
    assert s.files_deleted == 3  # a/extra.txt, gone, gone/deep
    await trio.to_thread.run_sync(assert_same_tree, src, dst)
    assert (a.modules["data"] / "m" / "small.txt").read_text() == "hello world\n"  # A untouched


@pytest.mark.parametrize(
    ("src_suffix", "dst_suffix", "pre", "expected"),
    [
        ("tree/", "out", None, {"out/f", "out/sub/g"}),  # contents into a new dir
        ("tree/", "out/", "dir", {"out/f", "out/sub/g"}),  # contents into an existing dir
        ("tree", "out", "dir", {"out/tree/f", "out/tree/sub/g"}),  # dir into an existing dir
        ("tree", "out", None, {"out/f", "out/sub/g"}),  # dir lands as DST
        ("tree", "new/", None, {"new/tree/f", "new/tree/sub/g"}),  # dir into a new DST/ (rsync)
        ("tree/f", "out", "dir", {"out/f"}),  # file into a dir
        ("tree/f", "out", None, {"out"}),  # file as DST
        ("tree/f", "new/deeper/", None, {"new/deeper/f"}),  # file into a new dir
        ("", "out", None, {"out/tree/f", "out/tree/sub/g"}),  # A's module top: its contents
    ],
)
async def test_remote_to_remote_follows_rsync_slash_rules(
    pair: tuple[Daemon, Daemon], src_suffix: str, dst_suffix: str, pre: str | None, expected: set[str]
) -> None:
    a, b = pair
    mod_a, mod_b = a.modules["data"], b.modules["data"]
    (mod_a / "tree" / "sub").mkdir(parents=True)
    (mod_a / "tree" / "f").write_text("f")
    (mod_a / "tree" / "sub" / "g").write_text("g")
    if pre == "dir":
        (mod_b / "out").mkdir()
    s = await run(b, "copy", ep(a, "data/" + src_suffix), ep(b, "data/" + dst_suffix))
    assert s.exit_code == 0, s.failures
    assert {str(p.relative_to(mod_b)) for p in mod_b.rglob("*") if p.is_file()} == expected


async def test_slash_rule_refusals_are_usage_errors_and_change_nothing(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    (a.modules["data"] / "dir").mkdir()
    (a.modules["data"] / "file").write_text("x")
    (b.modules["data"] / "afile").write_text("y")
    cases = [
        (ep(a, "data/missing"), ep(b, "data/x"), f"source does not exist: {ep(a, 'data/missing')}"),
        (ep(a, "data/file/"), ep(b, "data/x"), "source is not a directory"),
        (ep(a, "data/dir/"), ep(b, "data/afile"), "destination exists and is not a directory: /data/afile"),
        (ep(a, "data/dir"), ep(b, "data/afile"), "cannot overwrite non-directory /data/afile"),
        (ep(a, "data/file"), ep(b, "data/afile/x"), "destination path goes through a file"),
    ]
    for src, dst, why in cases:
        with pytest.raises(UsageError, match=why):
            await run(b, "copy", src, dst)
    assert files_below(b.modules["data"]) == {"afile"}


async def test_no_consent_is_refused_naming_the_module_and_the_key(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    (a.modules["data"] / "f").write_text("x")
    with pytest.raises(RemoteError) as info:
        await run(b, "copy", ep(a, "data/"), ep(b, "other/x"))
    assert info.value.code == "not-allowed"
    assert "module 'other'" in str(info.value) and "allow_peer_pull = true" in str(info.value)
    assert files_below(b.modules["other"]) == set()


async def test_read_only_destination_is_refused(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    (a.modules["data"] / "f").write_text("x")
    with pytest.raises(RemoteError) as info:
        await run(b, "copy", ep(a, "data/"), ep(b, "ro/x"))
    assert info.value.code == "read-only" and "module 'ro' is read-only" in str(info.value)
    assert files_below(b.modules["ro"]) == set()


async def test_unknown_modules_on_either_side(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    with pytest.raises(RemoteError) as info:
        await run(b, "copy", ep(a, "data/"), ep(b, "nope/x"))
    assert info.value.code == "unknown-module" and "unknown module 'nope'" in str(info.value)
    with pytest.raises(RemoteError) as info:
        await run(b, "copy", ep(a, "nope/"), ep(b, "data/x"))
    assert info.value.code == "unknown-module"
    assert f"the source daemon 127.0.0.1:{a.info.port} refused: unknown module 'nope'" in str(info.value)
    assert files_below(b.modules["data"]) == set()


async def test_source_daemon_unreachable_from_b(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    import socket

    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    with pytest.raises(TransportError) as info:
        await run(b, "copy", f"127.0.0.1:{dead}:/data/x", ep(b, "data/y"))
    msg = str(info.value)
    assert msg.startswith(f"127.0.0.1:{b.info.port} could not reach 127.0.0.1:{dead}: "), msg
    assert msg.endswith("Connection refused") and "\n" not in msg
    assert files_below(b.modules["data"]) == set()


async def test_move_between_daemons_removes_sources_in_pages_during_the_walk(
    pair: tuple[Daemon, Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's pull is a pull move: with tiny pages, A removes what B synced while the walk goes on
    (hard-link members only at the end); the tree lands exactly and A's source is gone."""
    monkeypatch.setattr(tree, "LANDED_DRAIN", 3)
    monkeypatch.setattr(tree, "LANDED_PAGE", 2)
    monkeypatch.setattr(tree, "WALK_CONCURRENCY", 1)
    a, b = pair
    src = a.modules["data"] / "src"
    await trio.to_thread.run_sync(make_full_tree, src)
    for i in range(12):
        (src / "a" / f"more{i}").write_text(str(i))
    want = await trio.to_thread.run_sync(snapshot, src)
    s = await run(b, "move", ep(a, "data/src"), ep(b, "data/out"))
    assert s.exit_code == 0, s.failures
    assert s.files_removed == sum(1 for v in want.values() if v[0] != 0o040000)
    assert await trio.to_thread.run_sync(snapshot, b.modules["data"] / "out") == want
    assert files_below(a.modules["data"]) == set()


async def test_checksum_between_two_daemons_sends_only_what_differs(pair: tuple[Daemon, Daemon]) -> None:
    """B pulls with --checksum: equal content stays (its metadata is fixed), the rest comes."""
    a, b = pair
    src, dst = a.modules["data"] / "t", b.modules["data"] / "t"
    must_send = await trio.to_thread.run_sync(checksum_case, src, dst)
    want = await trio.to_thread.run_sync(snapshot, src)
    s = await run(b, "copy", ep(a, "data/t/"), ep(b, "data/t/"), compare=Compare.CHECKSUM)
    assert s.exit_code == 0, s.failures
    assert (s.files_copied, s.bytes_copied, s.files_skipped) == (2, must_send, 4), s
    assert await trio.to_thread.run_sync(snapshot, dst) == want


async def test_a_daemon_pulling_from_itself_refuses_to_land_inside_the_source(pair: tuple[Daemon, Daemon]) -> None:
    _a, b = pair
    (b.modules["data"] / "x" / "sub").mkdir(parents=True)
    with pytest.raises(UsageError, match="inside the source"):
        await run(b, "copy", ep(b, "data/x/"), ep(b, "data/x/sub/copy"))
    with pytest.raises(UsageError, match="the same"):
        await run(b, "copy", ep(b, "data/x/"), ep(b, "data/x/"))
    assert files_below(b.modules["data"]) == {"x", "x/sub"}
    s = await run(b, "copy", ep(b, "data/x"), ep(b, "data/y"))  # beside it is fine
    assert s.exit_code == 0 and (b.modules["data"] / "y" / "sub").is_dir()


async def test_a_daemon_mirroring_from_itself_refuses_a_destination_that_holds_the_source(pair: tuple[Daemon, Daemon]) -> None:
    """B pulling from itself: a mirror of data/t/sub/ into data/t would delete the source as an
    extra (R59; it did). A copy there deletes nothing and goes on."""
    _a, b = pair
    t = b.modules["data"] / "t"
    (t / "sub" / "deep").mkdir(parents=True)
    (t / "a").write_text("a")
    (t / "sub" / "deep" / "c").write_text("c")
    for src in ("data/t/sub/", "data/t/sub/."):
        with pytest.raises(UsageError, match="inside the destination"):
            await run(b, "mirror", ep(b, src), ep(b, "data/t/"))
    assert files_below(t) == {"a", "sub", "sub/deep", "sub/deep/c"}
    s = await run(b, "copy", ep(b, "data/t/sub/"), ep(b, "data/t/"))
    assert s.exit_code == 0 and (t / "deep" / "c").read_text() == "c" and (t / "sub" / "deep" / "c").is_file()


async def test_polls_keep_the_client_within_its_request_timeout(pair: tuple[Daemon, Daemon], monkeypatch: pytest.MonkeyPatch) -> None:
    """A's scan of one directory takes 2.5 s; the client's request timeout is 1 s. The client
    polls B (each answer within 0.25 s) instead of holding one request open, so it succeeds."""
    a, b = pair
    src = a.modules["data"] / "s"
    (src / "slow").mkdir(parents=True)
    (src / "slow" / "f").write_text("late")
    (src / "g").write_text("early")
    real_scan = tree.SourceTree.scan_parts

    def slow_scan(self: tree.SourceTree, rel: str, *args):  # type: ignore[no-untyped-def]
        if rel == "slow":
            threading.Event().wait(2.5)  # a slow disk on A
        return real_scan(self, rel, *args)

    monkeypatch.setattr(tree.SourceTree, "scan_parts", slow_scan)
    updates: list[tuple[int, int]] = []

    class Watch:
        def start(self, summary: object) -> None:
            pass

        def update(self, files: int, nbytes: int, elapsed: float) -> None:
            updates.append((files, nbytes))

        def error(self, failure: object) -> None:
            pass

        def finish(self, summary: object) -> None:
            pass

    with trio.fail_after(20):
        s = await run(b, "copy", ep(a, "data/s/"), ep(b, "data/d"), timeouts=Timeouts(request=1.0), progress=Watch())
    assert s.exit_code == 0 and (b.modules["data"] / "d" / "slow" / "f").read_text() == "late"
    assert len(updates) >= 5 and updates[-1] == (2, 9)


async def test_a_client_that_goes_away_cancels_bs_pull(pair: tuple[Daemon, Daemon], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    src = a.modules["data"] / "s"
    (src / "slow").mkdir(parents=True)
    (src / "slow" / "f").write_text("never")
    (src / "g").write_text("early")
    release = threading.Event()
    entered = threading.Event()
    real_scan = tree.SourceTree.scan_parts

    def held_scan(self: tree.SourceTree, rel: str, *args):  # type: ignore[no-untyped-def]
        if rel == "slow":
            entered.set()
            release.wait(10)
        return real_scan(self, rel, *args)

    monkeypatch.setattr(tree.SourceTree, "scan_parts", held_scan)
    try:
        with trio.move_on_after(10) as cs:
            async with trio.open_nursery() as n:
                n.start_soon(lambda: run(b, "copy", ep(a, "data/s/"), ep(b, "data/d")))
                await trio.to_thread.run_sync(entered.wait, 10)
                n.cancel_scope.cancel()  # the client goes away while B is pulling
        assert not cs.cancelled_caught
    finally:
        release.set()
    await trio.sleep(1.5)  # had B gone on, slow/f would land now
    dst = b.modules["data"] / "d"
    assert not (dst / "slow" / "f").exists()
    assert [p for p in files_below(dst) if ".blit-" in p] == []


async def test_dry_run_into_a_missing_directory_on_b_changes_nothing(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    (a.modules["data"] / "t" / "sub").mkdir(parents=True)
    (a.modules["data"] / "t" / "sub" / "g").write_text("gg")
    s = await run(b, "mirror", ep(a, "data/t/"), ep(b, "data/new/deeper"), dry_run=True)
    assert (s.exit_code, s.files_copied, s.bytes_copied, s.dirs_created) == (0, 1, 2, 1), s.failures
    assert files_below(b.modules["data"]) == set()

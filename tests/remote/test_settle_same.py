"""Up-to-date files in a directory planned from a manifest are settled in bulk (decisions R72):
on a pull (the client plans every directory from the daemon's manifests) and for the top of a
push (which never travels as a digest), an unchanged file costs no per-file Python and no
write, and every drift the per-file path repairs is still repaired, also in a directory that
travels in parts. The per-file path (DestTree._same) is the oracle: it must see exactly the
files that are not plainly up to date."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blit.transport import protocol
from blit.transport.tree import DestTree, TopJob, TreeSpec, pull_tree, push_tree

from .conftest import Daemon
from .test_tree_digest import DRIFTS, _ctimes, make_tree
from .treeutil import assert_same_tree


async def _run(daemon: Daemon, direction: str, local: Path, spec: TreeSpec | None = None) -> protocol.TreeDone:
    """Mirror local `local` to the module's "dst" (push), or the module's "src" into `local` (pull)."""
    spec = spec or TreeSpec(operation="mirror")
    async with daemon.session() as s:
        if direction == "push":
            return await push_tree(s, os.fsencode(local), "data", b"dst", TopJob(), spec)
        return await pull_tree(s, "data", b"src", os.fsencode(local), TopJob(), spec)


def _sides(daemon: Daemon, tmp_path: Path, direction: str) -> tuple[Path, Path]:
    """(source, destination) of `direction`: the local side is tmp_path/local."""
    local, remote = tmp_path / "local", daemon.modules["data"] / ("dst" if direction == "push" else "src")
    return (local, remote) if direction == "push" else (remote, local)


def _flat(src: Path) -> None:
    """make_tree, with the drifting files (d1/f2 and the rest) moved up to the top as well: the
    top of a push is planned from its manifest."""
    make_tree(src)
    for i in range(5):
        (src / f"t{i}").write_bytes(b"t" * (50 + i))
        os.utime(src / f"t{i}", ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))


class SameSpy:
    """Counts the files the per-file up-to-date path (DestTree._same) handles."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        real = DestTree._same

        def spy(tree: DestTree, rel: str, dfd: int, name: str, *args: object) -> None:
            self.names.append(f"{rel}/{name}" if rel else name)
            real(tree, rel, dfd, name, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(DestTree, "_same", spy)


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_an_unchanged_rerun_settles_every_file_in_bulk(daemon: Daemon, tmp_path: Path, direction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = _sides(daemon, tmp_path, direction)
    await trio.to_thread.run_sync(_flat, src)
    local = tmp_path / "local"
    dst.mkdir()
    first = await _run(daemon, direction, local)
    assert first.files_copied == 25 and not first.failures, first
    before = _ctimes(dst)
    spy = SameSpy(monkeypatch)
    again = await _run(daemon, direction, local)
    assert not again.failures and (again.files_copied, again.links_created, again.files_deleted) == (0, 0, 0), again
    assert again.files_skipped == 27 and again.entries_seen == first.entries_seen, again  # 25 files, the symlink, the FIFO
    # No regular file took the per-file path (the push's subdirectories went as digests; a
    # pull plans them all from manifests).
    assert spy.names == [], spy.names
    assert _ctimes(dst) == before  # nothing written: no chmod, utime or xattr call
    await trio.to_thread.run_sync(assert_same_tree, src, dst)


TOP_DRIFTS = {
    "mode": lambda s, d: os.chmod(d / "t2", 0o640),
    "mtime": lambda s, d: os.utime(d / "t2", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000)),
    "size": lambda s, d: (d / "t2").write_bytes(b"short"),
    "xattr at the destination": lambda s, d: os.setxattr(d / "t2", "user.drift", b"x"),
    "xattr at the source": lambda s, d: os.setxattr(s / "t2", "user.new", b"y"),
    "extra file": lambda s, d: (d / "extra").write_bytes(b"e"),
    "missing file": lambda s, d: (d / "t3").unlink(),
    "stale temporary": lambda s, d: (d / ".blit-0123456789abcdef.tmp").write_bytes(b"partial"),
    "hard link at the source": lambda s, d: os.link(s / "t4", s / "t4-link"),
    "hard link at the destination": lambda s, d: os.link(d / "t4", d / "t4-link"),
    "file became a directory": lambda s, d: ((d / "t0").unlink(), (d / "t0").mkdir()),
}


@pytest.mark.parametrize("scan", ["c", "python"])
@pytest.mark.parametrize("direction", ["push", "pull"])
@pytest.mark.parametrize("drift", sorted(set(DRIFTS) | set(TOP_DRIFTS)))
async def test_drift_is_repaired_as_by_the_per_file_path(
    daemon: Daemon, tmp_path: Path, direction: str, drift: str, scan: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`scan`: "python", the directories are listed by fsops.scan (no C scan: a directory the C
    scan could not take), and the destination's xattrs looked at by scan.xattr_flags."""
    if scan == "python":
        from blit.ffi import scan as cscan

        monkeypatch.setattr(cscan, "scan_packed", lambda dfd, keep_tmp=False: None)
    src, dst = _sides(daemon, tmp_path, direction)
    await trio.to_thread.run_sync(_flat, src)
    local = tmp_path / "local"
    dst.mkdir()
    await _run(daemon, direction, local)
    for table in (DRIFTS, TOP_DRIFTS):
        if drift in table:
            table[drift](src, dst)
    done = await _run(daemon, direction, local)
    assert not done.failures, done.failures
    await trio.to_thread.run_sync(assert_same_tree, src, dst)
    assert not [n for _d, _s, files in os.walk(dst) for n in files if n.startswith(".blit-")]


@pytest.mark.skipif(os.geteuid() != 0, reason="owners are preserved only as root")
@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_an_owner_drift_is_repaired_as_root(daemon: Daemon, tmp_path: Path, direction: str) -> None:
    src, dst = _sides(daemon, tmp_path, direction)
    await trio.to_thread.run_sync(_flat, src)
    local = tmp_path / "local"
    dst.mkdir()
    await _run(daemon, direction, local)
    os.chown(dst / "t2", 65534, 65534, follow_symlinks=False)
    os.chown(dst / "d1" / "f2", 65534, 65534, follow_symlinks=False)
    done = await _run(daemon, direction, local)
    assert not done.failures, done.failures
    for rel in ("t2", "d1/f2"):
        s, d = os.lstat(src / rel), os.lstat(dst / rel)
        assert (d.st_uid, d.st_gid) == (s.st_uid, s.st_gid), rel


def _wide(d: Path, n: int) -> None:
    d.mkdir(parents=True)
    for i in range(n):
        (d / f"w{i:05d}").write_bytes(b"%d" % i)
        os.utime(d / f"w{i:05d}", ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_a_directory_in_parts_settles_and_mirrors_exactly(
    daemon: Daemon, tmp_path: Path, direction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3,000 files in parts of 700 (both sides run in this process): drift in a middle part and
    in the last, a destination-only name in the first part's range (a mirror deletes it, and
    no name that an earlier part settled)."""
    monkeypatch.setattr(protocol, "PART_ENTRIES", 700)
    src, dst = _sides(daemon, tmp_path, direction)
    await trio.to_thread.run_sync(_wide, src, 3000)
    local = tmp_path / "local"
    dst.mkdir()
    first = await _run(daemon, direction, local)
    assert first.files_copied == 3000 and not first.failures, first
    os.chmod(dst / "w01500", 0o600)
    (dst / "w02999").write_bytes(b"changed")
    (dst / "w00001-extra").write_bytes(b"extra")
    (dst / "w00700").unlink()
    spy = SameSpy(monkeypatch)
    done = await _run(daemon, direction, local)
    assert not done.failures, done.failures
    assert (done.files_copied, done.files_deleted, done.files_skipped) == (2, 1, 2998), done
    assert spy.names == ["w01500"], spy.names  # only the file whose mode drifted
    await trio.to_thread.run_sync(assert_same_tree, src, dst)


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_the_top_is_listed_while_the_source_is(daemon: Daemon, tmp_path: Path, direction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination lists an existing top directory as soon as the transfer opens (the
    daemon on a push, the client on a pull: DestTree.prefetch), and its plan takes that
    listing instead of making its own."""
    src, dst = _sides(daemon, tmp_path, direction)
    await trio.to_thread.run_sync(_flat, src)
    local = tmp_path / "local"
    dst.mkdir()
    await _run(daemon, direction, local)
    (dst / "t1").write_bytes(b"drift")
    taken: list[tuple[str, bool]] = []
    real = DestTree._scanned

    def spy(tree: DestTree, dst_rel: str, part: int) -> object:
        got = real(tree, dst_rel, part)
        taken.append((dst_rel, got is not None))
        return got

    monkeypatch.setattr(DestTree, "_scanned", spy)
    done = await _run(daemon, direction, local)
    assert not done.failures and done.files_copied == 1, done
    assert ("", True) in taken and all(ok == (rel == "") for rel, ok in taken), taken
    await trio.to_thread.run_sync(assert_same_tree, src, dst)

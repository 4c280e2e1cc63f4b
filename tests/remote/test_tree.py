"""Tree transfers through the daemon: push and pull of a tree with every kind of entry, over raw
streams and forced HTTP/2; mirror deletions; read-only and containment refusals."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
import trio

from blit.errors import RemoteError, UsageError
from blit.transport.tree import TopJob, TreeSpec, pull_tree, push_tree

from .conftest import Daemon
from .treeutil import assert_same_tree, make_full_tree, sparse_ok


@pytest.fixture(params=[False, True], ids=["raw", "h2"])
def force_h2(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_push_a_tree_with_every_kind_of_entry(daemon: Daemon, tmp_path: Path, force_h2: bool) -> None:
    src = tmp_path / "src"
    await trio.to_thread.run_sync(make_full_tree, src)
    dst = daemon.modules["data"] / "dst"
    dst.mkdir()
    async with daemon.session(force_h2_data=force_h2) as s:
        done = await push_tree(s, os.fsencode(src), "data", b"dst", TopJob(), TreeSpec())
    assert not done.failures, done.failures
    assert done.files_copied >= 8 and done.dirs_created == 5
    await trio.to_thread.run_sync(assert_same_tree, src, dst)
    assert sparse_ok(dst / "sparse.img")
    assert os.stat(dst).st_mtime_ns == os.stat(src).st_mtime_ns  # `src/` -> dst: the top too
    assert [n for n in os.listdir(dst) if n.startswith(".blit-")] == []
    # A second run has nothing to do.
    async with daemon.session(force_h2_data=force_h2) as s:
        again = await push_tree(s, os.fsencode(src), "data", b"dst", TopJob(), TreeSpec())
    assert again.files_copied == 0 and again.links_created == 0 and not again.failures, again


async def test_pull_a_tree_with_every_kind_of_entry(daemon: Daemon, tmp_path: Path, force_h2: bool) -> None:
    src = daemon.modules["data"] / "src"
    await trio.to_thread.run_sync(make_full_tree, src)
    dst = tmp_path / "dst"
    dst.mkdir()
    async with daemon.session(force_h2_data=force_h2) as s:
        done = await pull_tree(s, "data", b"src", os.fsencode(dst), TopJob(), TreeSpec())
    assert not done.failures, done.failures
    await trio.to_thread.run_sync(assert_same_tree, src, dst)
    assert sparse_ok(dst / "sparse.img")
    async with daemon.session(force_h2_data=force_h2) as s:
        again = await pull_tree(s, "data", b"src", os.fsencode(dst), TopJob(), TreeSpec())
    assert again.files_copied == 0 and not again.failures, again


async def test_hard_linked_symlinks_fifos_sockets_and_devices_stay_linked(daemon: Daemon, tmp_path: Path, force_h2: bool) -> None:
    """Pushed and pulled back, every group keeps its names on one inode, as rsync -aH keeps
    them (each name landed as an inode of its own); a rerun onto an unlinked copy links it."""
    from helpers import link_groups, make_linked_others

    src = tmp_path / "src"
    await trio.to_thread.run_sync(make_linked_others, src)
    want = link_groups(src)
    dst = daemon.modules["data"] / "dst"
    dst.mkdir()
    back = tmp_path / "back"
    back.mkdir()
    async with daemon.session(force_h2_data=force_h2) as s:
        done = await push_tree(s, os.fsencode(src), "data", b"dst", TopJob(), TreeSpec())
        assert not done.failures, done.failures
        assert link_groups(dst) == want
        assert_same_tree(src, dst)
        done = await pull_tree(s, "data", b"dst", os.fsencode(back), TopJob(), TreeSpec())
        assert not done.failures, done.failures
    assert link_groups(back) == want
    assert_same_tree(src, back)
    # Onto a copy whose names are each an inode of their own (rsync -a), up to date name by
    # name: the push links them up (QA: the directory digests matched, so no manifest went, and
    # nothing was linked, run after run).
    flat = daemon.modules["data"] / "flat"
    subprocess.run(["rsync", "-a", f"{src}/", f"{flat}/"], check=True)
    assert link_groups(flat) == []
    async with daemon.session(force_h2_data=force_h2) as s:
        done = await push_tree(s, os.fsencode(src), "data", b"flat", TopJob(), TreeSpec())
    assert not done.failures, done.failures
    assert link_groups(flat) == want


async def test_push_mirror_deletes_extras_and_updates_changes(daemon: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    (src / "keep" / "f").write_text("new content")
    (src / "same").write_text("same")
    dst = daemon.modules["data"] / "m"
    (dst / "keep").mkdir(parents=True)
    (dst / "keep" / "f").write_text("old")
    (dst / "keep" / "extra").write_text("x")
    (dst / "gone").mkdir()
    (dst / "gone" / "deep").write_text("x")
    (dst / "same").write_text("same")
    os.utime(dst / "same", ns=(os.stat(src / "same").st_mtime_ns,) * 2)
    async with daemon.session() as s:
        done = await push_tree(s, os.fsencode(src), "data", b"m", TopJob(), TreeSpec(operation="mirror"))
    assert done.files_copied == 1 and done.files_deleted == 3 and done.files_skipped == 1, done
    assert sorted(os.listdir(dst)) == ["keep", "same"]
    assert os.listdir(dst / "keep") == ["f"] and (dst / "keep" / "f").read_text() == "new content"


async def test_pull_mirror_deletes_local_extras(daemon: Daemon, tmp_path: Path) -> None:
    src = daemon.modules["data"] / "s"
    src.mkdir()
    (src / "a").write_text("a")
    dst = tmp_path / "d"
    dst.mkdir()
    (dst / "extra").write_text("x")
    async with daemon.session() as s:
        done = await pull_tree(s, "data", b"s", os.fsencode(dst), TopJob(), TreeSpec(operation="mirror"))
    assert done.files_deleted == 1
    assert os.listdir(dst) == ["a"]


async def test_pushing_into_a_read_only_module_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    async with daemon.session() as s:
        with pytest.raises(RemoteError) as info:
            await push_tree(s, os.fsencode(src), "ro", b"", TopJob(), TreeSpec())
    assert info.value.code == "read-only"
    assert os.listdir(daemon.modules["ro"]) == []


async def test_a_manifest_cannot_write_outside_the_module(daemon: Daemon, tmp_path: Path) -> None:
    """A hostile client naming '..' or a path with '/' in a manifest gets a refusal."""
    from blit.transport import protocol as p

    async with daemon.session() as s:
        opened = await s.call(p.OpenTree(module="data", path=b"", direction="push", operation="copy", compare=0))
        entry = p.SrcEntry(name=b"..", mode=0o100644, size=1, mtime_ns=0, atime_ns=0, uid=0, gid=0, dev=1, ino=1, nlink=1, rdev=0, blocks=0)
        for bad in (b"..", b"a/b", b"x\0y"):
            with pytest.raises(RemoteError) as info:
                await s.call(p.TreeDir(transfer=opened.transfer, rel=b"", dst_rel=b"", dst_new=False, entries=[dataclasses.replace(entry, name=bad)]))
            assert info.value.code in ("path-refused", "bad-request")
        for rel in (b"../x", b"/etc"):
            with pytest.raises(RemoteError) as info:
                await s.call(p.TreeDir(transfer=opened.transfer, rel=rel, dst_rel=rel, dst_new=False, entries=[]))
            assert info.value.code == "path-refused"
    assert os.listdir(daemon.modules["data"]) == []


async def test_symlinked_destination_directory_is_not_followed(daemon: Daemon, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, daemon.modules["data"] / "escape")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    async with daemon.session() as s:
        with pytest.raises(RemoteError) as info:
            await push_tree(s, os.fsencode(src), "data", b"escape", TopJob(), TreeSpec())
    assert info.value.code == "path-refused"
    assert os.listdir(outside) == []


@pytest.mark.parametrize("kind", ["file", "fifo"])
async def test_an_entry_made_a_symlink_meanwhile_never_passes_its_mode_outside(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """An up-to-date entry whose mode the push changes is swapped for a symlink to a file
    outside the module between the daemon's look and its chmod (QA: a push made a root-owned
    0600 file outside the module 04777): the chmod does not follow, the entry is reported."""
    from blit import fsops

    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"secret")
    os.chmod(victim, 0o600)
    src = tmp_path / "src"
    src.mkdir()
    dst = daemon.modules["data"] / "dst"
    dst.mkdir()
    for top in (src, dst):
        if kind == "file":
            (top / "f").write_bytes(b"same")
        else:
            os.mkfifo(top / "f")
        os.utime(top / "f", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    os.chmod(src / "f", 0o4777)
    os.chmod(dst / "f", 0o600)
    real = fsops.fix_meta

    def swapped(dst_dir: int, name: str, *args: object, **kw: object) -> bool:
        os.unlink(name, dir_fd=dst_dir)
        os.symlink(victim, name, dir_fd=dst_dir)
        return real(dst_dir, name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(fsops, "fix_meta", swapped)
    async with daemon.session() as s:
        done = await push_tree(s, os.fsencode(src) + b"/", "data", b"dst", TopJob(), TreeSpec())
    assert os.stat(victim).st_mode & 0o7777 == 0o600
    assert victim.read_bytes() == b"secret"
    assert [f.path for f in done.failures] == [b"f"], done.failures
    assert "symbolic link" in done.failures[0].message, done.failures


# --- remote_transfer: rsync's trailing-slash rules across topologies --------------------------

from blit.transport.remote import remote_transfer  # noqa: E402


async def _run(d: Daemon, op: str, src: str, dst: str, **kw: object):  # type: ignore[no-untyped-def]
    return await remote_transfer(op, src, dst, tls_enabled=d.tls, known_hosts=d.known_hosts, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("src_suffix", "dst_suffix", "pre", "expected"),
    [
        ("tree/", "/out", None, {"out/f", "out/sub/g"}),  # contents into a new dir
        ("tree/", "/out/", "dir", {"out/f", "out/sub/g"}),  # contents into an existing dir
        ("tree", "/out", "dir", {"out/tree/f", "out/tree/sub/g"}),  # dir into an existing dir
        ("tree", "/out", None, {"out/f", "out/sub/g"}),  # dir lands as DST
        ("tree/f", "/out", "dir", {"out/f"}),  # file into a dir
        ("tree/f", "/out", None, {"out"}),  # file as DST
        ("tree/f", "/new/deeper/", None, {"new/deeper/f"}),  # file into a new dir (trailing /)
        ("tree/.", "/out", "dir", {"out/f", "out/sub/g"}),  # `/.` and `/..`: contents, as `/`
        ("tree/sub/..", "/out", "dir", {"out/f", "out/sub/g"}),
        ("tree/f", "/out/.", "dir", {"out/f"}),
    ],
)
async def test_push_follows_rsync_slash_rules(daemon: Daemon, tmp_path: Path, src_suffix: str, dst_suffix: str, pre: str | None, expected: set[str]) -> None:
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "f").write_text("f")
    (tmp_path / "tree" / "sub" / "g").write_text("g")
    mod = daemon.modules["data"]
    if pre == "dir":
        (mod / "out").mkdir()
    summary = await _run(daemon, "copy", f"{tmp_path}/{src_suffix}", f"127.0.0.1:{daemon.info.port}:/data{dst_suffix}")
    assert summary.exit_code == 0, summary.failures
    got = {str(p.relative_to(mod)) for p in mod.rglob("*") if p.is_file()}
    assert got == expected


@pytest.mark.parametrize(
    ("src_suffix", "dst_name", "pre", "expected"),
    [
        ("/tree/", "out", None, {"out/f", "out/sub/g"}),
        ("/tree", "out", "dir", {"out/tree/f", "out/tree/sub/g"}),
        ("/tree", "out", None, {"out/f", "out/sub/g"}),
        ("/tree/f", "out", "dir", {"out/f"}),
        ("/tree/f", "out", None, {"out"}),
        ("", "out", None, {"out/tree/f", "out/tree/sub/g"}),  # the module's top: its contents
        ("/tree/.", "out", "dir", {"out/f", "out/sub/g"}),  # `/.`: contents, as `/`
        ("/tree/.", "out/.", "dir", {"out/f", "out/sub/g"}),
    ],
)
async def test_pull_follows_rsync_slash_rules(daemon: Daemon, tmp_path: Path, src_suffix: str, dst_name: str, pre: str | None, expected: set[str]) -> None:
    mod = daemon.modules["data"]
    (mod / "tree" / "sub").mkdir(parents=True)
    (mod / "tree" / "f").write_text("f")
    (mod / "tree" / "sub" / "g").write_text("g")
    local = tmp_path / "local"
    local.mkdir()
    if pre == "dir":
        (local / dst_name).mkdir()
    summary = await _run(daemon, "copy", f"127.0.0.1:{daemon.info.port}:/data{src_suffix}", f"{local}/{dst_name}")
    assert summary.exit_code == 0, summary.failures
    got = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert got == expected


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_a_mirror_into_a_directory_holding_its_source_is_refused(daemon: Daemon, tmp_path: Path, direction: str) -> None:
    """The daemon on this machine, the module holding the local source (push) or the local
    destination holding the module's source (pull): the source would be an extra of the
    mirror's destination, and deleted (R59; it was)."""
    t = daemon.modules["data"] / "t"
    (t / "sub" / "deep").mkdir(parents=True)
    (t / "a").write_text("a")
    (t / "sub" / "deep" / "c").write_text("c")
    host = f"127.0.0.1:{daemon.info.port}"
    cases = [(f"{t}/sub/", f"{host}:/data/t"), (f"{t}/sub/deep/.", f"{host}:/data/t/")] if direction == "push" else [
        (f"{host}:/data/t/sub/", str(t)), (f"{host}:/data/t/sub/.", f"{t}/")]  # fmt: skip
    for src, dst in cases:
        with pytest.raises(UsageError, match="inside the destination"):
            await _run(daemon, "mirror", src, dst)
    assert {str(p.relative_to(t)) for p in t.rglob("*")} == {"a", "sub", "sub/deep", "sub/deep/c"}


async def test_remote_transfer_bad_input(daemon: Daemon, tmp_path: Path) -> None:
    host = f"127.0.0.1:{daemon.info.port}"
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="source does not exist"):
        await _run(daemon, "copy", f"{host}:/data/missing", str(tmp_path / "x"))
    with pytest.raises(UsageError, match="source does not exist"):
        await _run(daemon, "copy", str(tmp_path / "missing"), f"{host}:/data/x")
    with pytest.raises(UsageError, match="not a directory"):
        await _run(daemon, "copy", str(tmp_path / "f") + "/", f"{host}:/data/x")
    with pytest.raises(RemoteError, match="unknown module 'nope'"):
        await _run(daemon, "copy", str(tmp_path / "f"), f"{host}:/nope/x")
    with pytest.raises(RemoteError, match="does not accept remote to remote transfers"):  # no allow_peer_pull
        await _run(daemon, "copy", f"{host}:/data/a", f"{host}:/data/b")
    assert os.listdir(daemon.modules["data"]) == []


async def test_a_file_onto_a_non_directory_with_a_trailing_slash_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    """cp and rsync say "Not a directory" for `file DST/` when DST is a file; a symlink on the
    daemon (never followed) is named as one. Neither is replaced."""
    host = f"127.0.0.1:{daemon.info.port}"
    mod = daemon.modules["data"]
    (tmp_path / "f").write_text("new")
    (mod / "file").write_text("old")
    (mod / "sub").mkdir()
    (mod / "link").symlink_to("sub")
    with pytest.raises(UsageError, match=r"^destination is not a directory: .*/data/file/$"):
        await _run(daemon, "copy", str(tmp_path / "f"), f"{host}:/data/file/")
    with pytest.raises(UsageError, match=r"^destination is a symbolic link, which a daemon never follows, not a directory: .*/data/link/$"):
        await _run(daemon, "copy", str(tmp_path / "f"), f"{host}:/data/link/")
    for dst in ("file/x/", "file/x"):  # the same words as without the slash (exit 2)
        with pytest.raises(UsageError, match=r"^destination path goes through a file: "):
            await _run(daemon, "copy", str(tmp_path / "f"), f"{host}:/data/{dst}")
    assert (mod / "file").read_text() == "old"
    assert os.readlink(mod / "link") == "sub" and os.listdir(mod / "sub") == []
    (tmp_path / "local").write_text("old")
    with pytest.raises(UsageError, match="^destination is not a directory: "):
        await _run(daemon, "copy", f"{host}:/data/file", str(tmp_path / "local") + "/")
    assert (tmp_path / "local").read_text() == "old"


async def test_a_symlink_named_as_a_pulled_directory_is_called_one(daemon: Daemon, tmp_path: Path) -> None:
    mod = daemon.modules["data"]
    (mod / "x").mkdir()
    (mod / "ld").symlink_to("x")
    with pytest.raises(UsageError, match="^source is a symbolic link, which a daemon never follows, not a directory: "):
        await _run(daemon, "copy", f"127.0.0.1:{daemon.info.port}:/data/ld/", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


async def test_a_doubled_slash_after_the_module_is_one_as_in_rsync(daemon: Daemon, tmp_path: Path) -> None:
    host = f"127.0.0.1:{daemon.info.port}"
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a").write_text("a")
    s = await _run(daemon, "copy", str(tmp_path / "s") + "/", f"{host}:/data//x")
    assert s.exit_code == 0 and (daemon.modules["data"] / "x" / "a").read_text() == "a"
    s = await _run(daemon, "copy", f"{host}:/data//x/a", str(tmp_path / "back"))
    assert s.exit_code == 0 and (tmp_path / "back").read_text() == "a"


async def test_remote_mirror_summary(daemon: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    mod = daemon.modules["data"]
    (mod / "m").mkdir()
    (mod / "m" / "old").write_text("x")
    s = await _run(daemon, "mirror", str(src) + "/", f"127.0.0.1:{daemon.info.port}:/data/m/")
    assert (s.files_copied, s.files_deleted, s.exit_code) == (1, 1, 0)
    assert s.strategy.startswith("push:")
    assert os.listdir(mod / "m") == ["a"]


async def _mirror_dry_then_real(
    daemon: Daemon, tmp_path: Path, direction: str, src_files: dict[str, str], dst_files: list[str], exclude: str, exit_code: int
) -> tuple[Path, list[int]]:
    """Mirror a source of `src_files` over a destination holding `dst_files`, pushed or pulled,
    excluding `exclude`: a dry run, then the real one, each ending with `exit_code`. Returns the
    destination and the two runs' files_deleted."""
    host = f"127.0.0.1:{daemon.info.port}"
    mod = daemon.modules["data"]
    src = tmp_path / "src" if direction == "push" else mod / "src"
    dst = mod / "dst" if direction == "push" else tmp_path / "dst"
    src.mkdir()
    for rel, text in src_files.items():
        (src / rel).write_text(text)
    for rel in dst_files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_text("old")
    src_url, dst_url = (f"{src}/", f"{host}:/data/dst/") if direction == "push" else (f"{host}:/data/src/", f"{dst}/")
    counts = []
    for dry in (True, False):
        s = await _run(daemon, "mirror", src_url, dst_url, dry_run=dry, filters=[(False, exclude)])
        assert s.exit_code == exit_code, s.failures
        counts.append(s.files_deleted)
    return dst, counts


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_a_remote_mirror_dry_run_counts_the_deletions_the_real_run_makes(daemon: Daemon, tmp_path: Path, direction: str) -> None:
    dst, counts = await _mirror_dry_then_real(daemon, tmp_path, direction, {}, ["x/y/z", "x/keep.tmp", "e"], "*.tmp", 0)
    assert counts == [3, 3]
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == ["x", "x/keep.tmp"]


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_entries_a_remote_mirror_removes_to_make_way_are_counted(daemon: Daemon, tmp_path: Path, direction: str) -> None:
    files = {"e": "e", "d": "d"}
    dst, counts = await _mirror_dry_then_real(daemon, tmp_path, direction, files, ["e/x", "e/y", "d/keep.log", "d/other"], "*.log", 3)
    assert counts == [4, 4]
    assert (dst / "e").read_text() == "e" and sorted(os.listdir(dst / "d")) == ["keep.log"]


async def test_pull_dry_run_into_a_missing_directory_changes_nothing(daemon: Daemon, tmp_path: Path) -> None:
    mod = daemon.modules["data"]
    (mod / "tree" / "sub").mkdir(parents=True)
    (mod / "tree" / "f").write_text("f")
    (mod / "tree" / "sub" / "g").write_text("gg")
    for src, dst in ((f"127.0.0.1:{daemon.info.port}:/data/tree/", tmp_path / "new"), (f"127.0.0.1:{daemon.info.port}:/data/tree/f", tmp_path / "x" / "y")):
        s = await _run(daemon, "copy", src, str(dst), dry_run=True)
        assert s.exit_code == 0 and s.files_copied >= 1, s.failures
    assert not (tmp_path / "new").exists() and not (tmp_path / "x").exists()


async def test_push_dry_run_into_a_missing_directory_changes_nothing(daemon: Daemon, tmp_path: Path) -> None:
    """`blit copy -n SRC/ host:/m/new/deeper/` reports what it would copy (rsync -n does) and
    creates nothing; a link on the way is still refused as the real run would refuse it."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_text("f")
    (src / "sub" / "g").write_text("gg")
    mod = daemon.modules["data"]
    base = f"127.0.0.1:{daemon.info.port}:/data"
    for op, s_arg, dst in (("copy", f"{src}/", "new/deeper/"), ("mirror", str(src), "new/"), ("copy", f"{src}/f", "x/y")):
        before = sorted(p.name for p in mod.iterdir())
        s = await _run(daemon, op, s_arg, f"{base}/{dst}", dry_run=True)
        assert s.exit_code == 0, s.failures
        assert s.files_copied == (1 if dst == "x/y" else 2)
        assert sorted(p.name for p in mod.iterdir()) == before
    (mod / "esc").symlink_to(tmp_path)
    with pytest.raises(RemoteError, match="esc is a symbolic link"):
        await _run(daemon, "copy", f"{src}/", f"{base}/esc/new/", dry_run=True)
    assert not (tmp_path / "new").exists()

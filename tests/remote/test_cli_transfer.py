"""`blit copy/move` against a real `blit daemon` process: move's exit codes and messages, a
read-only module refusing a pull move, a source unreadable by the client, and live --json
progress of remote runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from helpers import AS_NOBODY, NOBODY, chown_tree

from .conftest import DaemonProcess, blit_cmd, run_daemon_process
from .treeutil import temporaries_after_settling

MiB = 1 << 20


def blit(d: DaemonProcess, *args: str, as_nobody: bool = False, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*blit_cmd(), *args]
    if as_nobody:
        argv = [*AS_NOBODY, *argv]
    return subprocess.run(argv, env=env or d.env, capture_output=True, text=True, timeout=120)


def errors(r: subprocess.CompletedProcess[str]) -> list[str]:
    """blit's own stderr lines (not the note about pinning the daemon's certificate)."""
    return [ln for ln in r.stderr.splitlines() if ln.startswith("blit:") and not ln.startswith("blit: pinned the TLS certificate of")]


def url(d: DaemonProcess, path: str) -> str:
    return f"127.0.0.1:{d.port}:/{path}"


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_move_with_a_failed_file_exits_3_and_keeps_it(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    d = daemon_process
    local = tmp_path / "local"
    local.mkdir()
    remote = d.modules["data"]
    src_root, dst_root = (local, remote) if direction == "push" else (remote, local)
    src = src_root / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "x").write_text("cannot land")
    (src / "sub" / "ok").write_text("ok")
    (dst_root / "out" / "x").mkdir(parents=True)
    (dst_root / "out" / "x" / "keep").write_text("in the way")
    a, b = (f"{src}/", url(d, "data/out")) if direction == "push" else (url(d, "data/tree/"), f"{local}/out")
    r = blit(d, "move", a, b)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert errors(r) == ["blit: x: replace: directory not empty (mirror replaces it)"], r.stderr
    assert sorted(os.listdir(src)) == ["x"] and (src / "x").read_text() == "cannot land"
    assert (dst_root / "out" / "sub" / "ok").read_text() == "ok"


def test_pull_move_from_a_read_only_module_changes_nothing(daemon_process: DaemonProcess, tmp_path: Path) -> None:
    d = daemon_process
    (d.modules["ro"] / "tree").mkdir()
    (d.modules["ro"] / "tree" / "f").write_text("stays")
    r = blit(d, "move", url(d, "ro/tree"), str(tmp_path / "out"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert errors(r) == [
        "blit: error: module 'ro' is read-only: a move from it would remove its files (copy instead)"
    ], r.stderr
    assert (d.modules["ro"] / "tree" / "f").read_text() == "stays"
    assert not (tmp_path / "out").exists()


@pytest.mark.root
def test_push_move_keeps_a_file_the_client_cannot_read(nobody_tmp: Path, tmp_path: Path) -> None:
    src = nobody_tmp / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "secret").write_text("unreadable")
    (src / "ok").write_bytes(os.urandom(100_000))
    (src / "sub" / "ok2").write_text("ok2")
    chown_tree(src, NOBODY, NOBODY)
    os.chmod(src / "sub" / "secret", 0o000)
    ok = (src / "ok").read_bytes()
    with run_daemon_process(tmp_path, tls=False) as d:
        env = {**d.env, "HOME": str(nobody_tmp / "home")}
        r = blit(d, "move", "--no-tls", f"{src}/", url(d, "data/out"), as_nobody=True, env=env)
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert errors(r) == ["blit: sub/secret: copy: Permission denied"], r.stderr
        out = d.modules["data"] / "out"
        assert (out / "ok").read_bytes() == ok and (out / "sub" / "ok2").read_text() == "ok2"
        assert not (out / "sub" / "secret").exists()
        assert sorted(p.name for p in src.rglob("*")) == ["secret", "sub"]


def _ends(d: DaemonProcess, tmp_path: Path, direction: str) -> tuple[Path, Path, list[str]]:
    """Source and destination trees of a copy in `direction` (local, push or pull), and the
    endpoints that name them; the source is not made."""
    if direction == "pull":
        dst = tmp_path / "dst"
        return d.modules["data"] / "src", dst, [url(d, "data/src/"), f"{dst}/"]
    src = tmp_path / "src"
    if direction == "push":
        return src, d.modules["data"] / "dst", [f"{src}/", url(d, "data/dst/")]
    return src, tmp_path / "dst", [f"{src}/", f"{tmp_path / 'dst'}/"]


def test_a_mirror_that_cannot_read_a_destination_directory_says_so(nobody_tmp: Path, tmp_path: Path) -> None:
    """Deleting nothing is right; blaming the source was not (it was read whole)."""
    with run_daemon_process(tmp_path, tls=False) as d:
        src = d.modules["data"] / "src"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "f").write_text("f")
        (src / "a").write_text("a")
        dst = nobody_tmp / "dst"
        (dst / "sub").mkdir(parents=True)
        (dst / "extra").write_text("only here")
        chown_tree(dst, NOBODY, NOBODY)
        os.chown(dst / "sub", 0, 0)
        os.chmod(dst / "sub", 0o000)  # the client (nobody) cannot read it
        env = {**d.env, "HOME": str(nobody_tmp / "home")}
        r = blit(d, "mirror", "--no-tls", url(d, "data/src/"), f"{dst}/", as_nobody=True, env=env)
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert "blit: mirror deleted nothing: 1 destination directory could not be read (1 destination entry kept)" in errors(r), r.stderr
        assert (dst / "extra").exists()


@pytest.mark.parametrize("flags", [[], ["-I"]], ids=["", "ignore times"])
@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_move_onto_hard_links_of_its_own_files_keeps_everything(daemon_process: DaemonProcess, direction: str, flags: list[str]) -> None:
    """The destination's files are the source's own (hard links: the same inodes): every file
    was judged up to date and removed from the source, the only copy (exit 0). The destination
    now knows the source is on its machine (FEATURE_MACHINE) and keeps an entry that is its own
    source, one failure each. With -I the file was landed anew over itself, then removed."""
    d = daemon_process
    here, there = d.modules["data"] / "tree", d.modules["data"] / "links"
    (here / "sub").mkdir(parents=True)
    (there / "sub").mkdir(parents=True)
    (here / "a").write_text("a")
    (here / "sub" / "b").write_text("b")
    os.symlink("a", here / "ln")
    for p in ("a", "sub/b", "ln"):
        os.link(here / p, there / p, follow_symlinks=False)
    args = [f"{here}/", url(d, "data/links/")] if direction == "push" else [url(d, "data/tree/"), f"{there}/"]
    r = blit(d, "move", *flags, *args)
    assert r.returncode == 3, (r.stdout, r.stderr)
    why = "remove source: source and destination are the same file (another path to it: a bind mount, a hard link); kept"
    assert sorted(errors(r)) == [f"blit: {p}: {why}" for p in ("a", "ln", "sub/b")], r.stderr
    assert (here / "a").read_text() == "a" and (here / "sub" / "b").read_text() == "b" and os.readlink(here / "ln") == "a"


def _listing(top: Path) -> dict[str, str]:
    return {str(p.relative_to(top)): p.read_text() if p.is_file() else "" for p in top.rglob("*")}


@pytest.mark.parametrize("operation", ["copy", "move"])
@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_transfer_onto_or_into_its_own_source_by_another_path_is_refused(
    daemon_process: DaemonProcess, tmp_path: Path, direction: str, operation: str
) -> None:
    """The module's directory is the client's source seen by another path, or the other way
    round. Into a directory inside the source, the copy chased its own output until killed
    (tens of thousands of levels); onto it, a move judged every file its own copy. Refused
    now, as a local copy is (exit 2, one line, nothing changed): the daemon, on the client's
    machine, compares directories by device and inode (FEATURE_NEST, R52)."""
    d = daemon_process
    here = d.modules["data"] / "tree"
    (here / "sub").mkdir(parents=True)
    (here / "a").write_text("a")
    (here / "sub" / "b").write_text("b")
    before = _listing(here)
    via = tmp_path / "via"  # another path to the module: a symlink, so that no name says so
    via.symlink_to(d.modules["data"])
    (tmp_path / "to_sub").symlink_to(here / "sub")  # its name's parents are not the source's
    if direction == "push":
        cases = [
            ([f"{via}/tree/", url(d, "data/tree/")], "blit: error: source and destination are the same directory: /data/tree/ is the source by another path"),
            ([f"{via}/tree", url(d, "data/tree/sub/")], "blit: error: destination /data/tree/sub/tree is inside the source (by another path to it)"),
            ([f"{via}/tree/", url(d, "data/tree/sub/new/deeper")], "blit: error: destination /data/tree/sub/new/deeper is inside the source (by another path to it)"),
            ([f"{via}/tree/sub", url(d, "data/tree/")], "blit: error: source and destination are the same directory: /data/tree/sub is the source by another path"),
        ]
    else:
        cases = [
            ([url(d, "data/tree/"), f"{via}/tree/"], f"blit: error: source and destination are the same directory: {url(d, 'data/tree/')} and {via}/tree/"),
            ([url(d, "data/tree"), f"{via}/tree/sub/"], f"blit: error: destination {via}/tree/sub/ is inside the source {url(d, 'data/tree')}"),
            ([url(d, "data/tree/"), f"{via}/tree/sub/new/deeper"], f"blit: error: destination {via}/tree/sub/new/deeper is inside the source {url(d, 'data/tree/')}"),
            ([url(d, "data/tree"), f"{tmp_path}/to_sub/x"], f"blit: error: destination {tmp_path}/to_sub/x is inside the source {url(d, 'data/tree')}"),
        ]
    for args, why in cases:
        r = blit(d, operation, *args)
        assert (r.returncode, errors(r)) == (2, [why]), (args, r.stdout, r.stderr)
        assert _listing(here) == before, args
    # Beside the source (not in it) the same paths work.
    args = [f"{via}/tree/", url(d, "data/beside")] if direction == "push" else [url(d, "data/tree/"), f"{via}/beside"]
    r = blit(d, operation, *args)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert _listing(d.modules["data"] / "beside") == before


CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # VFS_CAP_REVISION_2, effective


@pytest.mark.root
@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_file_capabilities_survive_the_owner_change(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """The kernel drops security.capability on chown: a file owned by another user lost it on a
    fresh copy (xattrs were set before the owner), and an up-to-date file whose owner changed
    lost it on the rerun. rsync -aX keeps it in one run."""
    d = daemon_process
    src, dst, args = _ends(d, tmp_path, direction)
    src.mkdir(parents=True, exist_ok=True)
    for name, owner in (("mine", 0), ("theirs", 4242)):
        (src / name).write_text(name)
        os.chown(src / name, owner, owner)
        os.setxattr(src / name, "security.capability", CAP_NET_RAW)
    r = blit(d, "copy", *args)
    assert r.returncode == 0, (r.stdout, r.stderr)
    for name in ("mine", "theirs"):
        assert os.getxattr(dst / name, "security.capability") == CAP_NET_RAW, name
    assert os.stat(dst / "theirs").st_uid == 4242
    os.chown(src / "mine", 200, 200)  # the owner alone changes: the file stays up to date
    os.setxattr(src / "mine", "security.capability", CAP_NET_RAW)
    r = blit(d, "copy", *args)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert os.stat(dst / "mine").st_uid == 200
    assert os.getxattr(dst / "mine", "security.capability") == CAP_NET_RAW


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_an_xattr_name_that_is_not_utf8_lands_as_it_is(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """Linux allows any bytes in an xattr name; the manifest carries such a name as bytes."""
    d = daemon_process
    src, dst, args = _ends(d, tmp_path, direction)
    src.mkdir()
    (src / "odd").write_text("odd")
    (src / "plain").write_text("plain")
    os.setxattr(src / "odd", b"user.\xff\xfe", b"value")
    os.setxattr(src / "odd", "user.ok", b"v2")
    r = blit(d, "copy", *args)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert {os.fsencode(n) for n in os.listxattr(dst / "odd")} == {b"user.\xff\xfe", b"user.ok"}
    assert os.getxattr(dst / "odd", b"user.\xff\xfe") == b"value"
    assert (dst / "plain").read_text() == "plain"


@pytest.mark.root
@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_a_symlinks_xattrs_land_with_it_and_are_kept_in_line(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """A symlink's trusted.* and security.* xattrs (Linux allows no user.* on a symlink) land
    as rsync -aX and cp -a land them, and a later mirror of the up-to-date link makes the
    destination's equal the source's (one changed, one removed). blit dropped them."""
    d = daemon_process
    src, dst, args = _ends(d, tmp_path, direction)
    src.mkdir()
    (src / "f").write_text("f")
    os.symlink("f", src / "l")
    os.symlink("nowhere", src / "dangling")
    for name, value in ((b"trusted.one", b"1"), (b"security.two", b"2")):
        os.setxattr(src / "l", name, value, follow_symlinks=False)
    os.setxattr(src / "dangling", b"trusted.d", b"d", follow_symlinks=False)

    def xattrs(p: Path) -> dict[bytes, bytes]:
        return {os.fsencode(n): os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}

    r = blit(d, "copy", *args)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert xattrs(dst / "l") == {b"trusted.one": b"1", b"security.two": b"2"}
    assert xattrs(dst / "dangling") == {b"trusted.d": b"d"}
    assert os.readlink(dst / "l") == "f" and os.readlink(dst / "dangling") == "nowhere"
    os.setxattr(src / "l", b"trusted.one", b"changed", follow_symlinks=False)
    os.removexattr(src / "l", b"security.two", follow_symlinks=False)
    os.setxattr(dst / "dangling", b"trusted.extra", b"x", follow_symlinks=False)
    r = blit(d, "mirror", *args)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert xattrs(dst / "l") == {b"trusted.one": b"changed"}
    assert xattrs(dst / "dangling") == {b"trusted.d": b"d"}


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_time_beyond_2262_is_reported_and_never_wrapped(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    d = daemon_process
    src, dst, args = _ends(d, tmp_path, direction)
    src.mkdir()
    (src / "far").write_text("far")
    (src / "ok").write_text("ok")
    far = (2300 - 1970) * 365 * 86400 * 10**9
    os.utime(src / "far", ns=(far, far))
    for _ in range(2):
        r = blit(d, "copy", *args)
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert errors(r) == ["blit: far: stat: its time is outside the years 1677-2262, which blit cannot keep"], r.stderr
        assert sorted(os.listdir(dst)) == ["ok"]


@pytest.mark.parametrize("filtered", [False, True], ids=["plain", "filtered"])
@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_a_runs_temporaries_in_the_source_are_never_sent(daemon_process: DaemonProcess, tmp_path: Path, direction: str, filtered: bool) -> None:
    """A `.blit-*.tmp` entry in a source is another run's hidden directory (or file) in flight,
    or one an interrupted run left: it is not part of the tree, so it is not copied (a pull
    during a push into the same tree got half-filled ones, and left them behind)."""
    d = daemon_process
    src, dst, args = _ends(d, tmp_path, direction)
    (src / ".blit-0123456789abcdef.tmp").mkdir(parents=True)
    (src / ".blit-0123456789abcdef.tmp" / "f").write_text("in flight")
    (src / ".blit-fedcba9876543210.tmp").write_text("a file in flight")
    (src / "a").write_text("a")
    if filtered:
        args += ["--exclude", "*.nothing"]
    for expect in ("copied 1 file ", "copied 0 files"):
        r = blit(d, "copy", *args)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert r.stdout.startswith(expect), r.stdout
        assert sorted(os.listdir(dst)) == ["a"]


@pytest.mark.parametrize("what", ["dir", "dir contents", "file"])
def test_a_push_whose_source_root_cannot_be_read_is_one_line(nobody_tmp: Path, tmp_path: Path, what: str) -> None:
    """As locally (test_unreadable_source_root_is_fatal): exit 1, one line, nothing sent."""
    src = nobody_tmp / "src"
    src.mkdir()
    (src / "a").write_text("a")
    chown_tree(src, NOBODY, NOBODY)
    if what == "file":
        os.chmod(src / "a", 0o000)
        arg = str(src / "a")
    else:
        os.chmod(src, 0o000)
        arg = str(src) + ("/" if what == "dir contents" else "")
    with run_daemon_process(tmp_path, tls=False) as d:
        env = {**d.env, "HOME": str(nobody_tmp / "home")}
        r = blit(d, "copy", "--no-tls", arg, url(d, "data/out"), as_nobody=True, env=env)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert errors(r) == [f"blit: error: cannot read source {arg}: Permission denied"], r.stderr
        assert "Traceback" not in r.stderr
        assert os.listdir(d.modules["data"]) == []


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_json_progress_of_a_remote_run(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    d = daemon_process
    local = tmp_path / "local"
    remote = d.modules["data"] / "big"
    src = local if direction == "push" else remote
    src.mkdir()
    total = 0
    for i in range(16):  # 512 MiB: 256 MiB took 0.21 s with sealed streams (R67), 1 progress event
        data = os.urandom(MiB) * 32  # 32 MiB each
        (src / f"f{i}").write_bytes(data)
        total += len(data)
    a, b = (f"{local}/", url(d, "data/big2/")) if direction == "push" else (url(d, "data/big/"), f"{tmp_path}/out/")
    r = blit(d, "copy", "--json", a, b)
    assert r.returncode == 0, (r.stdout, r.stderr)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "summary"
    summary = events[-1]
    assert (summary["files_copied"], summary["bytes_copied"]) == (16, total)
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) >= 2, f"{len(progress)} progress events in {summary['duration_s']} s"
    sizes = [e["bytes_done"] for e in progress]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] <= total, sizes
    assert all(e["files_done"] <= 16 for e in progress)
    times = [e["elapsed_s"] for e in progress]
    assert all(b - a >= 0.099 for a, b in zip(times, times[1:])), times  # at most 10 per second
    # Once every directory is planned the bytes to move are known (an ETA); entries are not.
    known = [e for e in progress if e["bytes_total"] is not None]
    assert known and all(e["bytes_total"] == total and e["files_total"] is None for e in known), progress
    assert progress.index(known[0]) + len(known) == len(progress)  # once known, always given


def _linked_abc(root: Path) -> Path:
    """a/x, b/y and c/z: one inode; a plain file beside each; all nobody's."""
    for d, f in (("a", "pa"), ("b", "pb"), ("c", "pc")):
        (root / d).mkdir(parents=True)
        (root / d / f).write_text(d)
    (root / "a" / "x").write_text("one inode, three names\n")
    os.link(root / "a" / "x", root / "b" / "y")
    os.link(root / "a" / "x", root / "c" / "z")
    chown_tree(root, NOBODY, NOBODY)
    return root


MEMBERS = ("a/x", "b/y", "c/z")


def _member_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    return sorted(ln for ln in errors(r) if ln.split(":")[1].strip() in MEMBERS)


@pytest.mark.root
def test_push_reports_every_member_of_a_hard_link_group_it_cannot_read(nobody_tmp: Path, tmp_path: Path) -> None:
    src = _linked_abc(nobody_tmp / "src")
    os.chmod(src / "a" / "x", 0)
    with run_daemon_process(tmp_path, tls=False) as d:
        env = {**d.env, "HOME": str(nobody_tmp / "home")}
        r = blit(d, "copy", "--no-tls", f"{src}/", url(d, "data/out"), as_nobody=True, env=env)
        assert r.returncode == 3, (r.stdout, r.stderr)
        lines = _member_lines(r)
        assert [ln.split(":")[1].strip() for ln in lines] == list(MEMBERS), r.stderr
        out = d.modules["data"] / "out"
        assert sorted(p for p in MEMBERS if os.path.lexists(out / p)) == []
        assert sorted(str(p.relative_to(out)) for p in out.rglob("p*")) == ["a/pa", "b/pb", "c/pc"]


@pytest.mark.root
def test_pull_lands_or_reports_each_member_of_a_hard_link_group(nobody_tmp: Path, tmp_path: Path) -> None:
    """The destination cannot take c/z. Every member either lands, linked to the other members
    that landed, or is reported by name (exit 3): none is left out silently."""
    with run_daemon_process(tmp_path, tls=False) as d:
        _linked_abc(d.modules["data"] / "tree")
        env = {**d.env, "HOME": str(nobody_tmp / "home")}
        for trial in range(3):  # which member lands first varies with the order of the walk
            dst = nobody_tmp / f"dst{trial}"
            for sub in "abc":
                (dst / sub).mkdir(parents=True)
            chown_tree(dst, NOBODY, NOBODY)
            os.chown(dst / "c", 0, 0)
            r = blit(d, "copy", "--no-tls", url(d, "data/tree/"), str(dst), as_nobody=True, env=env)
            assert r.returncode == 3, (r.stdout, r.stderr)
            reported = {ln.split(":")[1].strip() for ln in _member_lines(r)}
            landed = {p: os.stat(dst / p).st_ino for p in MEMBERS if os.path.lexists(dst / p)}
            assert "c/z" in reported and "c/z" not in landed, r.stderr
            assert reported | set(landed) == set(MEMBERS), (landed, r.stderr)
            assert not reported & set(landed), (landed, r.stderr)
            if landed:
                assert len(set(landed.values())) == 1, f"landed as separate files: {landed}"
                assert os.stat(dst / next(iter(landed))).st_nlink == len(landed)


@pytest.mark.parametrize("where", ["local", "push", "pull"])
def test_src_without_a_slash_reads_nothing_else_of_its_parent(daemon_process: DaemonProcess, tmp_path: Path, where: str) -> None:
    """`blit mirror par/src DST`: par's other entries are no part of the run. A sibling whose
    time blit cannot keep failed the run (exit 3) and stopped mirror's deletions (QA, every
    topology); so did `blit copy par/file DST`."""
    d = daemon_process
    local = tmp_path / "local"
    par = (d.modules["data"] if where == "pull" else local) / "par"
    (par / "src" / "d").mkdir(parents=True)
    (par / "src" / "a").write_text("a")
    (par / "src" / "d" / "b").write_text("b")
    (par / "file1").write_text("1")
    (par / "sibling").touch()
    os.utime(par / "sibling", ns=(0, 10_413_792_000 * 10**9))  # the year 2300
    dst_root = d.modules["data"] / "out" if where == "push" else local / "out"
    (dst_root / "src").mkdir(parents=True)
    (dst_root / "src" / "extra").write_text("x")

    def end(p: str) -> str:
        return url(d, f"data/{p}") if where != "local" else str(local / p)

    src = url(d, "data/par/src") if where == "pull" else str(par / "src")
    one = url(d, "data/par/file1") if where == "pull" else str(par / "file1")
    r = blit(d, "mirror", src, end("out") if where == "push" else str(dst_root))
    assert (r.returncode, errors(r)) == (0, []), r.stderr
    assert sorted(os.listdir(dst_root / "src")) == ["a", "d"]
    r = blit(d, "copy", one, end("out/one") if where == "push" else str(dst_root / "one"))
    assert (r.returncode, errors(r)) == (0, []), r.stderr
    assert (dst_root / "one").read_text() == "1"


@pytest.mark.root
def test_unprivileged_pull_skips_each_name_of_a_device(nobody_tmp: Path, tmp_path: Path) -> None:
    """A pull by a plain user: every name of a device node, one of a hard-linked pair too, is
    skipped with the words a local copy uses (exit 3); the rest lands."""
    with run_daemon_process(tmp_path, tls=False) as d:
        src = d.modules["data"] / "devs"
        src.mkdir()
        os.mknod(src / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(src / "zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
        os.link(src / "zero", src / "zero2")
        (src / "f").write_text("f")
        env = {**d.env, "HOME": str(nobody_tmp / "home")}
        dst = nobody_tmp / "dst"
        r = blit(d, "copy", "--no-tls", url(d, "data/devs/"), str(dst), as_nobody=True, env=env)
        assert r.returncode == 3, (r.stdout, r.stderr)
        skipped = ": skipped: device nodes are recreated only as root"
        assert sorted(errors(r)) == sorted(f"blit: {n}{skipped}" for n in ("null", "zero", "zero2")), r.stderr
        assert sorted(os.listdir(dst)) == ["f"]


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_closed_stdout_stops_a_remote_run_with_one_line(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """`blit copy -v ... | head`: once the reader is gone the run stops with one line and exit 1,
    the daemon's side lands nothing partial or temporary, and a rerun completes."""
    d = daemon_process
    local = tmp_path / "local"
    remote = d.modules["data"]
    src_root, dst_root = (local, remote) if direction == "push" else (remote, local)
    src = src_root / "bp_src"
    for i in range(3000):
        (src / f"d{i // 300}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i // 300}" / f"file{i:05d}").write_bytes(b"%d" % i * 50)
    dst = dst_root / "bp_dst"
    a, b = (f"{src}/", url(d, "data/bp_dst/")) if direction == "push" else (url(d, "data/bp_src/"), f"{dst}/")
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([*blit_cmd(), "copy", "-v", a, b], stdout=w, stderr=subprocess.PIPE, text=True,
                              env=d.env, timeout=120)  # fmt: skip
    finally:
        os.close(w)
    assert proc.returncode == 1, proc.stderr
    # (Action lines of a remote run come in pages, so the data may all have landed by the time
    # the first page fails to print: how much landed is not asserted, only that it is whole,
    # and the line says which it was.)
    assert errors(proc) in (["blit: error: standard output was closed (broken pipe); stopped, run the same "
                             "command again to finish"],
                            ["blit: error: standard output was closed (broken pipe) before the run's last lines "
                             "were written; the copy itself completed"]), proc.stderr  # fmt: skip
    # A pushing client exits before the daemon has torn the session down; new directories
    # still hidden then (R41) move into place as it does.
    assert temporaries_after_settling(dst) == []
    landed = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()} if dst.exists() else {}
    for rel, data in landed.items():
        assert data == (src / rel).read_bytes(), rel
    again = blit(d, "copy", a, b)
    assert again.returncode == 0, again.stderr
    assert sorted(p.relative_to(dst) for p in dst.rglob("*") if p.is_file()) == sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())


@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_verbose_deletions_name_what_went_when_a_directory_is_kept(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """A directory that holds excluded entries stays (mirror keeps them, as rsync does): the
    entries that went inside it get their own `delete` lines, the directory none (it was
    listed as deleted, and what went was never named). The same in the dry run; a directory
    replaced by a file likewise. rsync: `deleting z/w/o2`, `deleting z/w/`, `deleting z/other`."""
    d = daemon_process
    src, dst, args = _ends(d, tmp_path, direction)
    src.mkdir()
    (src / "f").write_text("f")
    (src / "x").write_text("a file where the destination has a directory")
    for p in ("z/keep.o", "z/other", "z/w/o2", "gone/a", "x/keep.o", "x/other"):
        (dst / p).parent.mkdir(parents=True, exist_ok=True)
        (dst / p).write_text(p)
    out = {}
    for run in ("-n", "real"):
        r = blit(d, "mirror", "-v", "--exclude", "*.o", *([run] if run == "-n" else []), *args)
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert errors(r) == ["blit: x: replace: directory holds excluded entries, which mirror keeps"], r.stderr
        out[run] = sorted(ln for ln in r.stdout.splitlines() if ln.startswith("delete "))
    assert out["-n"] == out["real"] == ["delete gone", "delete x/other", "delete z/other", "delete z/w"], out
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == ["f", "x", "x/keep.o", "z", "z/keep.o"]


@pytest.mark.root
@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_verbose_lines_name_only_what_was_done(daemon_process: DaemonProcess, nobody_tmp: Path, direction: str) -> None:
    """A file that could not be read is no `copy` line, an extra that could not be deleted no
    `delete` line (the local engine printed both next to their failures)."""
    d = daemon_process
    src, dst = nobody_tmp / "src", nobody_tmp / "dst"
    for p in ("ok", "locked", "sub/ok2"):
        (src / p).parent.mkdir(parents=True, exist_ok=True)
        (src / p).write_text(p)
    (dst / "stuck" / "inner").mkdir(parents=True)
    (dst / "stuck" / "inner" / "f").write_text("f")
    chown_tree(src, NOBODY, NOBODY)
    chown_tree(dst, NOBODY, NOBODY)
    os.chmod(src / "locked", 0)
    os.chown(dst / "stuck" / "inner", 0, 0)  # root's: nobody cannot remove its file
    env = {**d.env, "HOME": str(nobody_tmp / "home")}
    if direction == "local":
        r = blit(d, "mirror", "-v", f"{src}/", f"{dst}/", as_nobody=True, env=env)
    else:  # the nobody side reads (push) or writes (pull); the daemon (root) the other
        far = d.modules["data"] / "far"
        shutil.copytree(src if direction == "pull" else dst, far, symlinks=True)
        if direction == "push":
            r = blit(d, "mirror", "-v", f"{src}/", url(d, "data/far/"), as_nobody=True, env=env)
        else:
            os.chmod(far / "locked", 0o644)
            r = blit(d, "mirror", "-v", url(d, "data/far/"), f"{dst}/", as_nobody=True, env=env)
    if direction != "pull":
        assert "copy locked" not in r.stdout.splitlines(), r.stdout
        assert "blit: locked: copy: Permission denied" in errors(r), r.stderr
    if direction != "push":
        assert not [ln for ln in r.stdout.splitlines() if ln.startswith("delete stuck")], r.stdout
        assert [e for e in errors(r) if e.startswith("blit: stuck")], r.stderr
    assert "copy ok" in r.stdout.splitlines() and "copy sub/ok2" in r.stdout.splitlines(), r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_ctrl_c_stops_a_mirrors_deletions(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """SIGINT once the deletions have begun: the run stops within about a second (exit 130)
    and what it had not deleted yet stays, also on the daemon after its client went. Before,
    a local run deleted everything and exited 0, a pull deleted everything before stopping,
    and a push's daemon went on deleting after its client had said it stopped."""
    import signal
    import time

    d = daemon_process
    src, dst, args = _ends(d, tmp_path, direction)
    src.mkdir()
    (src / "keep").write_text("keep")
    dst.mkdir()
    n_dirs, per_dir = 80, 300
    for i in range(n_dirs):
        (dst / f"x{i:03d}").mkdir()
        for j in range(per_dir):
            (dst / f"x{i:03d}" / f"f{j}").write_bytes(b"")
    proc = subprocess.Popen([*blit_cmd(), "mirror", *args], env=d.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while sum(x.startswith("x") for x in os.listdir(dst)) == n_dirs and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert took < 2.0, took
    time.sleep(1.0)  # a daemon that went on deleting would be seen now
    left = sum(len(os.listdir(dst / x)) for x in os.listdir(dst) if x.startswith("x"))
    assert left > n_dirs * per_dir // 4, f"only {left} of {n_dirs * per_dir} extras left"


@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_a_directory_landed_as_a_new_destination_names_the_command_that_finishes_it(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """`blit copy dir new` lands dir as new; once new exists, the same command copies into
    new/dir (cp's rule, SPEC), so 'run the same command again' after a partial run nested a
    second copy. A run that ends with failures (or is interrupted) names the command that
    finishes it, and that command converges."""
    d = daemon_process
    if direction == "pull":
        src, dst = d.modules["data"] / "tree", tmp_path / "new"
        s_arg, d_arg = url(d, "data/tree"), str(dst)
    else:
        src = tmp_path / "tree"
        dst = d.modules["data"] / "new" if direction == "push" else tmp_path / "new"
        s_arg, d_arg = str(src), url(d, "data/new") if direction == "push" else str(dst)
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "ok").write_text("ok")
    (src / "late").write_text("late")
    far = (2300 - 1970) * 365 * 86400 * 10**9
    os.utime(src / "late", ns=(far, far))  # a per-entry failure: exit 3
    r = blit(d, "copy", s_arg, d_arg)
    assert r.returncode == 3, (r.stdout, r.stderr)
    hint = [e for e in errors(r) if "was made by this run" in e]
    assert hint == [f"blit: {d_arg} was made by this run: finish with blit copy {s_arg}/ {d_arg}/ (run as it was, the command would copy into a new directory inside it)"], r.stderr
    os.utime(src / "late", ns=(10**18, 10**18))
    r = blit(d, "copy", f"{s_arg}/", f"{d_arg}/")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == ["late", "sub", "sub/ok"]


@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_an_up_to_date_file_with_other_names_is_replaced_not_changed_in_place(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """The destination's f is a hard link to a file elsewhere (for a daemon: outside its
    module); the source's f has the same size and mtime but another mode. Fixing the mode in
    place made the other name 4777 too (an anonymous push could chmod and chown a file outside
    the module). f is now landed anew: the other name keeps its mode and content."""
    d = daemon_process
    src, dst, args = _ends(d, tmp_path, direction)
    src.mkdir()
    dst.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("same size")
    os.chmod(outside / "secret", 0o600)
    os.link(outside / "secret", dst / "f")
    (src / "f").write_text("SAME SIZE")
    os.chmod(src / "f", 0o4777)
    t = os.stat(outside / "secret").st_mtime_ns
    os.utime(src / "f", ns=(t, t))
    r = blit(d, "copy", *args)
    assert r.returncode == 0, (r.stdout, r.stderr)
    st = os.stat(outside / "secret")
    assert (oct(st.st_mode & 0o7777), (outside / "secret").read_text()) == ("0o600", "same size")
    got = os.stat(dst / "f")
    assert (oct(got.st_mode & 0o7777), got.st_nlink, (dst / "f").read_text()) == ("0o4777", 1, "SAME SIZE")


@pytest.mark.parametrize("direction", ["local", "push"])
def test_an_xattr_too_large_for_the_destination_fails_its_file_only(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """tmpfs keeps a 60 KiB xattr value, ext4 (one 4 KiB block) cannot: setxattr says ENOSPC.
    That was taken for a full disk: the run stopped there (exit 1) every time, the rest never
    landed. Now it fails that file (exit 3) and the rest lands."""
    import shutil as _shutil
    import tempfile

    if os.statvfs("/dev/shm").f_fsid == os.statvfs(tmp_path).f_fsid:
        pytest.skip("needs /dev/shm (tmpfs) and the test directory on different filesystems")
    d = daemon_process
    shm = Path(tempfile.mkdtemp(prefix="blit-test-xattr-", dir="/dev/shm"))
    try:
        src = shm / "src"
        (src / "sub").mkdir(parents=True)
        (src / "big").write_text("big")
        (src / "sub" / "s").write_text("s")
        (src / "ok").write_text("ok")
        try:
            os.setxattr(src / "big", "user.big", os.urandom(60_000))
        except OSError:
            pytest.skip("this tmpfs keeps no 60 KiB user xattr")
        dst = tmp_path / "dst" if direction == "local" else d.modules["data"] / "dst"
        r = blit(d, "copy", f"{src}/", str(dst) if direction == "local" else url(d, "data/dst"))
        if r.returncode == 0:
            pytest.skip("the destination filesystem kept a 60 KiB xattr")
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert errors(r) == ["blit: big: copy: setting xattr user.big: No space left on device"], r.stderr
        assert (dst / "ok").read_text() == "ok" and (dst / "sub" / "s").read_text() == "s"
        assert not (dst / "big").exists()
    finally:
        _shutil.rmtree(shm)


@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_the_top_directorys_xattrs_are_kept_in_line_on_reruns(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """`SRC/ DST/` with DST there already and nothing else changed: the top directory's mode,
    owner and times were repaired, its xattrs (and ACLs) never: one added at the source or
    left over at the destination stayed as it was (rsync -aX applies them)."""
    d = daemon_process
    src, dst, args = _ends(d, tmp_path, direction)
    src.mkdir()
    (src / "f").write_text("f")
    r = blit(d, "copy", *args)
    assert r.returncode == 0, (r.stdout, r.stderr)
    os.setxattr(src, "user.k", b"v")
    os.setxattr(dst, "user.stale", b"only here")
    r = blit(d, "mirror", *args)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert {n: os.getxattr(dst, n) for n in os.listxattr(dst)} == {"user.k": b"v"}


@pytest.fixture
def whole_seconds_fs(tmp_path: Path) -> Iterator[Path]:
    """A small ext4 with 128-byte inodes, which keeps file times in whole seconds, loop-mounted
    (root only), unmounted and removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    img, mnt = tmp_path / "img", tmp_path / "mnt"
    subprocess.run(["truncate", "-s", "16M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-I", "128", str(img)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.root
@pytest.mark.parametrize("direction", ["local", "pull"])
def test_a_destination_that_keeps_whole_seconds_does_not_copy_again(daemon_process: DaemonProcess, tmp_path: Path, whole_seconds_fs: Path, direction: str) -> None:
    """SPEC: skipped when size and mtime match 'to the precision both filesystems keep'. On a
    filesystem that cuts times to seconds every file was copied again on every run (rsync
    skips them); a file changed in content and time still is copied. Hard-link groups too
    (their first member was compared to the nanosecond)."""
    d = daemon_process
    src = tmp_path / "src" if direction == "local" else d.modules["data"] / "src"
    src.mkdir()
    for name in ("a", "b", "h"):
        (src / name).write_text(name)
        os.utime(src / name, ns=(981_173_106_999_999_999, 981_173_106_999_999_999))
    os.link(src / "h", src / "h2")
    dst = whole_seconds_fs / "dst"
    s_arg = f"{src}/" if direction == "local" else url(d, "data/src/")
    r = blit(d, "copy", "--json", s_arg, f"{dst}/")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert os.stat(dst / "a").st_mtime_ns == 981_173_106_000_000_000  # cut to the second
    r = blit(d, "copy", "--json", s_arg, f"{dst}/")
    assert r.returncode == 0, (r.stdout, r.stderr)
    summary = json.loads(r.stdout.splitlines()[-1])
    assert (summary["files_copied"], summary["files_skipped"], summary["links_created"]) == (0, 4, 0), summary
    (src / "b").write_text("B")
    os.utime(src / "b", ns=(981_173_107_500_000_000, 981_173_107_500_000_000))
    r = blit(d, "copy", "--json", s_arg, f"{dst}/")
    summary = json.loads(r.stdout.splitlines()[-1])
    assert (summary["files_copied"], summary["files_skipped"]) == (1, 3), summary
    assert os.stat(dst / "h").st_ino == os.stat(dst / "h2").st_ino
    assert (dst / "b").read_text() == "B"


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_remote_mirror_deletes_what_it_can_around_an_immutable_entry(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    """As locally: an immutable file in a tree to delete is one failure naming it (not `xd:
    Not a directory`), the rest goes and is counted; a tree 1,200 levels deep goes too (it
    ended in RecursionError)."""
    d = daemon_process
    src = (tmp_path / "src") if direction == "push" else d.modules["data"] / "src"
    dst = (d.modules["data"] / "dst") if direction == "push" else tmp_path / "dst"
    src.mkdir()
    (dst / "xd" / "deeper").mkdir(parents=True)
    for name in ("a", "imm", "z", "deeper/e"):
        (dst / "xd" / name).write_text(name)
    deep = dst / "deep"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY)
    for _ in range(1200):
        os.mkdir("x", dir_fd=fd)
        nfd = os.open("x", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    subprocess.run(["chattr", "+i", dst / "xd" / "imm"], check=True)
    try:
        args = [f"{src}/", url(d, "data/dst/")] if direction == "push" else [url(d, "data/src/"), f"{dst}/"]
        r = blit(d, "mirror", *args)
    finally:
        subprocess.run(["chattr", "-i", dst / "xd" / "imm"], check=True)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert errors(r) == ["blit: xd/imm: delete: Operation not permitted"], r.stderr
    assert "deleted 1,205," in r.stdout, r.stdout
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == ["xd", "xd/imm"]


@pytest.mark.root
@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_destination_in_a_bind_mount_of_a_source_subdirectory_is_not_copied_into_itself(
    daemon_process: DaemonProcess, tmp_path: Path, direction: str
) -> None:
    """The destination is inside a bind mount of a subdirectory of the source: no walk up from
    it meets the source, and the copy nested until killed. The destination side, on the
    source's machine, leaves out the source directory that is the one it lands in (R52)."""
    d = daemon_process
    src = tmp_path / "src" if direction == "push" else d.modules["data"] / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "f").write_text("f")
    (src / "d" / "g").write_text("g")
    where = d.modules["data"] if direction == "push" else tmp_path / "bnd"
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(src / "d"), str(where)], check=True)
    try:
        args = [f"{src}", url(d, "data/")] if direction == "push" else [url(d, "data/src"), f"{where}/"]
        r = blit(d, "copy", *args)
    finally:
        subprocess.run(["umount", str(where)], check=False)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert errors(r) == ["blit: src/d/src: copy: it is the destination, by another path (a bind mount): not copied into itself"], r.stderr
    landed = src / "d" / "src"
    assert (landed / "f").read_text() == "f" and (landed / "d" / "g").read_text() == "g"
    assert not (landed / "d" / "src").exists()

"""The file system fails under a push, a pull or a remote to remote run through real `blit
daemon` processes on 127.0.0.1 (the cases of test_local_fsfail.py, which a run through a daemon
must answer the same way): a source file or directory that cannot be read (the side that reads
it runs as nobody), a destination that fills up (a small tmpfs under the module, or under the
client's destination), a destination directory nobody may write, a source file that changes
size while it is sent. Checked: the exit code, the lines on stderr, the tree that lands, no
temporary left, and a rerun that finishes the job. Cleartext daemons: TLS is not the point."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    AS_NOBODY,
    LOCKED_LINES,
    NOBODY,
    assert_changed_file_outcome,
    assert_json_fatal,
    assert_nothing_partial,
    assert_same_tree,
    change_mid_transfer,
    chown_tree,
    describe_output,
    full_disk_source,
    grow_tmpfs,
    lock_tree,
    locked_source,
    make_big,
    make_tree,
    mounted_tmpfs,
    run_blit,
    snapshot,
    stderr_lines,
    write_file,
)

from .conftest import DaemonProcess, run_daemon_process

MiB = 1 << 20


def url(d: DaemonProcess, path: str) -> str:
    return f"127.0.0.1:{d.port}:/{path}"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A cleartext daemon running as root."""
    with run_daemon_process(tmp_path / "daemon", tls=False) as d:
        yield d


@pytest.fixture
def nobody_daemon(nobody_tmp: Path) -> Iterator[DaemonProcess]:
    """A cleartext daemon running as nobody, its modules nobody's."""
    where = nobody_tmp / "daemon"
    where.mkdir()
    os.chown(where, NOBODY, NOBODY)
    with run_daemon_process(where, tls=False, prefix=tuple(AS_NOBODY)) as d:
        for m in d.modules.values():
            os.chown(m, NOBODY, NOBODY)
        yield d


def _mirror_args(direction: str, d: DaemonProcess, src: Path, dst: Path) -> list[str]:
    """The arguments of a run from src to dst: local, push into the daemon's data/dst, or pull
    from its data/src (cleartext)."""
    return {
        "local": [f"{src}/", f"{dst}/"],
        "push": ["--no-tls", f"{src}/", url(d, "data/dst/")],
        "pull": ["--no-tls", url(d, "data/src/"), f"{dst}/"],
    }[direction]


def blit_lines(proc) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(ln for ln in stderr_lines(proc) if ln.startswith("blit:") and not ln.startswith("blit: pinned the TLS certificate of"))


# --- a source that cannot be read -------------------------------------------------------------


def _check_unreadable_runs(src: Path, dst: Path, run) -> None:  # type: ignore[no-untyped-def]
    """copy twice (the second meets what the first made), mirror over extras, then a copy once
    the source is readable again: the tree lands whole."""
    for attempt in range(2):
        proc = run("copy")
        assert proc.returncode == 3, describe_output(proc)
        assert blit_lines(proc) == LOCKED_LINES, describe_output(proc)
        out = proc.stdout.decode()
        assert out.startswith(f"copied {2 if attempt == 0 else 0} files") and ", 2 failed in " in out, out
        assert (dst / "ok.txt").read_bytes() == b"ok\n" and (dst / "sub/b.txt").read_bytes() == b"b\n"
        assert not os.path.lexists(dst / "secret.txt") and os.listdir(dst / "locked") == []
    write_file(dst / "extra.txt", b"only here\n")
    write_file(dst / "extras/a.txt", b"only here\n")  # kept: the directory and all 3 below it
    write_file(dst / "extras/deep/b.txt", b"only here\n")
    write_file(dst / "locked/stale.txt", b"only here\n")
    chown_tree(dst, NOBODY, NOBODY)
    proc = run("mirror")
    assert proc.returncode == 3, describe_output(proc)
    lines = blit_lines(proc)
    assert [ln for ln in lines if "mirror" not in ln] == LOCKED_LINES, describe_output(proc)
    # The same count as a local run's: the top's extra; locked/ was not read, so what it holds
    # is not counted as extras (push and pull counted them).
    # As many as the complete run deletes: every entry below an extra directory counts.
    assert "blit: mirror deleted nothing: 1 source directory could not be read completely (5 destination entries kept)" in lines, lines
    assert (dst / "extra.txt").exists() and (dst / "locked/stale.txt").exists()
    assert (dst / "extras/deep/b.txt").exists()
    os.unlink(dst / "extra.txt")
    shutil.rmtree(dst / "extras")
    os.unlink(dst / "locked/stale.txt")
    lock_tree(src, False)
    proc = run("copy")
    assert proc.returncode == 0, describe_output(proc)
    assert_same_tree(src, dst)


@pytest.mark.root
def test_push_by_nobody_reports_what_it_cannot_read(daemon: DaemonProcess, nobody_tmp: Path) -> None:
    src = locked_source(nobody_tmp / "src")
    dst = daemon.modules["data"] / "dst"
    _check_unreadable_runs(
        src, dst, lambda op: run_blit(op, "--no-tls", f"{src}/", url(daemon, "data/dst"), as_nobody=True)
    )


@pytest.mark.root
def test_pull_from_a_daemon_that_cannot_read_everything(nobody_daemon: DaemonProcess, nobody_tmp: Path) -> None:
    """The client runs as nobody too: what it made for locked/ must stay open to it."""
    src = locked_source(nobody_daemon.modules["data"] / "src")
    dst = nobody_tmp / "dst"
    _check_unreadable_runs(
        src, dst, lambda op: run_blit(op, "--no-tls", url(nobody_daemon, "data/src/"), dst, as_nobody=True)
    )


# --- a destination that fills up ----------------------------------------------------------------


def _files_under(root: Path) -> int:
    return sum(1 for _, _, names in os.walk(root) for n in names) if root.exists() else 0


def _check_full_then_rerun(src: Path, dst: Path, mnt: Path, run, op: str = "copy", counted: bool = False) -> None:  # type: ignore[no-untyped-def]
    """run(op, *options): the same transfer each time. Mirror deletes the destination's extra
    file only on the run that completes. `counted` (a pull): the --json summary of the run the
    full disk stopped counts the files it landed; otherwise (the destination daemon held the
    counts) it has no counts at all, rather than zeros."""
    src_snap = snapshot(src)
    if op == "mirror":
        write_file(dst / "extra.txt", b"only here\n")
    before = _files_under(dst)
    summary = assert_json_fatal(run(op, "--json"), "No space left on device")
    assert summary["operation"] == op and summary["duration_s"] > 0, summary
    if counted:
        landed = _files_under(dst) - before
        assert landed > 0 and summary["files_copied"] == landed, (summary, landed)
        assert summary["bytes_copied"] > 0 and summary["files_deleted"] == 0, summary
    else:
        assert "files_copied" not in summary and "bytes_copied" not in summary, summary
    proc = run(op)
    assert proc.returncode == 1, describe_output(proc)
    lines = blit_lines(proc)
    # One fatal line; a pull, like a local run, also names the files the full disk failed.
    errors = [ln for ln in lines if ln.startswith("blit: error:")]
    assert len(errors) == 1 and errors[0].startswith("blit: error: No space left on device (writing "), describe_output(proc)
    others = [ln for ln in lines if ln not in errors]
    assert all(ln.endswith(": No space left on device") for ln in others), describe_output(proc)
    assert not others or counted, describe_output(proc)
    if op == "mirror":
        assert (dst / "extra.txt").read_bytes() == b"only here\n"
        os.unlink(dst / "extra.txt")
    assert_nothing_partial(src_snap, dst)
    if op == "mirror":
        write_file(dst / "extra.txt", b"only here\n")
    grow_tmpfs(mnt, "20m")
    proc = run(op)
    assert proc.returncode == 0, describe_output(proc)
    assert_same_tree(src_snap, snapshot(dst))


@pytest.mark.root
@pytest.mark.parametrize(("op", "small"), [("copy", False), ("mirror", False), ("copy", True)], ids=["copy", "mirror", "small files"])
def test_push_into_a_full_module(daemon: DaemonProcess, tmp_path: Path, op: str, small: bool) -> None:
    src = full_disk_source(tmp_path / "src", small)
    with mounted_tmpfs(daemon.modules["data"] / "full", "3m") as mnt:
        _check_full_then_rerun(
            src, mnt / "dst", mnt, lambda *o: run_blit(*o[:1], "--no-tls", *o[1:], f"{src}/", url(daemon, "data/full/dst")), op
        )


@pytest.mark.root
@pytest.mark.parametrize("small", [False, True], ids=["mixed", "small files"])
def test_pull_into_a_full_disk(daemon: DaemonProcess, tmp_path: Path, small: bool) -> None:
    src = full_disk_source(daemon.modules["data"] / "src", small)
    with mounted_tmpfs(tmp_path / "mnt", "3m") as mnt:
        _check_full_then_rerun(src, mnt / "dst", mnt, lambda *o: run_blit(*o[:1], "--no-tls", *o[1:], url(daemon, "data/src/"), mnt / "dst"), counted=True)


@pytest.mark.root
def test_remote_to_remote_into_a_full_module(tmp_path: Path) -> None:
    with run_daemon_process(tmp_path / "A", tls=False) as a, run_daemon_process(tmp_path / "B", tls=False, peer_pull=True) as b:
        src = full_disk_source(a.modules["data"] / "src")
        with mounted_tmpfs(b.modules["data"] / "full", "3m") as mnt:
            _check_full_then_rerun(
                src, mnt / "dst", mnt, lambda *o: run_blit(*o[:1], "--no-tls", *o[1:], url(a, "data/src/"), url(b, "data/full/dst"))
            )


# --- a destination directory nobody may write ------------------------------------------------

CLOSED_LINES = [
    "blit: .: directory metadata: Operation not permitted",
    "blit: a.txt: copy: Permission denied",
    "blit: sub: mkdir: Permission denied",
]


def _closed_source(root: Path) -> Path:
    src = make_tree(root, {"a.txt": "a\n", "sub/": {"b.bin": os.urandom(5 * MiB)}})
    chown_tree(src, NOBODY, NOBODY)
    return src


@pytest.mark.root
def test_push_into_a_directory_the_daemon_may_not_write(nobody_daemon: DaemonProcess, nobody_tmp: Path) -> None:
    src = _closed_source(nobody_tmp / "src")
    closed = nobody_daemon.modules["data"] / "closed"
    closed.mkdir(mode=0o555)  # root's
    proc = run_blit("copy", "--no-tls", f"{src}/", url(nobody_daemon, "data/closed"))
    assert proc.returncode == 3, describe_output(proc)
    assert blit_lines(proc) == CLOSED_LINES, describe_output(proc)
    proc = run_blit("copy", "--no-tls", f"{src}/", url(nobody_daemon, "data/closed/new"))
    assert proc.returncode == 1, describe_output(proc)
    assert blit_lines(proc) == ["blit: error: cannot create destination /data/closed/new: Permission denied"], describe_output(proc)
    assert os.listdir(closed) == []


@pytest.mark.root
def test_pull_into_a_directory_the_client_may_not_write(daemon: DaemonProcess, nobody_tmp: Path) -> None:
    _closed_source(daemon.modules["data"] / "src")
    closed = nobody_tmp / "closed"
    closed.mkdir(mode=0o555)  # root's
    proc = run_blit("copy", "--no-tls", url(daemon, "data/src/"), closed, as_nobody=True)
    assert proc.returncode == 3, describe_output(proc)
    assert blit_lines(proc) == CLOSED_LINES, describe_output(proc)
    proc = run_blit("copy", "--no-tls", url(daemon, "data/src/"), closed / "new", as_nobody=True)
    assert proc.returncode == 1, describe_output(proc)
    assert blit_lines(proc) == [f"blit: error: cannot create destination {closed}/new: Permission denied"], describe_output(proc)
    assert os.listdir(closed) == []


def _unopenable_destination(src_root: Path, dst: Path) -> Path:
    """A source with sub/f and an extra at the top of `dst`, whose sub/ (root's, 0700) nobody
    can open: the run must report it (exit 3), and a mirror must delete nothing."""
    src = make_tree(src_root, {"a.txt": "a\n", "sub/": {"f": "f\n"}})
    chown_tree(src, NOBODY, NOBODY)
    dst.mkdir()
    write_file(dst / "extra.txt", b"only here\n")
    chown_tree(dst, NOBODY, NOBODY)
    (dst / "sub").mkdir(mode=0o700)  # root's
    return src


UNOPENABLE_LINES = ["blit: sub: open destination: Permission denied"]


def _check_unopenable(run, dst: Path) -> None:  # type: ignore[no-untyped-def]
    for op in ("copy", "mirror"):
        proc = run(op)
        assert proc.returncode == 3, describe_output(proc)
        lines = blit_lines(proc)
        assert [ln for ln in lines if "mirror" not in ln] == UNOPENABLE_LINES, describe_output(proc)
        if op == "mirror":
            assert any(ln.startswith("blit: mirror deleted nothing: 1 destination directory could not be read") for ln in lines), lines
        assert (dst / "a.txt").read_text() == "a\n" and (dst / "extra.txt").exists()


@pytest.mark.root
def test_push_into_a_subdirectory_the_daemon_cannot_open(nobody_daemon: DaemonProcess, nobody_tmp: Path) -> None:
    """It said 'copied 0 files', exit 0: sub/f never landed and nothing said so."""
    dst = nobody_daemon.modules["data"] / "dst"
    src = _unopenable_destination(nobody_tmp / "src", dst)
    _check_unopenable(lambda op: run_blit(op, "--no-tls", f"{src}/", url(nobody_daemon, "data/dst")), dst)


@pytest.mark.root
def test_pull_into_a_subdirectory_the_client_cannot_open(daemon: DaemonProcess, nobody_tmp: Path) -> None:
    dst = nobody_tmp / "dst"
    _unopenable_destination(daemon.modules["data"] / "src", dst)
    _check_unopenable(lambda op: run_blit(op, "--no-tls", url(daemon, "data/src/"), dst, as_nobody=True), dst)


@pytest.mark.root
def test_local_mirror_into_a_subdirectory_it_cannot_open_deletes_nothing(nobody_tmp: Path) -> None:
    """The local engine deleted the extras (cli.md's failure table: it deletes nothing)."""
    dst = nobody_tmp / "dst"
    src = _unopenable_destination(nobody_tmp / "src", dst)
    _check_unopenable(lambda op: run_blit(op, f"{src}/", dst, as_nobody=True), dst)


# --- a source file that changes size while it is sent --------------------------------------------


@pytest.mark.parametrize("change", ["shrink", "grow"])
def test_push_of_a_file_that_changes_size(daemon: DaemonProcess, tmp_path: Path, change: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_big(src / "big.bin")
    dst = daemon.modules["data"] / "dst"
    proc = change_mid_transfer(["copy", "--no-tls", f"{src}/", url(daemon, "data/dst")], src / "big.bin", change)
    assert_changed_file_outcome(proc, src, dst, change)
    run_blit("copy", "--no-tls", f"{src}/", url(daemon, "data/dst"), check=0)
    assert_same_tree(src, dst)


@pytest.mark.parametrize("change", ["shrink", "grow"])
def test_pull_of_a_file_that_changes_size(daemon: DaemonProcess, tmp_path: Path, change: str) -> None:
    src = daemon.modules["data"] / "src"
    src.mkdir()
    make_big(src / "big.bin")
    dst = tmp_path / "dst"
    argv = ["copy", "--no-tls", url(daemon, "data/src/"), dst]
    proc = change_mid_transfer(argv, src / "big.bin", change, reader=daemon.proc.pid)
    assert_changed_file_outcome(proc, src, dst, change)
    run_blit(*argv, check=0)
    assert_same_tree(src, dst)


# --- a listing with an entry that cannot be examined ----------------------------------------------


@pytest.mark.root
def test_list_names_the_entry_it_cannot_examine(nobody_daemon: DaemonProcess) -> None:
    """A directory the daemon (nobody) may read but not search: its names are known, their
    types and sizes are not. `blit list` ends with one line naming the first such entry and
    exit 1 (it said only 'Permission denied'); a readable listing of the same module works."""
    mod = nobody_daemon.modules["data"]
    d = mod / "noexec"
    d.mkdir()
    write_file(d / "a.txt", b"a\n")
    chown_tree(d, NOBODY, NOBODY)
    os.chmod(d, 0o644)  # read (names), no search (no lstat of them)
    try:
        proc = run_blit("list", "--no-tls", url(nobody_daemon, "data/noexec"))
        assert proc.returncode == 1, describe_output(proc)
        assert stderr_lines(proc) == ["blit: error: cannot examine noexec/a.txt: Permission denied"], describe_output(proc)
        proc = run_blit("list", "--no-tls", url(nobody_daemon, "data"))
        assert proc.returncode == 0, describe_output(proc)
        assert "noexec" in proc.stdout.decode(), describe_output(proc)
    finally:
        os.chmod(d, 0o755)


@pytest.mark.root
@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_read_only_destination_directory_of_ours_takes_new_entries(nobody_daemon: DaemonProcess, nobody_tmp: Path, direction: str) -> None:
    """A 0555 destination directory the writer owns (kept from an earlier run): a local run and
    rsync open it up, land, and put its mode back; through a daemon every new entry in it failed
    with `Permission denied` (exit 3), and a replaced entry too."""
    src_root = nobody_tmp / "src" if direction == "push" else nobody_daemon.modules["data"] / "src"
    dst = nobody_daemon.modules["data"] / "dst" if direction == "push" else nobody_tmp / "dst"
    write_file(src_root / "keep/sub/g", b"g\n")
    write_file(src_root / "keep/newf", b"n\n")
    write_file(src_root / "keep/was_file/x", b"x\n")
    write_file(dst / "keep/was_file", b"a file where a directory comes\n")
    os.chmod(src_root / "keep", 0o555)
    os.chmod(dst / "keep", 0o555)
    chown_tree(src_root, NOBODY, NOBODY)
    chown_tree(dst, NOBODY, NOBODY)
    args = [f"{src_root}/", url(nobody_daemon, "data/dst/")] if direction == "push" else [url(nobody_daemon, "data/src/"), f"{dst}/"]
    try:
        proc = run_blit("copy", "--no-tls", *args, as_nobody=True)
        assert proc.returncode == 0, describe_output(proc)
        assert (dst / "keep/sub/g").read_bytes() == b"g\n" and (dst / "keep/newf").read_bytes() == b"n\n"
        assert (dst / "keep/was_file/x").read_bytes() == b"x\n"
        assert os.stat(dst / "keep").st_mode & 0o777 == 0o555
    finally:
        os.chmod(src_root / "keep", 0o755)
        os.chmod(dst / "keep", 0o755)


@pytest.mark.root
@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_a_destination_directory_of_ours_with_mode_000_is_repaired(nobody_daemon: DaemonProcess, nobody_tmp: Path, direction: str) -> None:
    """dst/d (0000, the writer's own): `open destination: Permission denied` and 'mirror deleted
    nothing' on every run, in every topology; rsync gives it u+rwx, mirrors, and sets the
    source's mode. So does blit now."""
    src = nobody_daemon.modules["data"] / "src" if direction == "pull" else nobody_tmp / "src"
    dst = nobody_daemon.modules["data"] / "dst" if direction == "push" else nobody_tmp / "dst"
    write_file(src / "d/f", b"f\n")
    write_file(dst / "d/x", b"extra\n")
    chown_tree(src, NOBODY, NOBODY)
    chown_tree(dst, NOBODY, NOBODY)
    os.chmod(dst / "d", 0)
    args = _mirror_args(direction, nobody_daemon, src, dst)
    try:
        proc = run_blit("mirror", *args, as_nobody=True)
        assert proc.returncode == 0, describe_output(proc)
        assert os.listdir(dst / "d") == ["f"] and os.stat(dst / "d").st_mode & 0o777 == os.stat(src / "d").st_mode & 0o777
    finally:
        os.chmod(dst / "d", 0o755)


@pytest.mark.root
@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_an_extra_directory_in_a_directory_not_ours_is_emptied_as_rsync_does(nobody_daemon: DaemonProcess, nobody_tmp: Path, direction: str) -> None:
    """dst/keep is root's, its extra xd/ (with files and a subdirectory) is the writer's: rsync
    --delete empties xd and reports only its rmdir; blit kept all of xd (the unlink of xd in a
    parent not ours fails with EACCES before the kernel looks at its kind). rsync, run the same
    way on a twin tree, is the oracle: the same entries remain, one failure line for xd, and
    the same count of deleted entries (blit said `deleted 0` where 3 went). keep/ has the
    source's mode and mtime already: it is no failure that it is not ours (a local run said
    `keep: directory metadata: Operation not permitted`: the fchmod to the mode it has)."""
    import shutil
    import subprocess

    src = nobody_daemon.modules["data"] / "src" if direction == "pull" else nobody_tmp / "src"
    dst = nobody_daemon.modules["data"] / "dst" if direction == "push" else nobody_tmp / "dst"
    twin = nobody_tmp / "twin"
    (src / "keep").mkdir(parents=True)
    for root in (dst, twin):
        write_file(root / "keep/xd/a", b"a\n")
        write_file(root / "keep/xd/sub/b", b"b\n")
    chown_tree(src, NOBODY, NOBODY)
    for root in (dst, twin):
        chown_tree(root, NOBODY, NOBODY)
        os.chown(root / "keep", 0, 0)
        os.utime(root / "keep", ns=(os.stat(src / "keep").st_atime_ns, os.stat(src / "keep").st_mtime_ns))
    try:
        oracle = subprocess.run([*AS_NOBODY, "rsync", "-a", "--delete", "--stats", f"{src}/", f"{twin}/"], capture_output=True, text=True)
        assert oracle.returncode == 23, oracle.stderr
        deleted = next(ln for ln in oracle.stdout.splitlines() if ln.startswith("Number of deleted files:"))
        assert deleted.startswith("Number of deleted files: 3 "), deleted
        args = _mirror_args(direction, nobody_daemon, src, dst)
        proc = run_blit("mirror", *args, as_nobody=True)
        assert proc.returncode == 3, describe_output(proc)
        left = sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
        assert left == sorted(str(p.relative_to(twin)) for p in twin.rglob("*")) == ["keep", "keep/xd"]
        assert blit_lines(proc) == ["blit: keep/xd: delete: Permission denied"], describe_output(proc)
        assert ", deleted 3, " in proc.stdout.decode(), describe_output(proc)
    finally:
        shutil.rmtree(twin, ignore_errors=True)


@pytest.mark.root
@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_a_directory_not_ours_whose_mtime_a_deletion_changed_is_named_in_every_topology(
    nobody_daemon: DaemonProcess, nobody_tmp: Path, direction: str
) -> None:
    """dst/open is root's (mode 777, the source's mode and mtime): mirror deletes the extra file
    in it, which changes its mtime, and only its owner may set that back. A local run said
    so (`open: directory metadata: Operation not permitted`, exit 3); push and pull left the
    mtime changed and said nothing. Now all three say it."""
    src = nobody_daemon.modules["data"] / "src" if direction == "pull" else nobody_tmp / "src"
    dst = nobody_daemon.modules["data"] / "dst" if direction == "push" else nobody_tmp / "dst"
    (src / "open").mkdir(parents=True)
    write_file(src / "open/a", b"a\n")
    write_file(dst / "open/a", b"a\n")
    write_file(dst / "open/extra", b"x\n")
    chown_tree(src, NOBODY, NOBODY)
    chown_tree(dst, NOBODY, NOBODY)
    os.utime(dst / "open/a", ns=(os.stat(src / "open/a").st_atime_ns, os.stat(src / "open/a").st_mtime_ns))
    os.chown(dst / "open", 0, 0)
    for d in (src, dst):
        os.chmod(d / "open", 0o777)
    os.utime(dst / "open", ns=(os.stat(src / "open").st_atime_ns, os.stat(src / "open").st_mtime_ns))
    args = _mirror_args(direction, nobody_daemon, src, dst)
    proc = run_blit("mirror", *args, as_nobody=True)
    assert proc.returncode == 3, describe_output(proc)
    assert blit_lines(proc) == ["blit: open: directory metadata: Operation not permitted"], describe_output(proc)
    assert ", deleted 1, " in proc.stdout.decode(), describe_output(proc)
    assert sorted(os.listdir(dst / "open")) == ["a"]


@pytest.mark.root
@pytest.mark.parametrize("direction", ["local", "push", "pull"])
def test_mirror_deletes_an_extra_in_a_read_only_directory_of_ours_in_every_topology(
    nobody_daemon: DaemonProcess, nobody_tmp: Path, direction: str
) -> None:
    """dst/ro is the writer's own and 0555, like src/ro, with the same mtime; it holds an extra.
    rsync (and a local run) open it up, delete, and put the mode back: exit 0. Push and pull
    failed `ro/extra: delete: Permission denied` (QA). rsync on a twin tree is the oracle."""
    import shutil
    import subprocess

    src = nobody_daemon.modules["data"] / "src" if direction == "pull" else nobody_tmp / "src"
    dst = nobody_daemon.modules["data"] / "dst" if direction == "push" else nobody_tmp / "dst"
    twin = nobody_tmp / "twin"
    write_file(src / "ro/a", b"a\n")
    for root in (dst, twin):
        write_file(root / "ro/a", b"a\n")
        write_file(root / "ro/extra", b"x\n")
    for root in (src, dst, twin):
        chown_tree(root, NOBODY, NOBODY)
    st = os.stat(src / "ro/a")
    for root in (dst, twin):
        os.utime(root / "ro/a", ns=(st.st_atime_ns, st.st_mtime_ns))
    for root in (src, dst, twin):
        os.chmod(root / "ro", 0o555)
    sd = os.stat(src / "ro")
    for root in (dst, twin):
        os.utime(root / "ro", ns=(sd.st_atime_ns, sd.st_mtime_ns))
    try:
        oracle = subprocess.run([*AS_NOBODY, "rsync", "-a", "--delete", f"{src}/", f"{twin}/"], capture_output=True, text=True)
        assert oracle.returncode == 0, oracle.stderr
        args = _mirror_args(direction, nobody_daemon, src, dst)
        proc = run_blit("mirror", *args, as_nobody=True)
        assert proc.returncode == 0, describe_output(proc)
        assert ", deleted 1, " in proc.stdout.decode(), describe_output(proc)
        for root in (dst, twin):
            assert sorted(os.listdir(root / "ro")) == ["a"]
            assert oct(os.stat(root / "ro").st_mode & 0o7777) == "0o555"
        assert os.stat(dst / "ro").st_mtime_ns == sd.st_mtime_ns
    finally:
        for root in (src, dst, twin):
            if (root / "ro").exists():
                os.chmod(root / "ro", 0o755)
        shutil.rmtree(twin, ignore_errors=True)


@pytest.mark.root
@pytest.mark.parametrize("what", ["dir", "dir contents", "file"])
def test_a_pull_whose_source_root_cannot_be_read_is_one_line(nobody_daemon: DaemonProcess, nobody_tmp: Path, what: str) -> None:
    """As locally and on push (test_a_push_whose_source_root_cannot_be_read_is_one_line): a
    named source the daemon cannot read ends the run before anything is made: exit 1, one line.
    (A pull said `blit: src: open: Permission denied` or `blit: a: copy: Permission denied`,
    exit 3 as if the rest had been copied, or `blit: error: src: permission denied`.)"""
    src = nobody_daemon.modules["data"] / "src"
    src.mkdir()
    (src / "a").write_text("a")
    chown_tree(src, NOBODY, NOBODY)
    if what == "file":
        os.chmod(src / "a", 0o000)
        arg = url(nobody_daemon, "data/src/a")
    else:
        os.chmod(src, 0o000)
        arg = url(nobody_daemon, "data/src" + ("/" if what == "dir contents" else ""))
    dst = nobody_tmp / "dst"
    try:
        for op in ("copy", "mirror", "move"):
            r = run_blit(op, "--no-tls", arg, f"{dst}/", as_nobody=True)
            assert r.returncode == 1, describe_output(r)
            assert stderr_lines(r) == [f"blit: error: cannot read source {arg}: Permission denied"], describe_output(r)
            assert not dst.exists()
    finally:
        os.chmod(src, 0o755)
        os.chmod(src / "a", 0o644)
    assert (src / "a").read_text() == "a"

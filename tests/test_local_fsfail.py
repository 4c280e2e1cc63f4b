"""The file system fails under a local run: a source file or directory that cannot be read, a
destination that fills up or cannot be written, a source file that changes size while it is
copied. Each failure is one line naming the path and the reason, the exit code is the
documented one, nothing partial lands under a real name, no temporary stays, and running the
same command again (once the cause is gone) finishes the job. remote/test_fs_failures.py puts
the same cases through a daemon."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import (
    MiB,
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
    LOCKED_LINES,
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

pytestmark = pytest.mark.usefixtures("blit_exe")


@pytest.mark.root
@pytest.mark.parametrize("op", ["copy", "move"])
def test_unreadable_file_and_directory_are_reported_and_a_rerun_finishes(nobody_tmp: Path, op: str) -> None:
    """The second run meets the directory the first one made for locked/: it must not have
    taken locked/'s mode 0 (nobody could not open it then, and the rerun could not finish)."""
    src = locked_source(nobody_tmp / "src")
    lock_tree(src, False)
    want = snapshot(src)
    lock_tree(src)
    dst = nobody_tmp / "dst"
    verb = "moved" if op == "move" else "copied"
    for attempt in range(2):
        proc = run_blit(op, f"{src}/", dst, as_nobody=True)
        assert proc.returncode == 3, describe_output(proc)
        assert sorted(stderr_lines(proc)) == LOCKED_LINES, describe_output(proc)
        out = proc.stdout.decode()
        assert out.startswith(f"{verb} {2 if attempt == 0 else 0} files") and ", 2 failed in " in out, out
        assert (dst / "ok.txt").read_bytes() == b"ok\n" and (dst / "sub/b.txt").read_bytes() == b"b\n"
        assert not os.path.lexists(dst / "secret.txt")
        assert os.listdir(dst / "locked") == []
    lock_tree(src, False)
    proc = run_blit(op, f"{src}/", dst, as_nobody=True)
    assert proc.returncode == 0, describe_output(proc)
    if op == "copy":
        assert_same_tree(src, dst)
    else:
        got = snapshot(dst)
        assert_same_tree({p: e for p, e in want.items() if p != b"."}, {p: e for p, e in got.items() if p != b"."})
        assert os.listdir(src) == []


# --- a destination that fills up ------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("op", ["copy", "mirror", "move"])
def test_a_full_destination_stops_the_run_and_a_rerun_with_space_finishes(tmp_path: Path, op: str) -> None:
    src = full_disk_source(tmp_path / "src")
    src_snap = snapshot(src)
    with mounted_tmpfs(tmp_path / "mnt", "3m") as mnt:
        dst = mnt / "dst"
        write_file(dst / "extra.txt", b"only here\n")  # mirror deletes it only on a complete run
        proc = run_blit(op, f"{src}/", dst)
        assert proc.returncode == 1, describe_output(proc)
        errors = [ln for ln in stderr_lines(proc) if ln.startswith("blit: error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0], describe_output(proc)
        assert (dst / "extra.txt").exists()
        assert_json_fatal(run_blit(op, "--json", f"{src}/", dst), "No space left on device")
        os.unlink(dst / "extra.txt")
        assert_nothing_partial(src_snap, dst)
        if op == "move":  # a source goes only once its copy landed
            for p, e in src_snap.items():
                if e.kind == "file" and not os.path.lexists(os.path.join(src, os.fsdecode(p))):
                    assert snapshot(dst)[p].sha256 == e.sha256, p
        grow_tmpfs(mnt, "20m")
        proc = run_blit(op, f"{src}/", dst)
        assert proc.returncode == 0, describe_output(proc)
        assert_same_tree(src_snap, snapshot(dst), include_root=op != "move")


# --- a destination that cannot be written -----------------------------------------------------


@pytest.mark.root
def test_a_destination_directory_nobody_may_write(nobody_tmp: Path) -> None:
    src = make_tree(nobody_tmp / "src", {"a.txt": "a\n", "sub/": {"b.bin": os.urandom(5 * MiB)}})
    chown_tree(src, NOBODY, NOBODY)
    closed = nobody_tmp / "closed"
    closed.mkdir(mode=0o555)  # root's
    proc = run_blit("copy", f"{src}/", closed, as_nobody=True)
    assert proc.returncode == 3, describe_output(proc)
    assert sorted(stderr_lines(proc)) == [
        "blit: .: directory metadata: Operation not permitted",
        "blit: a.txt: copy: Permission denied",
        "blit: sub: mkdir: Permission denied",
    ], describe_output(proc)
    assert os.listdir(closed) == []
    proc = run_blit("copy", f"{src}/", closed / "new", as_nobody=True)
    assert proc.returncode == 1, describe_output(proc)
    assert stderr_lines(proc) == [f"blit: error: cannot create destination {closed}/new: Permission denied"]
    assert os.listdir(closed) == []


# --- a source file that changes size while it is copied ----------------------------------------


@pytest.mark.parametrize("change", ["shrink", "grow"])
def test_a_source_file_that_changes_size_while_copied(tmp_path: Path, change: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_big(src / "big.bin")
    dst = tmp_path / "dst"
    proc = change_mid_transfer(["copy", f"{src}/", dst], src / "big.bin", change)
    assert_changed_file_outcome(proc, src, dst, change)
    run_blit("copy", f"{src}/", dst, check=0)
    assert_same_tree(src, dst)


@pytest.mark.root
def test_a_directory_not_ours_says_each_refusal_once(nobody_tmp: Path) -> None:
    """dst/keep is root's: a new file, an extra and the directory's metadata fail. The metadata
    line came twice (once when finalised, once after the deletions) and the delete said
    `Operation not permitted` (the chmod meant to open the directory up) where the refusal was
    `Permission denied`, as a push says it."""
    src, dst = nobody_tmp / "src", nobody_tmp / "dst"
    make_tree(src, {"keep/": {"newf": "n\n"}})
    make_tree(dst, {"keep/": {"extra": "x\n"}})
    chown_tree(src, NOBODY, NOBODY)
    chown_tree(dst, NOBODY, NOBODY)
    os.chown(dst / "keep", 0, 0)
    # keep's mtime differs from the source's (created in the same clock tick, they were equal,
    # and a directory not ours that already matches is no failure)
    os.utime(src / "keep", (1_600_000_000, 1_600_000_000))
    proc = run_blit("mirror", f"{src}/", f"{dst}/", as_nobody=True)
    assert proc.returncode == 3, describe_output(proc)
    assert sorted(stderr_lines(proc)) == [  # once each, in whatever order they were met
        "blit: keep/extra: delete: Permission denied",
        "blit: keep/newf: copy: Permission denied",
        "blit: keep: directory metadata: Operation not permitted",
    ]

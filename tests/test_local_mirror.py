"""Mirror: deletes what the source lacks, only inside the filter scope, and nothing at all when
the source could not be read in full. Filters are checked against `rsync -a --delete`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from helpers import (
    NOBODY,
    Symlink,
    assert_same_tree,
    chown_tree,
    cp_a,
    describe_output,
    json_events,
    make_tree,
    recent_mtimes,
    run_blit,
    run_rsync,
    snapshot,
    stderr_lines,
    summary_of,
    write_file,
)

pytestmark = pytest.mark.usefixtures("blit_exe")

SMALL = {
    "a.txt": "a\n",
    "b.bin": b"\x00\x01" * 1000,
    "sub/": {"c.txt": "c\n", "deeper/": {"d.txt": "d\n"}},
    "empty/": {},
    "link": Symlink("a.txt"),
}


def test_mirror_deletes_extras_and_nothing_else(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", SMALL)
    dst = tmp_path / "dst"
    outside = make_tree(tmp_path / "outside", {"precious.txt": "keep me\n", "dir/": {"x": "x"}})
    outside_before = snapshot(outside)
    run_blit("copy", f"{src}/", dst, check=0)
    write_file(dst / "extra.txt", b"extra\n")
    write_file(dst / "sub/extra.txt", b"extra\n")
    write_file(dst / "extra_dir/x/y/z.txt", b"deep extra\n")
    os.makedirs(dst / "extra_empty")
    write_file(dst / "extra_ro/inside.txt", b"in a read-only extra dir\n")
    os.chmod(dst / "extra_ro", 0o555)
    os.symlink("a.txt", dst / "sub/extra_link")
    os.symlink(outside, dst / "escape")  # deleting it must not touch what it points to
    os.symlink(outside / "dir", dst / "sub/deeper/escape_dir")
    os.mkfifo(dst / "extra_fifo")
    summary = summary_of(run_blit("mirror", "--json", f"{src}/", dst, check=0))
    assert_same_tree(src, dst)
    assert_same_tree(outside_before, snapshot(outside))
    assert summary["files_deleted"] >= 7, summary
    assert summary["failures"] == []


def test_mirror_of_an_empty_source_empties_the_destination(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {})
    dst = make_tree(tmp_path / "dst", SMALL)
    run_blit("mirror", f"{src}/", dst, check=0)
    assert os.listdir(dst) == []
    assert_same_tree(src, dst)


def test_mirror_keeps_excluded_destination_entries(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {**SMALL, "a.o": "object\n", "sub/": {"c.txt": "c\n", "c.o": "o"}})
    dst = make_tree(tmp_path / "dst", {"x.o": "excluded extra\n", "sub/": {"y.o": "nested excluded"},
                                       "gone.txt": "not excluded, deleted\n"})  # fmt: skip
    run_blit("mirror", "--exclude", "*.o", f"{src}/", dst, check=0)
    assert (dst / "x.o").read_bytes() == b"excluded extra\n"
    assert (dst / "sub/y.o").read_bytes() == b"nested excluded"
    assert not (dst / "a.o").exists() and not (dst / "sub/c.o").exists()
    assert not (dst / "gone.txt").exists()
    assert (dst / "sub/c.txt").read_bytes() == b"c\n"


FILTER_SOURCE = {
    "a.c": "c source\n",
    "a.o": "object\n",
    "keep.o": "kept object\n",
    "lib.a": "archive\n",
    "x/": {"in_x.txt": "top x\n"},
    "build/": {"out.bin": "built\n", "sub/": {"more.bin": "more\n"}},
    "build_not_dir": "name starts like build\n",
    "name with space.txt": "spaces\n",
    "1.txt": "one\n",
    "12.txt": "twelve\n",
    "sub/": {
        "x/": {"nested_x.txt": "nested x\n"},
        "x.txt": "x.txt\n",
        "b.c": "b\n",
        "b.o": "b object\n",
        "keep.o": "nested kept object\n",
        "build": "a FILE named build\n",
        "note.txt": "note\n",
        "sub/": {"note.txt": "sub/sub/note\n"},
    },
    "deep/": {"a/": {"b/": {"z.txt": "z\n", "z.log": "log\n"}}, "z.txt": "top z\n",
              "build": Symlink("a")},
    "star*": "a name with a literal star\n",
    "starry": "a name the star pattern would match\n",
}

FILTER_DEST = {
    "stale.o": "extra object (excluded by *.o filters)\n",
    "stale.txt": "extra text\n",
    "x/": {"extra_in_x.txt": "extra\n"},
    "build/": {"old.bin": "old build output\n"},
    "sub/": {"old.o": "old\n", "old.c": "old c\n", "x/": {"old": "old\n"},
             "extra_note.txt": "extra\n", "sub/": {"extra.txt": "extra\n"}},
    "deep/": {"a/": {"b/": {"old.log": "old log\n"}}},
    "only_dst_dir/": {"f.txt": "f\n", "g.o": "g\n"},
}  # fmt: skip

FILTERS = {
    "exclude *.o": ["--exclude", "*.o"],
    "exclude build/": ["--exclude", "build/"],
    "exclude build": ["--exclude", "build"],
    "include keep.o before exclude *.o": ["--include", "keep.o", "--exclude", "*.o"],
    "exclude *.o before include keep.o": ["--exclude", "*.o", "--include", "keep.o"],
    "exclude anchored /x": ["--exclude", "/x"],
    "exclude x at any depth": ["--exclude", "x"],
    "exclude sub/*.txt": ["--exclude", "sub/*.txt"],
    "exclude /sub/*.txt": ["--exclude", "/sub/*.txt"],
    "exclude deep/**": ["--exclude", "deep/**"],
    "exclude **/b/*.log": ["--exclude", "**/b/*.log"],
    "only *.c and dirs": ["--include", "*/", "--include", "*.c", "--exclude", "*"],
    "exclude class *.[oa]": ["--exclude", "*.[oa]"],
    "exclude ?.txt": ["--exclude", "?.txt"],
    "exclude name with space*": ["--exclude", "name with space*"],
    "exclude=form": ["--exclude=*.o", "--include=x/"],
    "negated class *.[!c]": ["--exclude", "*.[!c]"],
    "escaped star": ["--exclude", "star\\*"],
    "only sub/*.c": ["--include", "sub/", "--include", "sub/*.c", "--exclude", "*"],
    "exclude dir contents sub/*": ["--exclude", "sub/*"],
}


@pytest.mark.parametrize("flags", FILTERS.values(), ids=FILTERS.keys())
def test_mirror_filters_match_rsync_delete(tmp_path: Path, flags: list[str]) -> None:
    src = make_tree(tmp_path / "src", FILTER_SOURCE)
    r_dst = make_tree(tmp_path / "rsync", FILTER_DEST)
    b_dst = make_tree(tmp_path / "blit", FILTER_DEST)
    start = time.time_ns() - 1_000_000_000
    assert run_rsync("-a", "--delete", *flags, f"{src}/", f"{r_dst}/") == 0
    run_blit("mirror", *flags, f"{src}/", b_dst, check=0)
    # A destination-only directory that keeps excluded entries gets the time of the deletions.
    assert_same_tree(recent_mtimes(snapshot(r_dst), start), recent_mtimes(snapshot(b_dst), start))


@pytest.mark.parametrize("flags", [FILTERS["exclude *.o"], FILTERS["only *.c and dirs"],
                                   FILTERS["exclude anchored /x"]])  # fmt: skip
def test_copy_filters_match_rsync(tmp_path: Path, flags: list[str]) -> None:
    src = make_tree(tmp_path / "src", FILTER_SOURCE)
    assert run_rsync("-a", *flags, f"{src}/", f"{tmp_path}/rsync/") == 0
    run_blit("copy", *flags, f"{src}/", tmp_path / "blit", check=0)
    assert_same_tree(tmp_path / "rsync", tmp_path / "blit")


@pytest.mark.root
def test_mirror_deletes_nothing_when_part_of_the_source_is_unreadable(nobody_tmp: Path) -> None:
    src = make_tree(nobody_tmp / "src", {"a.txt": "a\n", "changed.txt": "v1\n",
                                         "locked/": {"secret.txt": "s\n", "inner/": {"t": "t"}},
                                         "sub/": {"b.txt": "b\n"}})  # fmt: skip
    dst = nobody_tmp / "dst"
    cp_a(src, dst)
    write_file(dst / "extra.txt", b"extra, must survive\n")
    write_file(dst / "sub/extra2.txt", b"extra, must survive\n")
    write_file(dst / "extras/a.txt", b"extra, must survive\n")  # the directory and 3 below it
    write_file(dst / "extras/deep/b.txt", b"extra, must survive\n")
    write_file(src / "changed.txt", b"v2, longer\n", mtime_ns=1_700_000_000_000_000_000)
    chown_tree(src, NOBODY, NOBODY)
    chown_tree(dst, NOBODY, NOBODY)
    os.chmod(src / "locked", 0o000)
    dst_extras = {p: e for p, e in snapshot(dst).items() if b"extra" in p or p.startswith(b"locked")}

    proc = run_blit("mirror", f"{src}/", dst, as_nobody=True)
    assert proc.returncode == 3, describe_output(proc)
    lines = stderr_lines(proc)
    assert any("locked" in ln and "Permission denied" in ln for ln in lines), describe_output(proc)
    assert any(re.search(r"delet", ln, re.I) and "locked" not in ln for ln in lines), (
        "mirror must say that (and why) it deleted nothing\n" + describe_output(proc)
    )
    # Counted as the complete run would delete them: every entry below an extra directory.
    assert "blit: mirror deleted nothing: 1 source directory could not be read completely (6 destination entries kept)" in lines, lines
    after = snapshot(dst)
    for p, e in dst_extras.items():
        assert p in after, f"{p!r} was deleted although the source scan was incomplete"
        assert after[p].sha256 == e.sha256
    # What could be read was still copied.
    assert (dst / "changed.txt").read_bytes() == b"v2, longer\n"

    # --json says the same: an error event for the unreadable directory, exit_code 3.
    os.chmod(src / "locked", 0o000)
    proc = run_blit("mirror", "--json", f"{src}/", dst, as_nobody=True)
    assert proc.returncode == 3, describe_output(proc)
    events = json_events(proc)
    errors = [e for e in events if e["event"] == "error"]
    assert any(e["path"].startswith("locked") for e in errors), errors
    summary = events[-1]
    assert summary["event"] == "summary" and summary["exit_code"] == 3
    assert summary["files_deleted"] == 0
    assert (dst / "extra.txt").exists()


def test_mirror_replaces_dir_by_file_and_file_by_dir(tmp_path: Path) -> None:
    outside = make_tree(tmp_path / "outside", {"victim.txt": "must stay\n"})
    outside_before = snapshot(outside)
    src = make_tree(tmp_path / "src", {
        "x": "x is a file now\n",
        "y/": {"inside.txt": "y is a dir now\n", "deeper/": {"z": "z"}},
        "z": Symlink("y"),
        "w/": {"file.txt": "w is a real dir\n"},
        "v/": {},
    })  # fmt: skip
    dst = make_tree(tmp_path / "dst", {
        "x/": {"old/": {"deep.txt": "old\n"}, "old.txt": "old\n"},
        "y": "y was a file\n",
        "z/": {"was_dir.txt": "z was a dir\n"},
        "w": Symlink(str(outside)),
        "v": Symlink("x"),
    })  # fmt: skip
    run_blit("mirror", f"{src}/", dst, check=0)
    assert_same_tree(src, dst)
    assert_same_tree(outside_before, snapshot(outside))


def test_copy_replaces_a_symlink_where_the_source_has_a_dir_without_following_it(
    tmp_path: Path,
) -> None:
    outside = make_tree(tmp_path / "outside", {"victim.txt": "must stay\n"})
    outside_before = snapshot(outside)
    src = make_tree(tmp_path / "src", {"w/": {"victim.txt": "from the source\n", "new": "n"}})
    dst = make_tree(tmp_path / "dst", {"w": Symlink(str(outside))})
    run_blit("copy", f"{src}/", dst, check=0)
    assert_same_tree(outside_before, snapshot(outside))
    assert_same_tree(src, dst)


def _deep(top: Path, levels: int, leaves: tuple[str, ...]) -> None:
    """top/x/x/.../x (levels deep, beyond PATH_MAX) holding `leaves`, made through dir fds."""
    top.mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY)
    for _ in range(levels):
        os.mkdir("x", dir_fd=fd)
        nfd = os.open("x", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    for leaf in leaves:
        os.close(os.open(leaf, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    os.close(fd)


def test_mirror_deletes_a_tree_thousands_of_levels_deep(tmp_path: Path) -> None:
    """The deletion recursed: 1,100 levels ended in `internal error: RecursionError` with a
    traceback, nothing deleted, every rerun the same. With a filter, the dry run also named the
    whole tree where the real run keeps the directories above an excluded entry."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _deep(dst / "deep", 1500, ("k.o", "j"))
    dry = run_blit("mirror", "-n", "-v", "--exclude", "*.o", f"{src}/", f"{dst}/")
    real = run_blit("mirror", "-v", "--exclude", "*.o", f"{src}/", f"{dst}/")
    assert (dry.returncode, real.returncode) == (0, 0), describe_output(real)
    lines = real.stdout.decode().splitlines()
    assert dry.stdout.decode().splitlines()[:-1] == lines[:-1] == ["delete deep" + "/x" * 1500 + "/j"]
    assert lines[-1].startswith("copied 0 files (0 B), deleted 1,"), lines
    real = run_blit("mirror", f"{src}/", f"{dst}/")
    assert real.returncode == 0, describe_output(real)
    assert os.listdir(dst) == [] and "deleted 1,502," in real.stdout.decode()


def test_mirror_deletes_what_it_can_around_an_immutable_entry(tmp_path: Path) -> None:
    """An immutable file (chattr +i) in a directory to delete: blit stopped at it with
    `xd: delete: Not a directory` (EPERM taken for a directory), kept the entries after it and
    counted none of those it had removed. rsync names the file and deletes the rest."""
    import subprocess

    src = make_tree(tmp_path / "src", {})
    dst = make_tree(tmp_path / "dst", {"xd/": {"a": "a", "b": "b", "imm": "i", "z": "z", "deeper/": {"e": "e"}}, "imm2": "i"})
    subprocess.run(["chattr", "+i", dst / "xd" / "imm", dst / "imm2"], check=True)
    try:
        proc = run_blit("mirror", f"{src}/", f"{dst}/")
    finally:
        subprocess.run(["chattr", "-i", dst / "xd" / "imm", dst / "imm2"], check=True)
    assert proc.returncode == 3, describe_output(proc)
    assert sorted(stderr_lines(proc)) == ["blit: imm2: delete: Operation not permitted", "blit: xd/imm: delete: Operation not permitted"]
    assert "deleted 5," in proc.stdout.decode(), describe_output(proc)
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == ["imm2", "xd", "xd/imm"]


def test_an_extra_gone_before_its_delete_is_no_failure(tmp_path: Path) -> None:
    """An extra someone else removed between mirror's scan and its delete (a program renaming
    its temporaries into place, say) is what the delete wanted: no failure and not counted, as
    rsync (its delete_item takes ENOENT as success). It was `NAME: delete: No such file or
    directory`, exit 3 (QA: 9 of 15 runs against such a program, local, push and pull alike).
    Driven at mirror's delete (fsops.remove_extra), where every topology's deletions go."""
    from blit import fsops
    from blit.filters import Filters

    top = tmp_path / "d"
    (top / "x").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (top / "x" / name).write_bytes(b"1")
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        gone: list[str] = []
        assert fsops.remove_extra(fd, "vanished", "vanished", Filters.from_args([]), gone, failed=[]) == (0, False)
        assert gone == []
        failed: list[tuple[str, str]] = []
        asked: list[int] = []

        def meanwhile() -> bool:  # asked before each entry: the other program removes b first
            if not asked:
                (top / "x" / "b").unlink()
            asked.append(1)
            return False

        removed, kept = fsops.remove_extra(fd, "x", "x", Filters.from_args([]), gone, stop=meanwhile, failed=failed)
    finally:
        os.close(fd)
    assert (removed, kept, failed) == (3, False, [])  # a, c and x itself
    assert not (top / "x").exists()


@pytest.mark.parametrize(
    ("cwd", "src", "dst"),
    [("src/sub", ".", ".."), (".", "src/sub/", "src/"), (".", "src/sub/deep/.", "src"), (".", "src/sub/", "lnk")],
    ids=["dot-into-parent", "into-parent", "into-grandparent", "through-a-symlink"],
)
def test_a_mirror_into_a_directory_holding_its_source_is_refused(tmp_path: Path, cwd: str, src: str, dst: str) -> None:
    """The source would be an extra of the destination, and deleted (QA: `cd src/sub && blit
    mirror . ..` deleted src/sub, the working directory, with everything in it; rsync empties
    src entirely)."""
    root = make_tree(tmp_path / "t", {"src/": {"a": "a\n", "sub/": {"b": "b\n", "deep/": {"c": "c\n"}}}, "lnk": Symlink("src")})
    before = snapshot(root)
    proc = run_blit("mirror", src, dst, cwd=root / cwd)
    assert proc.returncode == 2, describe_output(proc)
    err = proc.stderr.decode()
    assert "inside the destination" in err and "would delete it" in err, err
    assert snapshot(root) == before

"""rsync's trailing-slash rules (docs/cli.md), with rsync -a itself as the oracle.

(Except where SPEC.md says otherwise: a directory copied to a missing DST lands as DST.)

Each case builds the same scratch directory twice, runs `rsync -a SRC DST` in one and
`blit copy SRC DST` in the other with the same relative arguments, and compares the two
scratch trees entry by entry. Directories that neither tool copied but had to create get the
time of the run; those times are compared as "recent" rather than to the nanosecond.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    Symlink,
    assert_same_tree,
    describe_output,
    make_tree,
    recent_mtimes,
    run_blit,
    run_rsync,
    snapshot,
    stderr_lines,
)

pytestmark = pytest.mark.usefixtures("blit_exe")

SOURCES: dict[str, Any] = {
    "src/": {
        "a.txt": "alpha\n",
        "sub/": {"b.txt": "beta\n", "deeper/": {"c.txt": "gamma\n"}},
        "empty/": {},
        "link": Symlink("a.txt"),
    },
    "f": "a single file\n",
    "lnk": Symlink("src"),
    "lnkf": Symlink("f"),
}

DESTINATIONS: dict[str, dict[str, Any]] = {
    "missing": {},
    "empty dir": {"d/": {}},
    "dir with entries": {"d/": {"keep.txt": "already there\n", "a.txt": "stale a, longer\n",
                                "src/": {"a.txt": "stale\n", "old.txt": "old\n"},
                                "f": "stale f\n"}},  # fmt: skip
    "dir holding a file named src": {"d/": {"src": "a file where the dir lands\n"}},
    "file": {"d": "a file\n"},
    "symlink to a dir": {"real/": {"r.txt": "in real\n"}, "d": Symlink("real")},
    "symlink to a file": {"t.txt": "the link's target, must stay\n", "d": Symlink("t.txt")},
    "dangling symlink": {"d": Symlink("nowhere")},
}

# SPEC.md departs from rsync in one place: `SRC DST` with DST missing lands SRC *as* DST (rsync
# would create DST/SRC). For those cases the oracle is rsync given the equivalent `SRC/ DST`.
SPEC_NOT_RSYNC = {("src", "d", "missing"): ("src/", "d"), ("src/sub", "d", "missing"): ("src/sub/", "d")}

CASES = [
    # (SRC, DST, destination state)
    ("src/", "d", "missing"),
    ("src/", "d", "empty dir"),
    ("src/", "d", "dir with entries"),
    ("src/", "d/", "missing"),
    ("src/", "d/", "dir with entries"),
    ("src", "d", "missing"),
    ("src", "d", "empty dir"),
    ("src", "d", "dir with entries"),
    ("src", "d", "dir holding a file named src"),
    ("src", "d/", "missing"),
    ("src", "d/", "empty dir"),
    ("f", "d", "missing"),
    ("f", "d", "empty dir"),
    ("f", "d", "dir with entries"),
    ("f", "d", "file"),
    ("f", "d/", "missing"),
    ("f", "d/", "dir with entries"),
    ("lnk", "d", "missing"),
    ("lnk", "d", "empty dir"),
    ("lnk/", "d", "missing"),
    ("lnk/", "d", "dir with entries"),
    ("lnkf", "d", "missing"),
    ("src/sub", "d", "missing"),
    ("src/sub/", "d/new", "empty dir"),
    ("./src/", "./d", "missing"),
    # A last component `.` or `..` names the directory's contents, as a trailing slash does
    # (QA: `SRC/.` and `.` landed SRC itself, and `cd SRC && blit move . ../d/` took the cwd).
    ("src/.", "d", "missing"),
    ("src/.", "d", "dir with entries"),
    ("src/sub/..", "d", "empty dir"),
    ("src/.", "d/.", "dir with entries"),
    ("f", "d/.", "dir with entries"),
    # A destination that is a symlink: followed when it leads to a directory, else replaced.
    ("src/", "d", "symlink to a dir"),
    ("src", "d", "symlink to a dir"),
    ("f", "d", "symlink to a dir"),
    ("f", "d", "symlink to a file"),
    ("f", "d", "dangling symlink"),
]


def _scratch(root: Path, dst_state: str) -> Path:
    return make_tree(root, {**SOURCES, **DESTINATIONS[dst_state]})


def _run_both(tmp_path: Path, src: str, dst: str, state: str) -> tuple[Any, int, Path, Path]:
    r_root = _scratch(tmp_path / "rsync", state)
    b_root = _scratch(tmp_path / "blit", state)
    r_code = run_rsync("-a", *SPEC_NOT_RSYNC.get((src, dst, state), (src, dst)), cwd=r_root)
    proc = run_blit("copy", src, dst, cwd=b_root)
    return proc, r_code, r_root, b_root


@pytest.mark.parametrize(("src", "dst", "state"), CASES, ids=[f"{s} {d} ({st})" for s, d, st in CASES])
def test_trailing_slash_rules_match_rsync(tmp_path: Path, src: str, dst: str, state: str) -> None:
    start = time.time_ns() - 1_000_000_000
    proc, r_code, r_root, b_root = _run_both(tmp_path, src, dst, state)
    assert r_code == 0, f"rsync -a {src} {dst} failed: the case is not a valid oracle"
    assert proc.returncode == 0, describe_output(proc)
    r_snap = recent_mtimes(snapshot(r_root, include_root=False), start)
    b_snap = recent_mtimes(snapshot(b_root, include_root=False), start)
    assert_same_tree(r_snap, b_snap)


def test_file_source_with_trailing_slash_is_an_error(tmp_path: Path) -> None:
    """`blit copy file/ d`: not a directory. rsync refuses too; nothing is created."""
    proc, r_code, r_root, b_root = _run_both(tmp_path, "f/", "d", "missing")
    assert r_code != 0
    assert proc.returncode == 2, describe_output(proc)
    lines = stderr_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("blit: error:"), describe_output(proc)
    assert "not a directory" in lines[0].lower(), lines
    assert not (b_root / "d").exists()
    assert_same_tree(snapshot(r_root, include_root=False), snapshot(b_root, include_root=False))


@pytest.mark.parametrize("src", ["src/", "src"])
def test_directory_onto_an_existing_file_changes_nothing(tmp_path: Path, src: str) -> None:
    """rsync refuses to put a directory's contents over a file; blit says so and keeps the file."""
    proc, r_code, r_root, b_root = _run_both(tmp_path, src, "d", "file")
    assert r_code != 0
    assert proc.returncode in (1, 2), describe_output(proc)
    lines = stderr_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("blit: error:"), describe_output(proc)
    assert (b_root / "d").read_bytes() == b"a file\n"
    assert_same_tree(snapshot(r_root, include_root=False), snapshot(b_root, include_root=False))


def test_single_file_lands_with_its_metadata(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "s", {"f": "data\n"})
    os.chmod(src / "f", 0o640)
    os.setxattr(src / "f", "user.k", b"v")
    os.utime(src / "f", ns=(1, 1_234_567_890_123_456_789))
    (tmp_path / "d").mkdir()
    run_blit("copy", src / "f", tmp_path / "d", check=0)
    assert_same_tree(src / "f", tmp_path / "d" / "f")
    run_blit("copy", src / "f", tmp_path / "renamed", check=0)
    assert_same_tree(src / "f", tmp_path / "renamed")


def test_moving_dot_moves_the_contents_and_keeps_the_directory(tmp_path: Path) -> None:
    """`cd SRC && blit move . ../d/`: SRC's entries move and SRC itself stays, as with rsync
    --remove-source-files (it moved the working directory itself, as `d/SRC`)."""
    root = make_tree(tmp_path / "t", {"src/": {"a.txt": "alpha\n", "sub/": {"b.txt": "beta\n"}}, "d/": {}})
    proc = run_blit("move", ".", "../d/", cwd=root / "src")
    assert proc.returncode == 0, describe_output(proc)
    assert sorted(os.listdir(root / "d")) == ["a.txt", "sub"]
    assert (root / "d" / "sub" / "b.txt").read_text() == "beta\n"
    assert (root / "src").is_dir() and os.listdir(root / "src") == []


def test_dot_dot_after_a_symlink_is_the_parent_of_its_target(tmp_path: Path) -> None:
    """`src/lnk/..` with lnk -> ../other/inner names other, as the kernel, ls and cp -a read it
    (QA: blit struck out `lnk` by text and copied src; a move would have emptied the wrong
    directory)."""
    root = make_tree(tmp_path / "t", {"src/": {"s": "s\n", "lnk": Symlink("../other/inner")}, "other/": {"o": "o\n", "inner/": {}}})
    proc = run_blit("copy", "src/lnk/..", "d", cwd=root)
    assert proc.returncode == 0, describe_output(proc)
    assert sorted(os.listdir(root / "d")) == ["inner", "o"]
    proc = run_blit("copy", "src/lnk/../o", "f", cwd=root)
    assert proc.returncode == 0 and (root / "f").read_text() == "o\n", describe_output(proc)


@pytest.mark.parametrize("dst", ["D/missing/..", "D/afile/.."])
def test_dot_dot_after_a_missing_name_or_a_file_is_no_path(tmp_path: Path, dst: str) -> None:
    """The kernel has no `missing/..` (ENOENT) nor `afile/..` (ENOTDIR); struck out by text it
    was D, and a mirror deleted D's entries, the named file with them (QA)."""
    root = make_tree(tmp_path / "t", {"S/": {"a": "a\n"}, "D/": {"keep": "k\n", "afile": "x\n"}})
    before = snapshot(root)
    proc = run_blit("mirror", "S/", dst, cwd=root)
    assert proc.returncode == 2, describe_output(proc)
    assert snapshot(root) == before
    proc = run_blit("move", "S/ghost/..", "E", cwd=root)
    assert proc.returncode == 2 and "source does not exist" in proc.stderr.decode(), describe_output(proc)
    assert snapshot(root) == before

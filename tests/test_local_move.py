"""Move: copy, confirm, then remove the source; never remove a source entry whose copy failed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import (
    NOBODY,
    Symlink,
    assert_same_tree,
    chown_tree,
    describe_output,
    make_full_tree,
    make_tree,
    rmtree,
    run_blit,
    snapshot,
    stderr_lines,

)

pytestmark = pytest.mark.usefixtures("blit_exe")

TREE = {
    "a.txt": "a\n",
    "big.bin": os.urandom(3 * 1024 * 1024),
    "sub/": {"b.txt": "b\n", "deeper/": {"c.txt": "c\n"}},
    "empty/": {},
    "link": Symlink("a.txt"),
    "dangling": Symlink("nowhere"),
}


def test_move_dir_form_removes_the_source(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    expected = snapshot(src)
    run_blit("move", src, tmp_path / "dst", check=0)
    assert_same_tree(expected, snapshot(tmp_path / "dst"))
    assert not os.path.lexists(src), f"source still there: {os.listdir(src)}"


def test_move_contents_form_empties_the_source(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    expected = snapshot(src, include_root=False)
    run_blit("move", f"{src}/", tmp_path / "dst", check=0)
    assert_same_tree(expected, snapshot(tmp_path / "dst", include_root=False))
    # `SRC/` moves the contents: the directory itself may stay, but empty.
    assert not os.path.lexists(src) or os.listdir(src) == []


def test_move_of_the_full_tree_lands_it_exactly(tmp_path: Path) -> None:
    src = make_full_tree(tmp_path / "src")
    expected = snapshot(src)
    run_blit("move", src, tmp_path / "dst", check=0)
    assert_same_tree(expected, snapshot(tmp_path / "dst"))
    assert not os.path.lexists(src)


def test_move_across_filesystems_lands_the_full_tree_exactly(tmp_path: Path) -> None:
    """/dev/shm is a tmpfs: rename(2) cannot do it, so this is copy + confirm + remove."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem at /dev/shm")
    src = make_full_tree(tmp_path / "src")
    expected = snapshot(src)
    dst = Path(f"/dev/shm/blit-test-move-{os.getpid()}")
    try:
        run_blit("move", src, dst, check=0)
        assert_same_tree(expected, snapshot(dst))
        assert not os.path.lexists(src)
    finally:
        rmtree(dst)


def test_move_of_a_single_file(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "s", {"f.txt": "payload\n"})
    os.chmod(src / "f.txt", 0o640)
    expected = snapshot(src / "f.txt")
    (tmp_path / "d").mkdir()
    run_blit("move", src / "f.txt", tmp_path / "d", check=0)
    assert_same_tree(expected, snapshot(tmp_path / "d/f.txt"))
    assert not os.path.lexists(src / "f.txt")
    assert src.is_dir()  # only the file moved

    make_tree(src, {"g.txt": "other\n"})
    expected = snapshot(src / "g.txt")
    run_blit("move", src / "g.txt", tmp_path / "renamed.txt", check=0)
    assert_same_tree(expected, snapshot(tmp_path / "renamed.txt"))
    assert not os.path.lexists(src / "g.txt")


def test_move_onto_an_up_to_date_destination_still_removes_the_source(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    dst = tmp_path / "dst"
    run_blit("copy", f"{src}/", dst, check=0)
    expected = snapshot(dst)
    run_blit("move", f"{src}/", dst, check=0)
    assert_same_tree(expected, snapshot(dst))
    assert not os.path.lexists(src) or os.listdir(src) == []


def test_move_of_a_dangling_symlink_moves_the_link(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "s", {"dangling": Symlink("no/such/target")})
    expected = snapshot(src / "dangling")
    run_blit("move", src / "dangling", tmp_path / "moved", check=0)
    assert_same_tree(expected, snapshot(tmp_path / "moved"))
    assert not os.path.lexists(src / "dangling")


def test_move_onto_an_existing_destination_merges(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"new.txt": "new\n", "same.txt": "from source\n",
                                       "sub/": {"s.txt": "s\n"}})  # fmt: skip
    dst = make_tree(tmp_path / "dst", {"keep.txt": "already here\n", "same.txt": "old\n",
                                       "sub/": {"other.txt": "other\n"}})  # fmt: skip
    src_snap = snapshot(src, include_root=False)
    run_blit("move", f"{src}/", dst, check=0)
    after = snapshot(dst, include_root=False)
    for p, e in src_snap.items():
        if e.kind == "file":
            assert after[p].sha256 == e.sha256, p
    assert (dst / "keep.txt").read_bytes() == b"already here\n"
    assert (dst / "sub/other.txt").read_bytes() == b"other\n"
    assert not os.path.lexists(src) or os.listdir(src) == []


@pytest.mark.root
def test_move_keeps_a_source_file_whose_copy_failed(nobody_tmp: Path) -> None:
    src = make_tree(nobody_tmp / "src", {"ok1.txt": "ok\n", "sub/": {"ok2.txt": "ok\n",
                                         "secret.txt": "unreadable\n"}, "ok3.bin": os.urandom(9999)})  # fmt: skip
    chown_tree(src, NOBODY, NOBODY)
    os.chmod(src / "sub/secret.txt", 0o000)
    expected = snapshot(src, include_root=False)
    dst = nobody_tmp / "dst"
    proc = run_blit("move", f"{src}/", dst, as_nobody=True)
    assert proc.returncode == 3, describe_output(proc)
    lines = stderr_lines(proc)
    assert any("secret.txt" in ln and "Permission denied" in ln for ln in lines), lines
    # The failed file stays where it was, with its directory; the others moved.
    assert (src / "sub/secret.txt").exists()
    assert not (dst / "sub/secret.txt").exists()
    for rel in ("ok1.txt", "sub/ok2.txt", "ok3.bin"):
        assert not (src / rel).exists(), f"{rel} was copied but not removed from the source"
        assert snapshot(dst / rel)[b"."].sha256 == expected[rel.encode()].sha256


def test_move_dry_run_moves_nothing(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", TREE)
    before = snapshot(src)
    proc = run_blit("move", "--dry-run", src, tmp_path / "dst", check=0)
    assert_same_tree(before, snapshot(src))
    assert not os.path.lexists(tmp_path / "dst")
    assert b"a.txt" in proc.stdout

"""The local engine against rsync -aHAXS --numeric-ids on random trees (tests/difftree.py), and
the bugs that differential testing found, each reduced to the smallest tree that shows it.

Random trees carry every kind of entry (sparse files, odd names, symlinks of every sort,
hard-link groups inside and partly outside the tree, xattrs and ACLs, odd modes and owners,
devices and sockets, times before 1970 and after 2100); destinations start missing, empty or
stale (the same tree changed at random: extras, retyped entries, newer files, read-only
directories). `python tests/difftree.py --seeds 0-199` runs many more seeds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from difftree import CASES, run_case, run_sequence
from helpers import (
    ACL_DEFAULT,
    ACL_FILE,
    acl_dir,
    assert_same_tree,
    make_acl_inheritance_tree,
    make_tree,
    rmtree,
    run_blit,
    snapshot,
    write_file,
)

pytestmark = [pytest.mark.usefixtures("blit_exe"), pytest.mark.root]

# A few seeds, every scenario: about 15 s on a loaded 2-core machine. Each of these found a bug
# that the tests below pin down (0: a directory's time after a hard-link group landed in it;
# 3 and 12: ACLs inherited from a default ACL in the destination, a FIFO's ACL).
SEEDS = [0, 12]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_trees_land_as_rsync_lands_them(tmp_path: Path, seed: int) -> None:
    problems = []
    for op, form, state in CASES:
        base = tmp_path / f"{op}-{form.replace('/', 'S')}-{state}"
        base.mkdir()
        flag = "--checksum" if (op, state) == ("mirror", "stale") and form == "src" else ""
        r = run_case(base, seed, op=op, src_form=form, dst_state=state, compare_flag=flag)
        if not r.ok:
            problems.append(r.describe())
        rmtree(base)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("seed", [3, 12])
def test_random_tree_changed_and_mirrored_again_matches_rsync(tmp_path: Path, seed: int) -> None:
    problems = [r.describe() for r in run_sequence(tmp_path, seed) if not r.ok]
    assert not problems, "\n".join(problems)


def test_a_hard_link_group_copied_again_keeps_its_directories_times(tmp_path: Path) -> None:
    """The first member of a group landed in an existing directory whose own metadata was
    already right: that directory's time, moved by the new name, is set back as well."""
    src = make_tree(tmp_path / "src", {"d1/": {"a": "v1\n"}, "d2/": {}})
    os.link(src / "d1/a", src / "d2/b")
    for d in ("d1", "d2", "."):
        os.utime(src / d, ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))
    dst = tmp_path / "dst"
    run_blit("copy", f"{src}/", dst, check=0)
    write_file(src / "d1/a", b"v2, longer\n", mtime_ns=1_600_000_000_000_000_003)  # same inode
    for d in ("d1", "d2", "."):
        os.utime(src / d, ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))
    run_blit("copy", f"{src}/", dst, check=0)
    assert_same_tree(src, dst)


def test_entries_landing_under_a_default_acl_keep_the_sources_acls_and_modes(tmp_path: Path) -> None:
    """A destination directory with a default ACL hands every entry created in it an ACL (and a
    mode shaped by that ACL, not the umask). What lands must carry the source's ACLs and modes
    only, whichever way it is written: small files, a large file, a hard-link group, a FIFO, a
    new directory and what lands in it."""
    src = tmp_path / "src"
    make_acl_inheritance_tree(src)

    # The destination's copy of "shared" exists already, with the same default ACL.
    dst = tmp_path / "dst"
    run_blit("copy", f"{src}/", dst, "--exclude", "shared/*", check=0)
    assert os.getxattr(dst / "shared", "system.posix_acl_default") == ACL_DEFAULT
    run_blit("copy", f"{src}/", dst, check=0)
    assert_same_tree(src, dst)

    # A destination created (mkdir -p) inside a directory with a default ACL.
    acl_dir(tmp_path / "acl_parent")
    run_blit("copy", f"{src}/shared/newdir/", tmp_path / "acl_parent/made", check=0)
    assert_same_tree(src / "shared/newdir", tmp_path / "acl_parent/made")
    # The same with an empty source directory: nothing lands in it, its ACL must still go.
    (tmp_path / "empty").mkdir()
    run_blit("copy", f"{tmp_path / 'empty'}/", tmp_path / "acl_parent/made_empty", check=0)
    assert_same_tree(tmp_path / "empty", tmp_path / "acl_parent/made_empty")


def test_special_files_carry_their_acls(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"keep": "k\n"})
    os.mkfifo(src / "fifo")
    os.setxattr(src / "fifo", "system.posix_acl_access", ACL_FILE)
    os.utime(src, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    dst = tmp_path / "dst"
    run_blit("copy", f"{src}/", dst, check=0)
    assert_same_tree(src, dst)
    # Up to date, but its ACL changed: fixed in place.
    os.removexattr(src / "fifo", "system.posix_acl_access")
    os.chmod(src / "fifo", 0o600)
    os.utime(src, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    before = snapshot(dst)
    run_blit("copy", f"{src}/", dst, check=0)
    assert_same_tree(src, dst)
    assert before[b"fifo"].ino == snapshot(dst)[b"fifo"].ino

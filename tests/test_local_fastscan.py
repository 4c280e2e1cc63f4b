"""The C directory comparer (blit.ffi.scan): a re-run over an up-to-date tree counts clean files
in C and hands everything else to the planner. These tests drift a destination in every way the
comparer must notice and check that mirror repairs each one, on both of its xattr paths
(listxattrat, and the private-cwd fallback of kernels before 6.13)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("blit_exe")

import blit
from blit.ffi import scan
from helpers import Symlink, assert_same_tree, is_root, make_tree, run_blit, summary_of, write_file

TREE = {
    "a.txt": "a\n",
    "b.bin": b"\x00\x01" * 1000,
    "mode.txt": "m\n",
    "xsrc.txt": "x\n",
    "xdst.txt": "y\n",
    "owner.txt": "o\n",
    "samesize.txt": "1234\n",
    "grow.txt": "g\n",
    "gone.txt": "g\n",
    "kind": "file in source\n",
    "sub/": {"c.txt": "c\n", "deeper/": {"d.txt": "d\n"}},
    "link": Symlink("a.txt"),
}


def test_the_comparer_is_built_where_a_compiler_is() -> None:
    """The installs that CI makes have gcc: the fast path must not silently be missing."""
    if sys.platform != "linux" or shutil.which("gcc") is None:
        assert scan.cmpdir(0, 0, 0) is None or scan.HAVE_CMPDIR
        return
    assert scan.HAVE_CMPDIR, "blit.ffi._scan was not built at install (see hatch_build.py)"


@pytest.fixture(params=[1, -1], ids=["listxattrat", "cwd-fallback"])
def xattr_mode(request: pytest.FixtureRequest) -> Iterator[int]:
    if not scan.HAVE_CMPDIR:
        pytest.fail("blit.ffi._scan is not built")
    scan.set_xattr_mode(request.param)
    yield request.param
    scan.set_xattr_mode(0)


def _drift(src: Path, dst: Path) -> None:
    os.chmod(dst / "mode.txt", 0o600)
    os.setxattr(src / "xsrc.txt", "user.tag", b"source")
    os.setxattr(dst / "xdst.txt", "user.stale", b"dest only")
    if is_root():
        os.chown(dst / "owner.txt", 1234, 5678)
    st = os.stat(src / "samesize.txt")
    write_file(dst / "samesize.txt", b"abcd\n")  # same size, other mtime: must be copied
    os.utime(dst / "samesize.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    write_file(dst / "grow.txt", b"longer content\n")
    os.unlink(dst / "gone.txt")
    os.unlink(dst / "kind")
    os.mkdir(dst / "kind")
    write_file(dst / "extra.txt", b"extra\n")
    write_file(dst / ".blit-0123456789abcdef.tmp", b"stale temporary\n")
    write_file(dst / "sub" / "deeper" / "extra2.txt", b"extra\n")


async def test_mirror_repairs_every_drift_of_an_up_to_date_tree(tmp_path: Path, xattr_mode: int) -> None:
    src = make_tree(tmp_path / "src", TREE)
    dst = tmp_path / "dst"
    first = await blit.mirror(f"{src}/", str(dst))
    assert first.exit_code == 0, first.failures
    again = await blit.mirror(f"{src}/", str(dst))
    assert (again.files_copied, again.files_deleted, again.files_skipped) == (0, 0, 13)  # 12 files, 1 symlink
    _drift(src, dst)
    cwd = os.getcwd()
    fixed = await blit.mirror(f"{src}/", str(dst))
    assert os.getcwd() == cwd
    assert fixed.exit_code == 0, fixed.failures
    assert fixed.files_copied == 4  # samesize, grow, gone, kind
    assert fixed.files_deleted == 3  # extra.txt, extra2.txt, and the directory at "kind" it replaces
    assert_same_tree(src, dst)
    assert os.getxattr(dst / "xsrc.txt", "user.tag") == b"source"
    assert "user.stale" not in os.listxattr(dst / "xdst.txt")
    assert not (dst / ".blit-0123456789abcdef.tmp").exists()
    quiet = await blit.mirror(f"{src}/", str(dst))
    assert (quiet.files_copied, quiet.files_deleted) == (0, 0)


async def test_copy_keeps_extras_and_fixes_metadata(tmp_path: Path, xattr_mode: int) -> None:
    src = make_tree(tmp_path / "src", TREE)
    dst = tmp_path / "dst"
    await blit.copy(f"{src}/", str(dst))
    os.chmod(dst / "mode.txt", 0o600)
    os.setxattr(src / "sub" / "c.txt", "user.tag", b"v")
    write_file(dst / "sub" / "extra.txt", b"kept\n")
    summary = await blit.copy(f"{src}/", str(dst))
    assert summary.exit_code == 0 and summary.files_copied == 0
    assert os.stat(dst / "mode.txt").st_mode & 0o777 == os.stat(src / "mode.txt").st_mode & 0o777
    assert os.getxattr(dst / "sub" / "c.txt", "user.tag") == b"v"
    assert (dst / "sub" / "extra.txt").read_text() == "kept\n"


def test_cmpdir_reports_only_what_is_not_clean(tmp_path: Path, xattr_mode: int) -> None:
    src = make_tree(tmp_path / "src", {"same": "s", "changed": "c", "new": "n", "d/": {}, "l": Symlink("same")})
    dst = tmp_path / "dst"
    shutil.copytree(src, dst, symlinks=True)
    for name in ("same", "changed"):
        st = os.stat(src / name)
        os.utime(dst / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.unlink(dst / "new")
    os.utime(dst / "changed", ns=(0, 1))
    write_file(dst / "extra", b"e")
    sfd, dfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY), os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        got = scan.cmpdir(sfd, dfd, scan.CHECK_XATTRS)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert got is not None
    clean, total, dst_total, found, others = got
    assert (clean, total, dst_total, found) == (1, 5, 5, 4)
    by_name = {n: (m, d) for n, m, d in others}
    assert sorted(by_name) == ["changed", "d", "l", "new"]
    assert by_name["new"][1] is None
    assert by_name["changed"][1] is not None and by_name["changed"][1].st_mtime_ns == 1
    assert by_name["changed"][0].st_size == os.lstat(src / "changed").st_size


def test_prefetch_starts_only_for_plain_local_copy_and_mirror(tmp_path: Path) -> None:
    from blit import prefetch

    src = make_tree(tmp_path / "src", {"d/": {"f": "x"}})
    dst = make_tree(tmp_path / "dst", {"d/": {"f": "x"}, "src/": {}})
    s, d = str(src), str(dst)
    assert prefetch.sniff(["mirror", f"{s}/", f"{d}/"]) == (s, d)
    assert prefetch.sniff(["copy", "-q", f"{s}/", d]) == (s, d)
    assert prefetch.sniff(["copy", s, d]) == (s, f"{d}/src")  # `src` lands as dst/src
    assert prefetch.sniff(["move", f"{s}/", d]) is None  # move removes sources: never
    assert prefetch.sniff(["mirror", "--checksum", f"{s}/", d]) is None
    assert prefetch.sniff(["mirror", "--exclude", "*.o", f"{s}/", d]) is None
    assert prefetch.sniff(["copy", f"{s}/", "host:/mod/x"]) is None
    assert prefetch.sniff(["copy", f"{s}/", str(tmp_path / "missing")]) is None
    assert prefetch.sniff(["copy", f"{s}/f", d]) is None


def test_cli_rerun_with_prefetch_repairs_drift_in_every_directory(tmp_path: Path) -> None:
    """The entry point compares the first directories while it imports: drift spread over many
    directories must be repaired exactly wherever the comparison ran."""
    spec = {f"d{i:02}/": {f"f{j:02}": f"{i}-{j}\n" for j in range(20)} for i in range(40)}
    src = make_tree(tmp_path / "src", spec)
    dst = tmp_path / "dst"
    run_blit("mirror", "-q", f"{src}/", dst, check=0)
    for i in range(0, 40, 3):
        d = dst / f"d{i:02}"
        os.chmod(d / "f01", 0o600)
        write_file(d / "f02", b"changed and longer\n")
        write_file(d / "extra", b"extra\n")
        os.setxattr(src / f"d{i:02}" / "f03", "user.tag", str(i).encode())
    proc = run_blit("mirror", "--json", f"{src}/", dst, check=0)
    summary = summary_of(proc)
    assert summary["files_copied"] == 14 and summary["files_deleted"] == 14
    assert_same_tree(src, dst)
    again = summary_of(run_blit("mirror", "--json", f"{src}/", dst, check=0))
    assert (again["files_copied"], again["files_deleted"], again["files_skipped"]) == (0, 0, 800)


async def test_extras_are_listed_without_a_full_scan(tmp_path: Path, xattr_mode: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory the comparer finds clean but for names only the destination holds (extras, a
    stale temporary): its answer stands, and only those names are looked at, not both
    directories in full (R72: 100,000 extras of 200,000 took 2.2x rsync's time that way)."""
    from blit import fsops

    src = make_tree(tmp_path / "src", {**{f"f{i:03}": f"{i}\n" for i in range(60)}, "sub/": {"g": "g\n"}})
    dst = tmp_path / "dst"
    assert (await blit.mirror(f"{src}/", str(dst))).exit_code == 0
    for i in range(25):
        write_file(dst / f"extra{i:02}", b"extra\n")
    make_tree(dst / "extra-dir", {"inner/": {"x": "x\n"}, "y": "y\n"})
    write_file(dst / ".blit-0123456789abcdef.tmp", b"stale temporary\n")
    write_file(dst / "sub" / "extra", b"extra\n")
    os.chmod(dst / "f007", 0o600)
    scans: list[object] = []
    real = fsops.scan
    monkeypatch.setattr(fsops, "scan", lambda *a, **k: scans.append(a) or real(*a, **k))
    fixed = await blit.mirror(f"{src}/", str(dst))
    assert fixed.exit_code == 0, fixed.failures
    assert scans == []
    assert (fixed.files_copied, fixed.files_skipped) == (0, 61), fixed
    assert fixed.files_deleted == 25 + 1 + 1 + 3  # the extras, sub/extra, extra-dir and what it held
    assert_same_tree(src, dst)
    assert not (dst / ".blit-0123456789abcdef.tmp").exists()
    assert os.stat(dst / "f007").st_mode & 0o777 == os.stat(src / "f007").st_mode & 0o777
    copy = await blit.copy(f"{src}/", str(dst))  # a copy leaves extras be
    assert (copy.files_deleted, copy.files_copied) == (0, 0) and scans == []


@pytest.mark.parametrize("compare", ["size-mtime", "size-only"])  # the C comparer's path, the Python scan's
async def test_a_removed_temporary_leaves_its_directory_at_the_source_time(tmp_path: Path, compare: str) -> None:
    """A directory whose only difference is a stale temporary: the run removes it and puts the
    directory's mtime back (QA: it kept the time of the removal until the next run). Neither
    `-n -v` nor the real run names it (QA: the dry run announced its deletion)."""
    from blit.plan import Compare

    opts = blit.Options(compare=Compare.SIZE_ONLY if compare == "size-only" else Compare.SIZE_MTIME)
    src = make_tree(tmp_path / "src", {"a/": {"b/": {"f1": "1\n", "f2": "2\n"}}, "g": "g\n"})
    t = 1_700_000_000_123_456_789
    for p in (src / "a" / "b" / "f1", src / "a" / "b" / "f2", src / "a" / "b", src / "a", src):
        os.utime(p, ns=(t, t))
    dst = tmp_path / "dst"
    assert (await blit.mirror(f"{src}/", str(dst), opts)).exit_code == 0
    write_file(dst / "a" / "b" / ".blit-0123456789abcdef.tmp", b"stale\n")
    os.utime(dst / "a" / "b", ns=(t, t))
    dry = run_blit("mirror", "-n", "-v", *(["--size-only"] if compare == "size-only" else []), f"{src}/", dst, check=0)
    assert b"blit-0123456789abcdef" not in dry.stdout, dry.stdout
    assert (dst / "a" / "b" / ".blit-0123456789abcdef.tmp").exists()  # a dry run removes nothing
    again = await blit.mirror(f"{src}/", str(dst), opts)
    assert again.exit_code == 0 and (again.files_copied, again.files_deleted) == (0, 0), again
    assert not (dst / "a" / "b" / ".blit-0123456789abcdef.tmp").exists()
    assert os.stat(dst / "a" / "b").st_mtime_ns == t
    assert_same_tree(src, dst)

"""The C small-file copier (blit.ffi.scan.copy_new): plain new files are copied one directory
batch per C call and must land exactly as the Python path lands them (fsops.copy_small): bytes,
mode, owner, ns times, no temporary left behind, nothing partial under a real name. Everything it
does not take (xattrs, ACLs, sparse files, hard links, symlinks) lands through Python in the same
run. Checked on each landing path: O_TMPFILE linked with AT_EMPTY_PATH, linked through
/proc/self/fd, and the named temporary + rename of filesystems without O_TMPFILE."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("blit_exe")

import blit
from blit import fsops
from blit.errors import FatalError
from blit.ffi import scan
from helpers import (
    ACL_FILE,
    MiB,
    NOBODY,
    Symlink,
    assert_same_tree,
    chown_tree,
    describe_output,
    extra_entries,
    is_root,
    make_tree,
    mounted_tmpfs,
    run_blit,
    snapshot,
    stderr_lines,
    walk,
    write_file,
)

PRE_1970_NS = -1_234_567_890_123_456_789


@pytest.fixture(params=[(1, 0), (1, 2), (-1, 0)], ids=["tmpfile", "proc-link", "named-temporary"])
def copy_mode(request: pytest.FixtureRequest) -> Iterator[tuple[int, int]]:
    """Force one landing path of the C copier for runs inside this process (blit.copy)."""
    if not scan.HAVE_CMPDIR:
        pytest.fail("blit.ffi._scan is not built")
    scan.set_copy_modes(*request.param)
    yield request.param
    scan.set_copy_modes(1, 0)


def _mixed_tree(root: Path) -> Path:
    """Plain files in batches of every size, and each kind the C copier must hand back."""
    spec: dict[str, object] = {
        "bulk/": {f"f{i:03}": os.urandom(i * 37 % 5000) for i in range(150)},  # 3 batches, empties
        "empty": b"",
        "small.txt": "hello\n",
        "four_mib.bin": os.urandom(4 * MiB),  # the small-file limit itself
        "xattr.txt": "x\n",
        "acl.txt": "acl\n",
        "link": Symlink("small.txt"),
        "dangling": Symlink("nowhere"),
        "hl1": "hard link\n",
        b"caf\xe9": "latin-1 name\n",
        "line\nbreak": "newline in the name\n",
        "ro400": "read-only\n",
        "m000": "no access\n",
        "m777": "umask must not reduce it\n",
        "old.txt": "before 1970\n",
        "setgid_dir/": {"inside": "in a setgid directory\n", "x": "y\n"},
    }
    make_tree(root, spec)
    os.link(root / "hl1", root / "hl2")
    os.setxattr(root / "xattr.txt", "user.tag", b"v")
    os.setxattr(root / "acl.txt", "system.posix_acl_access", ACL_FILE)
    with open(root / "sparse.img", "wb") as f:
        f.write(os.urandom(4096))
        f.seek(2 * MiB)
        f.write(os.urandom(4096))
    os.chmod(root / "ro400", 0o400)
    os.chmod(root / "m000", 0o000)
    os.chmod(root / "m777", 0o777)
    os.utime(root / "old.txt", ns=(PRE_1970_NS, PRE_1970_NS))
    if is_root():
        chown_tree(root / "bulk", 1234, 5678)
        # A root-owned file in a directory that hands new files its group 5678.
        os.chown(root / "setgid_dir", 1234, 5678)
        os.chown(root / "setgid_dir/x", 1234, 5678)
        os.chmod(root / "setgid_dir", 0o2775)
        os.chmod(root / "m777", 0o4777)  # setuid: chown clears it, so chmod must come after
    for p in (root, root / "setgid_dir"):
        os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return root


def _atimes(root: Path) -> dict[bytes, int]:
    return {p: st.st_atime_ns for p, st in walk(root) if stat.S_ISREG(st.st_mode)}


async def test_fresh_copy_of_a_mixed_tree_lands_identical(tmp_path: Path, copy_mode: tuple[int, int]) -> None:
    src = _mixed_tree(tmp_path / "src")
    atimes = _atimes(src)  # before blit reads the files
    dst = tmp_path / "dst"
    summary = await blit.copy(f"{src}/", str(dst))
    assert summary.exit_code == 0, summary.failures
    assert summary.files_copied == 150 + 15  # 16 regular files outside bulk, one a second link
    assert _atimes(dst) == atimes  # before assert_same_tree reads the copies
    assert_same_tree(src, dst)
    assert os.stat(dst / "old.txt").st_mtime_ns == PRE_1970_NS


def test_copy_new_lands_what_copy_small_lands(tmp_path: Path, copy_mode: tuple[int, int]) -> None:
    """The contract of the C call itself: per file the bytes copied, PYTHON for what it does
    not take, -errno with nothing left behind; and the same entry copy_small makes."""
    src = _mixed_tree(tmp_path / "src")
    names = ["empty", "small.txt", "ro400", "m777", "old.txt", "setgid_dir", "xattr.txt", "gone"]
    py, c = tmp_path / "py", tmp_path / "c"
    for d in (py, c):
        os.mkdir(d)
        if is_root():  # new files would get group 5678: the inherit_gid rule must undo it
            os.chown(d, 0, 5678)
            os.chmod(d, 0o2755)
    metas = {n: fsops.meta_of(os.lstat(src / n)) for n in names[:-1]}
    metas["gone"] = metas["empty"]
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (src, py, c)]
    try:
        for n in names[:5]:
            fsops.copy_small(fds[0], n, fds[1], n, metas[n], False, True)
        write_file(c / "small.txt", b"already here\n")  # appeared meanwhile: Python replaces it
        got = scan.copy_new(fds[0], fds[2], [(os.fsencode(n), metas[n]) for n in names], True)
    finally:
        for fd in fds:
            os.close(fd)
    assert got[0] == 0 and got[2:5] == [10, 25, 12]
    if copy_mode[0] > 0:  # linkat never replaces: Python's commit does, through a temporary
        assert got[1] == scan.PYTHON and (c / "small.txt").read_bytes() == b"already here\n"
    else:  # the named temporary is renamed over it, as Landing.commit does
        assert got[1] == 6 and (c / "small.txt").read_bytes() == b"hello\n"
    assert got[5] == -errno.EISDIR  # a directory is never copied as a file
    assert got[6] == scan.PYTHON  # xattrs: Python copies them
    assert got[7] == -errno.ENOENT
    os.unlink(c / "small.txt")
    os.unlink(py / "small.txt")
    for n in ("empty", "ro400", "m777", "old.txt"):  # before assert_same_tree reads them
        assert os.stat(c / n).st_atime_ns == os.stat(py / n).st_atime_ns == metas[n].st_atime_ns
    assert_same_tree(py, c, include_root=False)


@pytest.mark.root
@pytest.mark.parametrize("mode", [(1, 0), (-1, 0)], ids=["tmpfile", "named-temporary"])
async def test_full_destination_stops_with_nothing_partial_and_no_temporaries(
    tmp_path: Path, mode: tuple[int, int]
) -> None:
    src = make_tree(tmp_path / "src", {"d/": {f"f{i:03}": os.urandom(8192) for i in range(300)}})
    src_snap = snapshot(src)
    scan.set_copy_modes(*mode)
    try:
        with mounted_tmpfs(tmp_path / "mnt", "1m") as mnt:
            with pytest.raises(FatalError, match="No space left on device"):
                await blit.copy(f"{src}/", str(mnt / "dst"))
            dst_snap = snapshot(mnt / "dst", include_root=False)
            for p, e in dst_snap.items():
                if e.kind == "file":
                    assert e.sha256 == src_snap[p].sha256, f"{p!r} is partial under its real name"
            assert not extra_entries(src_snap, dst_snap), extra_entries(src_snap, dst_snap)
    finally:
        scan.set_copy_modes(1, 0)


@pytest.mark.root
def test_full_destination_is_reported_once_with_exit_1(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"d/": {f"f{i:03}": os.urandom(8192) for i in range(300)}})
    with mounted_tmpfs(tmp_path / "mnt", "1m") as mnt:
        proc = run_blit("copy", f"{src}/", mnt / "dst")
        assert proc.returncode == 1, describe_output(proc)
        lines = stderr_lines(proc)
        # One line, naming the file that hit it (as push and pull say it), not that file's
        # failure line and then the run's error.
        assert len(lines) == 1 and lines[0].startswith("blit: error: No space left on device (writing d/f"), describe_output(proc)
        names = os.listdir(mnt / "dst" / "d")
        assert all(not n.startswith(".blit-") for n in names), names
        for n in names:
            assert (mnt / "dst/d" / n).read_bytes() == (src / "d" / n).read_bytes(), n


@pytest.mark.root
def test_unprivileged_fresh_copy_lands_identical(nobody_tmp: Path) -> None:
    src = _mixed_tree(nobody_tmp / "src")
    os.unlink(src / "m000")  # nobody cannot read it
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    chown_tree(src, NOBODY, NOBODY)
    dst = nobody_tmp / "dst"
    proc = run_blit("copy", f"{src}/", dst, as_nobody=True, check=0)
    assert proc.stderr == b"", describe_output(proc)
    assert_same_tree(src, dst)

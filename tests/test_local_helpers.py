"""The yardstick itself: make_full_tree, snapshot and assert_same_tree, checked against cp -a.

If these fail, every fidelity verdict on blit is meaningless, so they run first and need no blit.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from helpers import (
    ACL_DEFAULT,
    LONG_COMPONENT,
    LONG_DEPTH,
    assert_same_tree,
    cp_a,
    make_full_tree,
    make_long_path,
    set_times,
    snapshot,
)


def test_full_tree_has_every_kind_of_entry(tmp_path: Path) -> None:
    src = make_full_tree(tmp_path / "src")
    snap = snapshot(src)
    kinds = {e.kind for e in snap.values()}
    assert {"file", "dir", "symlink", "fifo"} <= kinds
    assert snap[b"readonly_dir"].mode == 0o555
    assert snap[b"modes/setgid_dir"].mode == 0o2775
    assert snap[b"modes/sticky_dir"].mode == 0o1777
    assert snap[b"links/dangling"].target == b"does/not/exist"
    assert snap[b"links/loop_a"].target == b"loop_b"
    assert snap[b"hl/a/one"].links == (b"hl/a/one", b"hl/b/two", b"hl/c/d/three")
    assert snap[b"hl/pair1"].links == (b"hl/pair1", b"hl/pair2")
    assert snap[b"sparse/holes_end.img"].sparse and snap[b"sparse/data_end.img"].sparse
    assert snap[b"xattr/file"].xattrs["user.binary"] == b"\x00\xff\x01\x80"
    assert "system.posix_acl_access" in snap[b"acl/file"].xattrs
    assert snap[b"acl/default_dir"].xattrs["system.posix_acl_default"] == ACL_DEFAULT
    assert b"names/caf\xe9" in snap and b"names/line\nbreak" in snap
    assert b"names/" + b"n" * 255 in snap
    long_leaf = [p for p in snap if p.endswith(b"/leaf.txt")]
    assert long_leaf and len(long_leaf[0]) > 4096
    assert snap[b"small.txt"].mtime_ns < 0
    assert snap[b"links/rel"].mtime_ns % 1_000_000_000 != 0  # symlink times in ns
    mtimes = [e.mtime_ns for e in snap.values()]
    assert len(set(mtimes)) > len(mtimes) * 0.9, "mtimes should be set one by one"
    if os.geteuid() == 0:
        assert snap[b"owned/by_1234"].uid == 1234 and snap[b"owned/by_1234"].gid == 5678
        assert snap[b"owned/link_1234"].uid == 1234
        assert snap[b"owned/setgid_1234"].mode == 0o2755
        assert snap[b"modes/setuid_file"].mode == 0o4755
        assert snap[b"special/null"].kind == "chardev"


def test_cp_a_copy_is_identical_by_snapshot(tmp_path: Path) -> None:
    """cp -a keeps all of it (except paths over PATH_MAX, which it cannot reach)."""
    src = make_full_tree(tmp_path / "src", long_path=False)
    cp_a(src, tmp_path / "cp")
    assert_same_tree(src, tmp_path / "cp")


def test_rsync_aHAXS_copy_is_identical_by_snapshot(tmp_path: Path) -> None:
    src = make_full_tree(tmp_path / "src", long_path=False)
    subprocess.run(["rsync", "-aHAXS", f"{src}/", f"{tmp_path}/rs/"], check=True)
    assert_same_tree(src, tmp_path / "rs")


def _mutations(c: Path, s: dict) -> list[tuple[str, object]]:  # type: ignore[type-arg]
    def restore_mtime(rel: str) -> None:
        os.utime(c / rel, ns=(s[os.fsencode(rel)].mtime_ns,) * 2, follow_symlinks=False)

    def break_link() -> None:
        os.unlink(c / "hl/b/two")
        (c / "hl/b/two").write_bytes((c / "hl/a/one").read_bytes())
        os.chmod(c / "hl/b/two", 0o640)
        os.utime(c / "hl/b/two", ns=(s[b"hl/a/one"].mtime_ns,) * 2)
        restore_mtime("hl/b")

    def fill_holes() -> None:
        data = (c / "sparse/holes_end.img").read_bytes()
        os.unlink(c / "sparse/holes_end.img")
        (c / "sparse/holes_end.img").write_bytes(data)
        os.utime(c / "sparse/holes_end.img", ns=(s[b"sparse/holes_end.img"].mtime_ns,) * 2)
        restore_mtime("sparse")

    def same_size_content() -> None:
        with open(c / "few_mib.bin", "r+b") as f:
            f.seek(123_456)
            b = f.read(1)
            f.seek(123_456)
            f.write(bytes([b[0] ^ 1]))
        restore_mtime("few_mib.bin")

    return [
        ("symlink mtime", lambda: os.utime(c / "links/rel", ns=(1, 1), follow_symlinks=False)),
        ("root mtime", lambda: os.utime(c, ns=(5, 5))),
        ("dir mode", lambda: os.chmod(c / "readonly_dir", 0o755)),
        ("file mode", lambda: os.chmod(c / "modes/m600", 0o644)),
        ("xattr removed", lambda: os.removexattr(c / "xattr/file", "user.empty")),
        ("dir xattr value", lambda: os.setxattr(c / "xattr/dir", "user.dirattr", b"other")),
        ("default ACL", lambda: os.removexattr(c / "acl/default_dir", "system.posix_acl_default")),
        ("hard link broken", break_link),
        ("holes filled", fill_holes),
        ("one byte flipped", same_size_content),
        ("symlink target", lambda: (os.unlink(c / "links/dangling"),
                                    os.symlink("does/not/exist2", c / "links/dangling"))),
        ("fifo replaced", lambda: (os.unlink(c / "special/fifo"),
                                   (c / "special/fifo").write_bytes(b""))),
        ("extra file", lambda: (c / "empty_dir/extra").write_bytes(b"")),
        ("missing file", lambda: os.unlink(c / "names/caf\udce9")),
        ("owner", lambda: os.chown(c / "small.txt", 1, 1)),
    ]  # fmt: skip


@pytest.mark.root
def test_assert_same_tree_catches_each_kind_of_difference(tmp_path: Path) -> None:
    src = make_full_tree(tmp_path / "src", long_path=False)
    s = snapshot(src)
    names = [what for what, _ in _mutations(tmp_path, s)]
    for n, what in enumerate(names):
        c = tmp_path / f"c{n}"
        cp_a(src, c)
        assert_same_tree(s, snapshot(c))
        _mutations(c, s)[n][1]()  # type: ignore[operator]
        with pytest.raises(AssertionError) as info:
            assert_same_tree(s, snapshot(c))
        assert len(str(info.value).splitlines()) >= 2, what


def test_snapshot_reaches_paths_longer_than_path_max(tmp_path: Path) -> None:
    """No standard tool copies these (cp, tar and rsync stop at PATH_MAX), so copy by fd here."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    make_long_path(a / "long")
    set_times(a)
    _copy_by_fd(os.fsencode(a), os.fsencode(b))
    set_times(b)
    sa = snapshot(a)
    assert max(len(p) for p in sa) > 4096
    assert len(sa) == LONG_DEPTH + 4  # root, long, the chain, leaf.txt, leaf_link
    assert_same_tree(a, b)
    # A different byte at the bottom is seen.
    fd = _open_deep(os.fsencode(b / "long"))
    try:
        f = os.open(b"leaf.txt", os.O_WRONLY, dir_fd=fd)
        os.pwrite(f, b"X", 0)
        os.close(f)
        os.utime(b"leaf.txt", ns=(sa[[p for p in sa if p.endswith(b"leaf.txt")][0]].mtime_ns,) * 2,
                 dir_fd=fd)  # fmt: skip
    finally:
        os.close(fd)
    with pytest.raises(AssertionError, match="sha256"):
        assert_same_tree(a, b)


def _open_deep(long_dir: bytes) -> int:
    fd = os.open(long_dir, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(LONG_DEPTH):
        nfd = os.open(LONG_COMPONENT, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _copy_by_fd(src: bytes, dst: bytes) -> None:
    os.mkdir(dst)
    sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    dfd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _copy_dir(sfd, dfd)
    finally:
        os.close(sfd)
        os.close(dfd)


def _copy_dir(sfd: int, dfd: int) -> None:
    for name in map(os.fsencode, os.listdir(sfd)):
        st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, stat.S_IMODE(st.st_mode), dir_fd=dfd)
            s2 = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=sfd)
            d2 = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
            try:
                _copy_dir(s2, d2)
            finally:
                os.close(s2)
                os.close(d2)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
        else:
            i = os.open(name, os.O_RDONLY, dir_fd=sfd)
            o = os.open(name, os.O_WRONLY | os.O_CREAT, stat.S_IMODE(st.st_mode), dir_fd=dfd)
            os.write(o, os.read(i, 1 << 20))
            os.close(i)
            os.close(o)

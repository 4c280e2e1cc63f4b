"""Build a tree with every kind of entry, and compare two trees entry by entry."""

from __future__ import annotations

import os
import stat
from pathlib import Path

MiB = 1 << 20


def make_full_tree(root: Path) -> None:
    """Files (empty, small, 1 MiB+, sparse), dirs (nested, empty), symlinks (relative, absolute,
    dangling), hard links (within and across dirs), non-UTF-8 / newline / space names, xattrs,
    odd modes, a FIFO and (as root) a character device."""
    root.mkdir(parents=True, exist_ok=True)
    b = os.fsencode(root)
    (root / "empty.txt").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello world\n")
    (root / "big.bin").write_bytes(os.urandom(3 * MiB + 17))
    with open(root / "sparse.img", "wb") as f:
        f.truncate(16 * MiB)
        f.seek(5 * MiB)
        f.write(b"data in the middle")
    os.makedirs(root / "a" / "b" / "c")
    (root / "a" / "b" / "c" / "deep.txt").write_text("deep")
    (root / "emptydir").mkdir()
    (root / "a" / "emptysub").mkdir()
    with open(b + b"/caf\xe9-latin1.txt", "wb") as f:
        f.write(b"latin-1 name")
    with open(b + b"/new\nline name", "wb") as f:
        f.write(b"newline")
    (root / " spaced name ").write_text("spaces")
    os.symlink("small.txt", root / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("does/not/exist", root / "dangling")
    os.symlink("a/b", root / "dir-link")
    os.link(root / "small.txt", root / "hard-same-dir")
    os.link(root / "small.txt", root / "a" / "hard-other-dir")
    os.link(root / "big.bin", root / "a" / "b" / "big-hard")
    (root / "mode600").write_text("private")
    os.chmod(root / "mode600", 0o600)
    (root / "exec.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "exec.sh", 0o755)
    try:
        os.setxattr(root / "small.txt", "user.blit", b"xattr value")
        os.setxattr(root / "a", "user.dir", b"on a directory")
    except OSError:
        pass
    os.mkfifo(root / "fifo")
    if os.geteuid() == 0:
        os.mknod(root / "nulldev", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(root / "a" / "b", 0o750)
    # Distinct times everywhere, directories last (children change parents' mtimes).
    t = 1_600_000_000_000_000_000
    for dirpath, dirnames, filenames in os.walk(b, topdown=False):
        for n in filenames + dirnames:
            p = os.path.join(dirpath, n)
            t += 1_234_567
            os.utime(p, ns=(t, t), follow_symlinks=False)
        t += 7
        os.utime(dirpath, ns=(t, t))


def snapshot(root: Path, *, times: bool = True) -> dict[bytes, tuple]:
    """Every entry below root (not root itself): kind, mode, size, content/target, mtime,
    xattrs, and which entries share an inode."""
    out: dict[bytes, tuple] = {}
    inodes: dict[int, bytes] = {}
    b = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(b):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            rel = p[len(b) + 1 :]
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            link_of = None
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:  # any non-directory may have other names
                link_of = inodes.setdefault(st.st_ino, rel)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    extra = f.read()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = st.st_rdev
            try:
                xattrs = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False)) for k in os.listxattr(p, follow_symlinks=False) if k.startswith("user.")))
            except OSError:
                xattrs = ()
            mode = stat.S_IMODE(st.st_mode) if not stat.S_ISLNK(st.st_mode) else 0
            mtime = st.st_mtime_ns if times else 0
            out[rel] = (kind, mode, st.st_size if not stat.S_ISDIR(st.st_mode) else 0, extra, mtime, xattrs, link_of)
    return out


def sparse_ok(path: Path) -> bool:
    st = os.stat(path)
    return st.st_blocks * 512 < st.st_size // 2


def assert_same_tree(a: Path, b: Path) -> None:
    sa, sb = snapshot(a), snapshot(b)
    assert sorted(sa) == sorted(sb), (set(sa) ^ set(sb))
    for k in sa:
        # Hard-link groups are compared by shape: which first member each entry points at.
        assert sa[k][:6] == sb[k][:6], (k, sa[k][:6] if not isinstance(sa[k][3], bytes) or len(sa[k][3]) < 64 else "...", sb[k][:6] if not isinstance(sb[k][3], bytes) or len(sb[k][3]) < 64 else "...")
        assert (sa[k][6] is None) == (sb[k][6] is None), k
    ga: dict[bytes, set[bytes]] = {}
    gb: dict[bytes, set[bytes]] = {}
    for k, v in sa.items():
        if v[6] is not None:
            ga.setdefault(v[6], set()).add(k)
    for k, v in sb.items():
        if v[6] is not None:
            gb.setdefault(v[6], set()).add(k)
    assert sorted(map(sorted, ga.values())) == sorted(map(sorted, gb.values()))


def checksum_case(src: Path, dst: Path) -> int:
    """Source and destination with: equal content and size but another mtime (not sent), the
    same size and mtime but other content (sent), another size (sent), a hard-linked pair with
    equal content and another mtime (not sent). Returns the bytes that must travel."""
    for root in (src, dst):
        (root / "sub").mkdir(parents=True)
    (src / "same").write_bytes(b"S" * 5000)
    (dst / "same").write_bytes(b"S" * 5000)
    (src / "sub" / "differs").write_bytes(b"A" * 3000)
    (dst / "sub" / "differs").write_bytes(b"B" * 3000)
    (src / "grown").write_bytes(b"G" * 700)
    (dst / "grown").write_bytes(b"G" * 600)
    (src / "big").write_bytes(os.urandom(6 << 20))
    (dst / "big").write_bytes((src / "big").read_bytes())
    (src / "h1").write_bytes(b"H" * 100)
    os.link(src / "h1", src / "sub" / "h2")
    (dst / "h1").write_bytes(b"H" * 100)
    os.link(dst / "h1", dst / "sub" / "h2")
    t = 1_700_000_000_000_000_000
    for rel in ("same", "big", "h1"):
        os.utime(src / rel, ns=(t, t))
        os.utime(dst / rel, ns=(t + 10**9, t + 10**9))
    for rel in ("sub/differs", "grown"):
        os.utime(src / rel, ns=(t, t))
        os.utime(dst / rel, ns=(t, t))
    return 3000 + 700


def temporaries_after_settling(root: Path, timeout: float = 10.0) -> list[str]:
    """blit's temporary names (files, or new directories not yet moved into place) still below
    `root` once a daemon whose client has gone finished tearing its session down: the client
    exits first, and the daemon's own cleanup follows it by a moment. Polls up to `timeout`."""
    import time

    from blit import fsops

    deadline = time.monotonic() + timeout
    while True:
        try:
            left = [str(p.relative_to(root)) for p in root.rglob(f"{fsops.TMP_PREFIX}*")] if root.exists() else []
        except FileNotFoundError:  # one moved into place under the walk
            left = ["(moving)"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)

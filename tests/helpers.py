"""Test helpers: build trees with every kind of entry, snapshot them, compare them, run blit.

Every path is handled as bytes and every walk goes through directory file descriptors, so
non-UTF-8 names and paths longer than PATH_MAX (4096 bytes) work the same as ordinary ones.
The helpers never import blit: the tests drive the real console script in a real process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLIT = str(Path(sys.executable).parent / "blit")
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
MiB = 1024 * 1024
GiB = 1024 * MiB

# Environment for every blit run: the same as ours, but with a private HOME and XDG dirs so that
# the run history blit keeps in the user's data directory never lands in the real one.
# conftest.py points these at a per-session scratch directory.
BLIT_ENV: dict[str, str] = dict(os.environ)


def set_blit_home(home: Path) -> None:
    BLIT_ENV.update(
        HOME=str(home),
        XDG_DATA_HOME=str(home / ".local/share"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_STATE_HOME=str(home / ".local/state"),
    )


def is_root() -> bool:
    return os.geteuid() == 0


# --------------------------------------------------------------------------------------------
# Running blit and its peers


def run_blit(
    *args: str | os.PathLike[str] | bytes,
    cwd: str | os.PathLike[str] | None = None,
    as_nobody: bool = False,
    timeout: float = 120,
    check: int | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the `blit` console script; stdout and stderr are captured as bytes.

    `check`, when given, is the exit code the run must end with; otherwise the output is shown.
    """
    argv: list[str | bytes] = [BLIT, *(a if isinstance(a, bytes) else os.fspath(a) for a in args)]
    if as_nobody:
        argv = [*AS_NOBODY, *argv]
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, timeout=timeout, env=BLIT_ENV, stdin=subprocess.DEVNULL
    )
    if check is not None and proc.returncode != check:
        raise AssertionError(
            f"blit {' '.join(map(repr, args))} exited {proc.returncode}, expected {check}\n"
            + describe_output(proc)
        )
    return proc


def imported_modules(argv: list[str], env: dict[str, str]) -> set[str]:
    """Every module a run of `argv` (a Python command line) imports, by its full name, from
    `python -X importtime`; the run must succeed."""
    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True, env=env, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {ln.rsplit("|", 1)[1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:") and "|" in ln}
    assert "typer" in names, "importtime output not understood"
    return names


def describe_output(proc: subprocess.CompletedProcess[bytes]) -> str:
    out = proc.stdout.decode(errors="backslashreplace")
    err = proc.stderr.decode(errors="backslashreplace")
    return f"--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-4000:]}"


def run_rsync(*args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> int:
    """Run rsync (the oracle) and return its exit code; rsync must be installed."""
    exe = shutil.which("rsync")
    assert exe, "rsync is the oracle of these tests and must be installed (apt-get install rsync)"
    proc = subprocess.run(
        [exe, *map(os.fspath, args)], cwd=cwd, capture_output=True, timeout=300
    )
    return proc.returncode


def cp_a(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """cp -a (which cannot reach paths over PATH_MAX: trees with those need another way)."""
    proc = subprocess.run(["cp", "-a", os.fspath(src), os.fspath(dst)], capture_output=True,
                          timeout=300)  # fmt: skip
    if proc.returncode:
        raise AssertionError(f"cp -a failed: {proc.stderr.decode(errors='replace')[:500]}")


def json_events(proc: subprocess.CompletedProcess[bytes]) -> list[dict[str, Any]]:
    """Parse blit's --json stdout: every line must be one JSON object with an "event" key."""
    events = []
    for n, line in enumerate(proc.stdout.decode().splitlines(), 1):
        assert line.strip(), f"--json output line {n} is empty\n{describe_output(proc)}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise AssertionError(f"--json line {n} is not JSON: {line!r}: {exc}") from None
        assert isinstance(obj, dict) and "event" in obj, f"--json line {n} is not an event: {line!r}"
        events.append(obj)
    assert events, f"--json printed nothing\n{describe_output(proc)}"
    return events


def summary_of(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """The summary event of a --json run (always its last line)."""
    events = json_events(proc)
    assert events[-1]["event"] == "summary", f"last --json line is not the summary: {events[-1]}"
    return events[-1]


def stderr_lines(proc: subprocess.CompletedProcess[bytes]) -> list[str]:
    return [ln for ln in proc.stderr.decode(errors="backslashreplace").splitlines() if ln.strip()]


# --------------------------------------------------------------------------------------------
# Building trees


def write_file(
    path: str | os.PathLike[str] | bytes,
    data: bytes = b"",
    *,
    mode: int | None = None,
    mtime_ns: int | None = None,
) -> None:
    p = os.fsencode(path)
    os.makedirs(os.path.dirname(p) or b".", exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(p, mode)
    if mtime_ns is not None:
        os.utime(p, ns=(mtime_ns, mtime_ns))


@dataclass(frozen=True)
class Symlink:
    target: str | bytes


def make_tree(root: str | os.PathLike[str] | bytes, spec: Mapping[Any, Any]) -> Path:
    """Build a small tree from a dict: name -> bytes/str (file), dict (dir), Symlink (symlink).

    Names ending in "/" with a dict value are directories too; every mtime is set to a fixed,
    distinct value (ns) so that two calls with the same spec build identical trees.
    """
    rootb = os.fsencode(root)
    os.makedirs(rootb, exist_ok=True)
    counter = [0]

    def build(dirb: bytes, sp: Mapping[Any, Any]) -> None:
        for name, value in sp.items():
            nb = os.fsencode(name).rstrip(b"/")
            p = os.path.join(dirb, nb)
            counter[0] += 1
            t = 1_600_000_000_000_000_000 + counter[0] * 1_000_000_123
            if isinstance(value, Mapping):
                os.makedirs(p, exist_ok=True)
                build(p, value)
                os.utime(p, ns=(t, t))
            elif isinstance(value, Symlink):
                os.symlink(os.fsencode(value.target), p)
                os.utime(p, ns=(t, t), follow_symlinks=False)
            else:
                data = value.encode() if isinstance(value, str) else value
                write_file(p, data, mtime_ns=t)

    build(rootb, spec)
    os.utime(rootb, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return Path(os.fsdecode(rootb))


def _acl_xattr(entries: Sequence[tuple[int, int, int]]) -> bytes:
    """Encode a POSIX ACL as the kernel's system.posix_acl_* xattr value (version 2).

    entries: (tag, perm, id) with tags USER_OBJ=1, USER=2, GROUP_OBJ=4, GROUP=8, MASK=0x10,
    OTHER=0x20; the kernel wants them sorted by tag, then id.
    """
    undefined = 0xFFFFFFFF
    out = struct.pack("<I", 2)
    for tag, perm, ident in sorted(entries):
        out += struct.pack("<HHI", tag, perm, undefined if tag in (1, 4, 0x10, 0x20) else ident)
    return out


ACL_FILE = _acl_xattr([(1, 6, 0), (2, 6, 1234), (4, 4, 0), (8, 4, 5678), (0x10, 6, 0), (0x20, 4, 0)])
ACL_DEFAULT = _acl_xattr([(1, 7, 0), (2, 7, 1234), (4, 5, 0), (0x10, 7, 0), (0x20, 5, 0)])

def acl_dir(path: Path | str) -> None:
    """Make directory `path` (and parents) and give it the default ACL ACL_DEFAULT."""
    os.makedirs(path, exist_ok=True)
    os.setxattr(path, "system.posix_acl_default", ACL_DEFAULT)


ACL_TREE_T = 1_400_000_000_000_000_000


def make_acl_inheritance_tree(src: Path) -> None:
    """src/shared with a default ACL, and in it what an ACL-inheriting destination must not
    change: files of their own modes and no ACL (small, 5 MiB, two hard-linked names), one with
    an ACL of its own, a FIFO and a directory without ACLs (holding a file). The entries made in
    `shared` inherit its ACL first; each is then stripped to what it should be."""
    acl_dir(src / "shared")
    acl_free = {
        "plain": (b"no ACL of its own\n", 0o644),
        "private": (b"private\n", 0o600),
        "big.bin": (os.urandom(5 * MiB), 0o644),  # above the size copied by the workers
        "linked": (b"two names\n", 0o640),
    }
    for name, (data, mode) in acl_free.items():
        write_file(src / "shared" / name, data)
        os.removexattr(src / "shared" / name, "system.posix_acl_access")
        os.chmod(src / "shared" / name, mode)
    os.link(src / "shared/linked", src / "shared/linked2")
    write_file(src / "shared/with_acl", b"an ACL of its own\n")
    os.setxattr(src / "shared/with_acl", "system.posix_acl_access", ACL_FILE)
    os.mkfifo(src / "shared/fifo")
    os.removexattr(src / "shared/fifo", "system.posix_acl_access")
    os.chmod(src / "shared/fifo", 0o644)
    os.mkdir(src / "shared/newdir")
    for n in ("system.posix_acl_access", "system.posix_acl_default"):
        os.removexattr(src / "shared/newdir", n)
    os.chmod(src / "shared/newdir", 0o755)
    write_file(src / "shared/newdir/inner", b"inner\n", mode=0o644)
    for p in (src / "shared/newdir", src / "shared"):
        os.utime(p, ns=(ACL_TREE_T, ACL_TREE_T))


# Component names for the path over PATH_MAX: 20 x 250 bytes > 5000 bytes.
LONG_COMPONENT = b"L" * 249
LONG_DEPTH = 20


def make_full_tree(
    root: str | os.PathLike[str],
    *,
    privileged: bool | None = None,
    owner: tuple[int, int] | None = None,
    long_path: bool = True,
) -> Path:
    """Build a tree with every kind of entry blit must carry exactly; returns its path.

    privileged (default: running as root) adds what only root can make: files owned by
    uid 1234 / gid 5678 (and a setgid file owned by them), a setuid root file, a char device.
    owner, when given, chowns every entry to (uid, gid) at the end (keeping setuid/setgid bits),
    so that an unprivileged user can own the whole tree; it implies privileged=False.
    long_path=False leaves out the path longer than PATH_MAX, which cp -a and rsync cannot copy
    (both fail with "File name too long"), so that the tree can be checked against them.
    Every entry (root, dirs, symlinks included) ends with an explicit mtime in ns.
    """
    if privileged is None:
        privileged = is_root() and owner is None
    rootp = Path(root)
    r = os.fsencode(rootp)
    rng = random.Random(20261121)
    j = lambda *parts: os.path.join(r, *(os.fsencode(p) for p in parts))  # noqa: E731
    os.makedirs(r, exist_ok=True)

    # Regular files: empty, small, 1 MiB + a bit, a few MiB.
    write_file(j("empty"), b"")
    write_file(j("small.txt"), b"hello, blit\n")
    write_file(j("one_mib_plus.bin"), rng.randbytes(MiB + 17))
    write_file(j("few_mib.bin"), rng.randbytes(3 * MiB + 4099))
    write_file(j("zeros.bin"), bytes(256 * 1024))  # all zeros, yet not sparse in the source

    # Nested, empty and read-only directories.
    write_file(j("dir1/dir2/dir3/deep.txt"), b"deep\n")
    write_file(j("dir1/sibling.txt"), b"sibling\n")
    os.makedirs(j("empty_dir"))
    os.makedirs(j("dir1/empty_nested"))
    write_file(j("readonly_dir/inside.txt"), b"inside a read-only dir\n", mode=0o444)
    os.makedirs(j("readonly_dir/sub"))
    write_file(j("readonly_dir/sub/deeper.txt"), b"deeper\n")
    os.chmod(j("readonly_dir/sub"), 0o500)
    os.chmod(j("readonly_dir"), 0o555)

    # Odd modes.
    write_file(j("modes/m600"), b"600", mode=0o600)
    write_file(j("modes/m755"), b"#!/bin/sh\necho 755\n", mode=0o755)
    write_file(j("modes/m444"), b"444", mode=0o444)
    write_file(j("modes/m640"), b"640", mode=0o640)
    write_file(j("modes/m000"), b"000", mode=0o000)
    os.makedirs(j("modes/setgid_dir"))
    write_file(j("modes/setgid_dir/f"), b"in setgid dir")
    os.chmod(j("modes/setgid_dir"), 0o2775)
    os.makedirs(j("modes/sticky_dir"))
    write_file(j("modes/sticky_dir/f"), b"in sticky dir")
    os.chmod(j("modes/sticky_dir"), 0o1777)
    os.makedirs(j("modes/dir700"), mode=0o700)
    os.chmod(j("modes/dir700"), 0o700)
    os.makedirs(j("modes/dir711"))
    os.chmod(j("modes/dir711"), 0o711)
    write_file(j("modes/setuid_file"), b"#!/bin/sh\n", mode=0o4755)

    # Symlinks: relative, absolute, dangling, a loop, to a dir, to itself, odd targets.
    os.makedirs(j("links"))
    os.symlink(b"../small.txt", j("links/rel"))
    os.symlink(j("small.txt"), j("links/abs"))
    os.symlink(b"/nonexistent/blit/target", j("links/abs_dangling"))
    os.symlink(b"does/not/exist", j("links/dangling"))
    os.symlink(b"loop_b", j("links/loop_a"))
    os.symlink(b"loop_a", j("links/loop_b"))
    os.symlink(b"self", j("links/self"))
    os.symlink(b"../dir1", j("links/to_dir"))
    os.symlink(b"../names/caf\xe9", j("links/non_utf8_target"))
    os.symlink(b"x/" * 500 + b"end", j("links/long_target"))
    os.symlink(b"../xattr/target", j("links/to_xattr_target"))

    # Hard links: a group of 3 in different directories, and a pair.
    write_file(j("hl/a/one"), b"one file, three names\n", mode=0o640)
    os.makedirs(j("hl/b"))
    os.makedirs(j("hl/c/d"))
    os.link(j("hl/a/one"), j("hl/b/two"))
    os.link(j("hl/a/one"), j("hl/c/d/three"))
    write_file(j("hl/pair1"), rng.randbytes(70_000))
    os.link(j("hl/pair1"), j("hl/pair2"))

    # Sparse files: one ending in a hole, one ending in data.
    os.makedirs(j("sparse"))
    with open(j("sparse/holes_end.img"), "wb") as f:
        f.write(rng.randbytes(4096))
        f.seek(40 * MiB)
        f.write(rng.randbytes(4096))
        f.truncate(64 * MiB)
    with open(j("sparse/data_end.img"), "wb") as f:
        f.seek(8 * MiB)
        f.write(rng.randbytes(10_000))
        f.seek(16 * MiB - 5000)
        f.write(rng.randbytes(5000))
    for name in ("sparse/holes_end.img", "sparse/data_end.img"):
        st = os.stat(j(name))
        assert st.st_blocks * 512 < st.st_size // 4, (
            f"{name}: the filesystem under {root} did not keep holes "
            f"({st.st_blocks * 512} bytes allocated for {st.st_size}); sparse tests need ext4/xfs/tmpfs"
        )

    # Extended attributes: files, dirs, a symlink's target, binary and empty values.
    write_file(j("xattr/file"), b"has xattrs\n")
    os.setxattr(j("xattr/file"), "user.comment", b"hello")
    os.setxattr(j("xattr/file"), "user.binary", b"\x00\xff\x01\x80")
    os.setxattr(j("xattr/file"), "user.empty", b"")
    os.setxattr(j("xattr/file"), "user.big", rng.randbytes(1500))
    os.makedirs(j("xattr/dir"))
    os.setxattr(j("xattr/dir"), "user.dirattr", b"on a directory")
    write_file(j("xattr/target"), b"symlink target\n")
    os.setxattr(j("xattr/target"), "user.target", b"reached through links/to_xattr_target")
    write_file(j("xattr/readonly"), b"read-only file with xattr\n")
    os.setxattr(j("xattr/readonly"), "user.ro", b"1")
    os.chmod(j("xattr/readonly"), 0o444)

    # POSIX ACLs: an access ACL on a file, a default ACL on a dir, and what inherits it.
    write_file(j("acl/file"), b"acl\n")
    os.setxattr(j("acl/file"), "system.posix_acl_access", ACL_FILE)
    os.makedirs(j("acl/default_dir"))
    os.setxattr(j("acl/default_dir"), "system.posix_acl_default", ACL_DEFAULT)
    write_file(j("acl/default_dir/inherited"), b"inherits the default ACL\n")
    os.makedirs(j("acl/default_dir/subdir"))
    write_file(j("acl/default_dir/stripped"), b"inherited ACL removed again\n")
    os.removexattr(j("acl/default_dir/stripped"), "system.posix_acl_access")
    os.chmod(j("acl/default_dir/stripped"), 0o604)

    # Special files.
    os.makedirs(j("special"))
    os.mkfifo(j("special/fifo"), 0o640)
    os.chmod(j("special/fifo"), 0o640)

    # Names are bytes.
    write_file(j(b"names/caf\xe9"), b"latin-1 name\n")
    write_file(j(b"names/line\nbreak"), b"newline in name\n")
    write_file(j(b"names/-leading dash with  spaces "), b"dash\n")
    write_file(j(b"names/" + b"n" * 255), b"255-byte name\n")
    write_file(j(b"names/" + "é".encode() * 127 + b"x"), b"255-byte UTF-8 name\n")
    write_file(j(b"names/glob*?[x]\\"), b"glob characters\n")
    write_file(j(b"names/colon:name"), b"colon\n")
    write_file(j("names/naïve 日本"), b"utf-8\n")
    write_file(j(b"names/dir\xff\xfe/inner\x01"), b"non-utf8 dir, control char\n")
    write_file(j(b"names/.hidden"), b"dot file\n")
    write_file(j(b"names/.blit-lookalike"), b"a name like a temporary file\n")

    # A path longer than PATH_MAX, built one directory fd at a time.
    if long_path:
        make_long_path(j("long"))


    # Owners other than root, and what only root can make.
    if privileged:
        write_file(j("owned/by_1234"), b"owned by 1234:5678\n")
        os.chown(j("owned/by_1234"), 1234, 5678)
        os.makedirs(j("owned/dir_1234"))
        write_file(j("owned/dir_1234/root_inside"), b"root-owned file in 1234's dir\n")
        os.chown(j("owned/dir_1234"), 1234, 5678)
        os.symlink(b"by_1234", j("owned/link_1234"))
        os.chown(j("owned/link_1234"), 1234, 5678, follow_symlinks=False)
        write_file(j("owned/group_only"), b"root:5678\n")
        os.chown(j("owned/group_only"), 0, 5678)
        # chown clears setuid/setgid, so a copier must chown first and chmod after.
        write_file(j("owned/setgid_1234"), b"#!/bin/sh\n")
        os.chown(j("owned/setgid_1234"), 1234, 5678)
        os.chmod(j("owned/setgid_1234"), 0o2755)
        write_file(j("owned/setuid_1234"), b"#!/bin/sh\n")
        os.chown(j("owned/setuid_1234"), 1234, 5678)
        os.chmod(j("owned/setuid_1234"), 0o4750)
        os.mknod(j("special/null"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(j("special/loop_blk"), 0o660 | stat.S_IFBLK, os.makedev(7, 200))
        os.chown(j("special/loop_blk"), 0, 6)

    if owner is not None:
        chown_tree(rootp, *owner)

    set_times(rootp)
    return rootp


def make_bulk_tree(root: str | os.PathLike[str], files: int = 20_000, dirs: int = 200,
                   max_size: int = 4096, seed: int = 1, xattrs: bool = False) -> Path:  # fmt: skip
    """Many small files spread over many directories, with a hard-link group spanning
    directories far apart and explicit mtimes.

    xattrs: every file but each tenth carries a user xattr. Plain new files are copied in C
    without the GIL, so blit copies them in threads; files with xattrs take the per-file Python
    path, and a tree of them makes blit use worker processes.
    """
    rng = random.Random(seed)
    r = os.fsencode(root)
    for d in range(dirs):
        os.makedirs(os.path.join(r, b"bulk", b"d%03d" % d), exist_ok=True)
    for i in range(files):
        p = os.path.join(r, b"bulk", b"d%03d" % (i % dirs), b"f%05d" % i)
        with open(p, "wb") as f:
            f.write(rng.randbytes(rng.randint(0, max_size)))
        if xattrs and i % 10:
            os.setxattr(p, "user.bulk", b"%d" % i)
        t = 1_550_000_000_000_000_000 + i * 1_000_003_001
        os.utime(p, ns=(t, t))
    first = os.path.join(r, b"bulk", b"d000", b"linked")
    write_file(first, b"one inode in three distant directories\n")
    for d in (dirs // 2, dirs - 1):
        os.link(first, os.path.join(r, b"bulk", b"d%03d" % d, b"linked"))
    set_dir_times(os.path.join(r, b"bulk"))
    return Path(os.fsdecode(r))


def set_dir_times(root: str | os.PathLike[str] | bytes, base_ns: int = 1_560_000_000_000_000_000) -> None:
    """Give every directory under root (and root) an explicit mtime, children first."""
    rootb = os.fsencode(root)
    dirs = [rootb] + [os.path.join(rootb, p) for p, st in walk(rootb) if stat.S_ISDIR(st.st_mode)]
    for i, d in enumerate(reversed(dirs)):
        t = base_ns + i * 999_999_937
        os.utime(d, ns=(t, t))


def make_long_path(where: str | os.PathLike[str] | bytes) -> None:
    """Create where/L.../L.../leaf.txt (and leaf_link), more than 5000 bytes deep."""
    os.makedirs(os.fsencode(where))
    fd = os.open(os.fsencode(where), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(LONG_DEPTH):
            os.mkdir(LONG_COMPONENT, dir_fd=fd)
            nfd = os.open(LONG_COMPONENT, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open(b"leaf.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        os.write(leaf, b"more than 4096 bytes from the root\n")
        os.close(leaf)
        os.symlink(b"leaf.txt", b"leaf_link", dir_fd=fd)
    finally:
        os.close(fd)


def chown_tree(root: str | os.PathLike[str], uid: int, gid: int) -> None:
    """lchown every entry under root (root included), keeping setuid/setgid bits."""

    def one(name: bytes, dir_fd: int | None) -> None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            # chmod has no dir_fd + no-follow form in Python; go through the fd's /proc path.
            os.chmod(_via(dir_fd, name), stat.S_IMODE(st.st_mode))

    for dir_fd, name, st in _walk_fd(os.fsencode(root)):
        one(name, dir_fd)


def set_times(root: str | os.PathLike[str], base_ns: int = 1_500_000_000_123_456_789) -> None:
    """Give every entry (root included, children before parents) its own mtime in ns.

    small.txt gets a time before 1970 and few_mib.bin one in 2200; the rest are spread over
    years with odd nanoseconds.
    """
    counter = [0]

    def stamp(name: bytes, dir_fd: int | None) -> None:
        i = counter[0] = counter[0] + 1
        t = base_ns + i * 86_400_123_456_789 + (i * 7919) % 1_000_000_000
        if name == b"small.txt":
            t = -315_619_200_987_654_321  # 1960
        elif name == b"few_mib.bin":
            t = 7_258_118_400_000_000_001  # 2200
        os.utime(name, ns=(t, t), dir_fd=dir_fd, follow_symlinks=False)

    def children_first(fd: int) -> None:
        for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    children_first(sub)
                finally:
                    os.close(sub)
            stamp(name, fd)

    rootb = os.fsencode(root)
    if os.path.isdir(rootb) and not os.path.islink(rootb):
        fd = os.open(rootb, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            children_first(fd)
        finally:
            os.close(fd)
    stamp(rootb, None)


# --------------------------------------------------------------------------------------------
# Walking and snapshotting


def _via(dir_fd: int | None, name: bytes) -> bytes:
    """A short path reaching name inside dir_fd, whatever the real path's length."""
    if dir_fd is None:
        return name
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def _walk_fd(root: bytes) -> Iterator[tuple[int | None, bytes, os.stat_result]]:
    """Yield (dir_fd, name, lstat) for root (dir_fd None, name root) and every entry below it.

    Parents come before their children. A dir_fd is valid only until the walk moves on.
    """
    st = os.lstat(root)
    yield None, root, st
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            yield from _walk_dir(fd)
        finally:
            os.close(fd)


def _walk_dir(fd: int) -> Iterator[tuple[int | None, bytes, os.stat_result]]:
    for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        yield fd, name, st
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            try:
                yield from _walk_dir(sub)
            finally:
                os.close(sub)


def walk(root: str | os.PathLike[str] | bytes) -> Iterator[tuple[bytes, os.stat_result]]:
    """Yield (relative path as bytes, lstat) for every entry below root (root itself excluded)."""
    rootb = os.fsencode(root)
    st = os.lstat(rootb)
    if not stat.S_ISDIR(st.st_mode):
        return
    fd = os.open(rootb, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        yield from _walk_rel(fd, b"")
    finally:
        os.close(fd)


def _walk_rel(fd: int, prefix: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
    for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        rel = prefix + name
        yield rel, st
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            try:
                yield from _walk_rel(sub, rel + b"/")
            finally:
                os.close(sub)


KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFSOCK: "socket",
}


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, 4 * MiB):
        h.update(chunk)
    return h.hexdigest()


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out = {}
    for n in names:
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:  # removed in between
                continue
            raise
    return out


@dataclass
class Entry:
    """What a user relies on for one entry of a tree."""

    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int | None = None  # files and symlinks
    sha256: str | None = None  # files
    target: bytes | None = None  # symlinks
    rdev: tuple[int, int] | None = None  # devices
    xattrs: dict[str, bytes] = field(default_factory=dict)
    links: tuple[bytes, ...] | None = None  # all paths of this inode inside the tree, if > 1
    # Not compared for equality: checked as "holes kept" by assert_same_tree.
    blocks: int = 0
    ino: int = 0

    COMPARED = ("kind", "mode", "uid", "gid", "mtime_ns", "size", "sha256", "target", "rdev",
                "xattrs", "links")  # fmt: skip

    @property
    def sparse(self) -> bool:
        return self.kind == "file" and self.size is not None and self.blocks * 512 < self.size // 2


Snapshot = dict[bytes, Entry]


def snapshot(
    root: str | os.PathLike[str] | bytes, *, include_root: bool = True, content: bool = True
) -> Snapshot:
    """Record every entry under root, keyed by relative path (bytes; root itself is b".")."""
    rootb = os.fsencode(root)
    snap: Snapshot = {}
    by_ino: dict[int, list[bytes]] = {}

    def record(rel: bytes, dir_fd: int | None, name: bytes, st: os.stat_result) -> None:
        kind = KINDS.get(stat.S_IFMT(st.st_mode), "unknown")
        e = Entry(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
            blocks=st.st_blocks,
            ino=st.st_ino,
        )
        if kind in ("file", "symlink"):
            e.size = st.st_size
        if kind == "symlink":
            e.target = os.readlink(name, dir_fd=dir_fd)
        if kind in ("chardev", "blockdev"):
            e.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind == "file":
            if content:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
                try:
                    e.sha256 = _hash_fd(fd)
                finally:
                    os.close(fd)
        if kind != "dir" and st.st_nlink > 1:  # any non-directory may have other names
            by_ino.setdefault(st.st_ino, []).append(rel)
        e.xattrs = _xattrs(_via(dir_fd, name))
        snap[rel] = e

    st = os.lstat(rootb)
    if include_root:
        record(b".", None, rootb, st)
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(rootb, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            _snap_dir(fd, b"", record)
        finally:
            os.close(fd)
    for paths in by_ino.values():
        if len(paths) > 1:
            group = tuple(sorted(paths))
            for p in paths:
                snap[p].links = group
    return snap


def _snap_dir(fd: int, prefix: bytes, record: Any) -> None:
    for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        rel = prefix + name
        record(rel, fd, name, st)
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            try:
                _snap_dir(sub, rel + b"/", record)
            finally:
                os.close(sub)


# --------------------------------------------------------------------------------------------
# Comparing

SPARSE_SLACK_BLOCKS = 256  # 128 KiB of 512-byte blocks: filesystem metadata, preallocation


def _show(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in sorted(v.items())) + "}"
    if isinstance(v, int) and not isinstance(v, bool) and v > 0o7777 and v < 1 << 40:
        return str(v)
    return _short(v)


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 120 else s[:100] + f"...({len(s)} chars)"


def _rel(p: bytes) -> str:
    s = repr(p)[2:-1]
    return s if len(s) <= 160 else s[:60] + f"...({len(p)} bytes)..." + s[-60:]


def tree_diff(
    a: Snapshot,
    b: Snapshot,
    *,
    ignore: Iterable[str] = (),
    check_sparse: bool = True,
) -> list[str]:
    """Human-readable differences between two snapshots (empty when they are the same)."""
    ignored = set(ignore)
    fields = [f for f in Entry.COMPARED if f not in ignored]
    out: list[str] = []
    for p in sorted(a.keys() - b.keys()):
        out.append(f"missing in destination: {_rel(p)} ({a[p].kind})")
    for p in sorted(b.keys() - a.keys()):
        out.append(f"extra in destination:   {_rel(p)} ({b[p].kind})")
    for p in sorted(a.keys() & b.keys()):
        ea, eb = a[p], b[p]
        if ea.kind != eb.kind:
            out.append(f"{_rel(p)}: kind {ea.kind} != {eb.kind}")
            continue
        for f in fields:
            va, vb = getattr(ea, f), getattr(eb, f)
            if f == "mode":
                va, vb = (oct(va), oct(vb))
            if va != vb:
                if f == "xattrs":
                    keys = sorted(set(va) | set(vb))
                    det = "; ".join(
                        f"{k}: {_short(va.get(k))} != {_short(vb.get(k))}"
                        for k in keys
                        if va.get(k) != vb.get(k)
                    )
                    out.append(f"{_rel(p)}: xattrs differ: {det}")
                elif f == "links":
                    out.append(
                        f"{_rel(p)}: hard-link group {[_rel(x) for x in va or ()]}"
                        f" != {[_rel(x) for x in vb or ()]}"
                    )
                else:
                    out.append(f"{_rel(p)}: {f} {_show(va)} != {_show(vb)}")
        if check_sparse and "blocks" not in ignored and ea.sparse:
            if eb.blocks > ea.blocks + SPARSE_SLACK_BLOCKS:
                out.append(
                    f"{_rel(p)}: holes not kept: {eb.blocks * 512} bytes allocated in the "
                    f"destination, {ea.blocks * 512} in the source (size {ea.size})"
                )
    return out


def assert_same_tree(
    a: str | os.PathLike[str] | bytes | Snapshot,
    b: str | os.PathLike[str] | bytes | Snapshot,
    *,
    ignore: Iterable[str] = (),
    include_root: bool = True,
    check_sparse: bool = True,
) -> None:
    """Assert that tree b is an exact copy of tree a: same entries, bytes and metadata.

    a and b are paths or snapshots. ignore names Entry fields to leave out (e.g. "uid").
    On failure the message lists every difference, one per line (the first 60).
    """
    sa = a if isinstance(a, dict) else snapshot(a, include_root=include_root)
    sb = b if isinstance(b, dict) else snapshot(b, include_root=include_root)
    if not include_root:
        sa = {k: v for k, v in sa.items() if k != b"."}
        sb = {k: v for k, v in sb.items() if k != b"."}
    diff = tree_diff(sa, sb, ignore=ignore, check_sparse=check_sparse)
    if diff:
        head = f"trees differ in {len(diff)} way(s)"
        if not isinstance(a, dict) and not isinstance(b, dict):
            head += f": {os.fsdecode(a)} -> {os.fsdecode(b)}"
        more = [f"... and {len(diff) - 60} more"] if len(diff) > 60 else []
        raise AssertionError("\n".join([head, *diff[:60], *more]))


def recent_mtimes(snap: Snapshot, since_ns: int) -> Snapshot:
    """Replace every mtime at or after since_ns by -1 ("recent"), in place; returns snap.

    Directories a run creates without a source counterpart (mkdir -p of a destination's parents)
    or changes without copying them (a destination-only directory whose contents mirror
    deleted) carry the time of the run; two runs of different tools agree only on "recent".
    """
    for e in snap.values():
        if e.mtime_ns >= since_ns:
            e.mtime_ns = -1
    return snap


def files_equal_to_source(src: Snapshot, dst: Snapshot) -> list[str]:
    """For a destination left by an interrupted run: problems with files under real names.

    Every regular file in dst whose path is also a regular file in src must have the source's
    content; a partial file under a real name is the one thing that may never be seen.
    Returns the list of violations.
    """
    bad = []
    for p, e in dst.items():
        s = src.get(p)
        if e.kind == "file" and s is not None and s.kind == "file" and e.sha256 != s.sha256:
            bad.append(f"{_rel(p)}: {e.size} bytes under its real name differ from the source's"
                       f" {s.size}")  # fmt: skip
    return bad


def extra_entries(src: Snapshot, dst: Snapshot) -> list[bytes]:
    """Paths present in dst but not in src (temporary files left behind, for instance)."""
    return sorted(dst.keys() - src.keys())


# --------------------------------------------------------------------------------------------
# Scratch areas, users, mounts


def rmtree(path: str | os.PathLike[str] | bytes) -> None:
    """Remove a tree whatever its modes (root ignores them; others get them fixed first)."""
    p = os.fsencode(path)
    if not os.path.lexists(p):
        return
    if not is_root():
        for dirpath, dirnames, _ in os.walk(p):
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if not os.path.islink(full):
                    os.chmod(full, 0o700)
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    else:
        os.unlink(p)


@contextmanager
def mounted_tmpfs(where: str | os.PathLike[str], size: str) -> Iterator[Path]:
    """Mount a tmpfs of the given size (e.g. "2m") on where, unmounted on the way out."""
    os.makedirs(where, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", os.fspath(where)],
                   check=True, timeout=30)  # fmt: skip
    try:
        yield Path(where)
    finally:
        for _ in range(50):
            if subprocess.run(["umount", os.fspath(where)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", os.fspath(where)], check=True)


def tree_size(root: str | os.PathLike[str]) -> int:
    """Bytes in the regular files under root, without following symlinks."""
    return sum(st.st_size for _, st in walk(root) if stat.S_ISREG(st.st_mode))


# --------------------------------------------------------------------------------------------
# The file system failing under a run (test_local_fsfail.py, remote/test_fs_failures.py)

LOCKED_TREE = {
    "ok.txt": "ok\n",
    "secret.txt": "hidden\n",
    "locked/": {"inner.txt": "inner\n", "deeper/": {"d.txt": "d\n"}},
    "sub/": {"b.txt": "b\n"},
}
LOCKED_LINES = ["blit: locked: open: Permission denied", "blit: secret.txt: copy: Permission denied"]
"""What a run reading LOCKED_TREE as nobody prints on stderr, sorted: one line per failure."""


def lock_tree(src: Path, locked: bool = True) -> None:
    """LOCKED_TREE's secret.txt and locked/ unreadable (mode 0), or readable again."""
    os.chmod(src / "secret.txt", 0 if locked else 0o644)
    os.chmod(src / "locked", 0 if locked else 0o755)


def locked_source(root: Path) -> Path:
    """LOCKED_TREE, nobody's, with secret.txt and the directory locked/ unreadable."""
    src = make_tree(root, LOCKED_TREE)
    chown_tree(src, NOBODY, NOBODY)
    lock_tree(src)
    return src


def full_disk_source(src: Path, small: bool = False) -> Path:
    """About 10 MiB: ten 512 KiB files, a tiny one and a 5 MiB one in sub/; `small`: 400 files
    of 16 KiB in two directories instead (a receiver lands those in batches)."""
    if small:
        for i in range(400):
            write_file(src / f"d{i % 2}" / f"s{i:03d}", os.urandom(16 * 1024))
        return src
    for i in range(10):
        write_file(src / f"f{i:02d}.bin", os.urandom(512 * 1024))
    write_file(src / "sub/tiny.txt", b"tiny\n")
    write_file(src / "sub/big.bin", os.urandom(5 * MiB + 5))
    return src


def assert_nothing_partial(src_snap: Snapshot, dst: Path) -> None:
    """Whatever landed in dst is a complete source file; no temporary (nor anything else) left."""
    dst_snap = snapshot(dst, include_root=False) if dst.exists() else {}
    assert not files_equal_to_source(src_snap, dst_snap), files_equal_to_source(src_snap, dst_snap)
    assert not extra_entries(src_snap, dst_snap), extra_entries(src_snap, dst_snap)


def grow_tmpfs(mnt: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", os.fspath(mnt)], check=True, timeout=30)


RACE_SIZE = 256 * MiB
"""A file large enough that its copy is still going when the test changes it."""


def make_big(path: Path, size: int = RACE_SIZE) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(block[i % 13 :] + block[: i % 13])


def bytes_read(pid: int) -> int:
    """What process `pid` has read so far (read, pread, sendfile, copy_file_range alike)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def change_mid_transfer(
    argv: Sequence[str | os.PathLike[str]], path: Path, change: str, *, reader: int | None = None, as_nobody: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """Run blit with argv; once the process that reads `path` (`reader`, else blit itself) has
    read 32 MiB more than when it started, stop it (SIGSTOP), shrink `path` to 3 MiB ("shrink")
    or append 1 MiB to it ("grow"), and let it go on: the change lands mid-file however the
    machine schedules the test (checked: not all of the file had been read). Bounded: 30 s to
    get there, 60 s to end."""
    cmd: list[str] = [BLIT, *map(os.fspath, argv)]
    if as_nobody:
        cmd = [*AS_NOBODY, *cmd]
    base = bytes_read(reader) if reader is not None else 0
    proc = subprocess.Popen(cmd, env=BLIT_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pid = reader if reader is not None else proc.pid
        deadline = time.monotonic() + 30
        while bytes_read(pid) < base + 32 * MiB:
            assert proc.poll() is None, "the run ended before the file could be changed"
            assert time.monotonic() < deadline, "nothing was read for 30 s"
            time.sleep(0.001)
        os.kill(pid, signal.SIGSTOP)
        try:
            assert bytes_read(pid) < base + RACE_SIZE - MiB, "the file was read whole before it could be changed"
            if change == "shrink":
                os.truncate(path, 3 * MiB)
            else:
                with open(path, "ab") as f:
                    f.write(b"x" * MiB)
        finally:
            os.kill(pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


CHANGED_SIZE_LINE = "blit: big.bin: copy: file changed size while being read"


def assert_changed_file_outcome(proc: subprocess.CompletedProcess[bytes], src: Path, dst: Path, change: str) -> None:
    """src/big.bin changed size while `proc` copied it into dst. Shrank: not landed, listed
    (exit 3). Grew: what was read landed, with the mtime the file had when it was listed, which
    is not the source's any more, so a rerun copies it again. No temporary either way."""
    s = os.stat(src / "big.bin")
    if change == "shrink":
        assert proc.returncode == 3, describe_output(proc)
        assert stderr_lines(proc) == [CHANGED_SIZE_LINE], describe_output(proc)
        assert not dst.exists() or os.listdir(dst) == [], os.listdir(dst)
    else:
        assert proc.returncode == 0, describe_output(proc)
        d = os.stat(dst / "big.bin")
        assert d.st_size == RACE_SIZE and d.st_mtime_ns != s.st_mtime_ns, (d, s)
        assert os.listdir(dst) == ["big.bin"]


def assert_json_fatal(proc: subprocess.CompletedProcess[bytes], needle: str) -> dict[str, Any]:
    """A --json run that stopped on a fatal error: exit 1, and its last line, the only summary,
    says why (`fatal` holds `needle`). Returns that summary."""
    assert proc.returncode == 1, describe_output(proc)
    events = json_events(proc)
    summaries = [e for e in events if e["event"] == "summary"]
    assert summaries == [events[-1]], f"one summary, last\n{describe_output(proc)}"
    assert needle in summaries[0]["fatal"] and summaries[0]["exit_code"] == 1, summaries[0]
    return summaries[0]


def make_linked_others(src: Path) -> None:
    """Hard-linked entries that are not regular files (QA: each name landed as an inode of its
    own where rsync -aH links them): a symlink with three names in two directories, a FIFO,
    a socket and a character device (root) with two each, and a plain file pair beside them."""
    import socket

    (src / "sub").mkdir(parents=True)
    os.symlink("target", src / "sl")
    os.link(src / "sl", src / "sl2", follow_symlinks=False)
    os.link(src / "sl", src / "sub" / "sl3", follow_symlinks=False)
    os.mkfifo(src / "fifo")
    os.link(src / "fifo", src / "sub" / "fifo2")
    (src / "new").mkdir()  # a group all of whose names are in one directory new at the destination
    os.mkfifo(src / "new" / "fa")
    os.link(src / "new" / "fa", src / "new" / "fb")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(src / "sock"))
    os.link(src / "sock", src / "sock2")
    if os.geteuid() == 0:
        os.mknod(src / "null", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
        os.link(src / "null", src / "sub" / "null2")
    (src / "f").write_bytes(b"data\n")
    os.link(src / "f", src / "f2")
    set_times(src)


def link_groups(root: Path) -> list[list[str]]:
    """The names of each inode with several below root (non-directories), sorted."""
    by_ino: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                by_ino.setdefault(st.st_ino, []).append(os.path.relpath(p, root))
    return sorted(sorted(g) for g in by_ino.values())


# --- JSON Schema (the subset schemas/*.schema.json use) -----------------------------------------


def _type_ok(value: Any, t: str) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "null": value is None,
    }[t]


def schema_matches(value: Any, schema: dict[str, Any]) -> bool:
    """Whether `value` is valid under `schema`: type, const, enum, required, properties,
    additionalProperties (false only) and items."""
    t = schema.get("type")
    if t is not None and not any(_type_ok(value, x) for x in ([t] if isinstance(t, str) else t)):
        return False
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, dict):
        if any(k not in value for k in schema.get("required", ())):
            return False
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False and any(k not in props for k in value):
            return False
        for k, sub in props.items():
            if k in value and not schema_matches(value[k], sub):
                return False
    if isinstance(value, list) and "items" in schema:
        return all(schema_matches(v, schema["items"]) for v in value)
    return True


def assert_one_branch(schema: dict[str, Any], value: Any) -> None:
    """Exactly one branch of the schema's oneOf accepts `value`."""
    hits = [b for b in schema["oneOf"] if schema_matches(value, b)]
    assert len(hits) == 1, f"{len(hits)} schema branches accept {value}"


def load_schema(name: str) -> dict[str, Any]:
    """schemas/NAME from the repository."""
    return json.loads((Path(__file__).resolve().parents[1] / "schemas" / name).read_text())  # type: ignore[no-any-return]

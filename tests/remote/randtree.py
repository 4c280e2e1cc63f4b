"""Seeded random trees for differential tests (blit against rsync -aHXS as the oracle).

make_random_tree(root, seed) builds a small tree (tens to a few hundred entries) with every kind
of entry blit carries: files of edge sizes (0, 1, 4095, 4096, 65537, a few MiB), sparse files
(holes at the start, middle, end), names that are not UTF-8 or hold spaces, newlines and
backslashes, symlinks (relative, absolute, dangling, to directories), hard-link groups (one
directory, across directories), empty and deep directories, user.* xattrs, odd modes (0o000,
setgid directories, 0o4755), owners other than root, FIFOs, sockets, devices (as root), and
mtimes with nanoseconds, before 1970 too. The same seed builds the same tree.

diverge_dest(dst, seed) changes a copy of such a tree the way a stale mirror destination
differs: extra entries, another kind at the same name, same size and mtime but other bytes,
shorter and longer files, other modes, owners and xattrs, broken hard links.
"""

from __future__ import annotations

import os
import random
import socket
import stat
import time

MiB = 1 << 20

NAME_POOL: list[bytes] = [
    b"caf\xe9", b"\x80\xff\xfe", b"bin\x81ary\xc0", b"with space", b" lead", b"trail ",
    b"new\nline", b"back\\slash", b"-dash", b".hidden", b"tab\tname", b"glob*?[x]",
    b"colon:name", "naïve 日本".encode(), b"x" * 200,
]  # fmt: skip

SIZES = [0, 1, 4095, 4096, 4097, 65537, 100_000]
SPECIAL_MODES_FILE = [0o000, 0o4755, 0o2755, 0o600, 0o444, 0o755, 0o640, 0o1644]
SPECIAL_MODES_DIR = [0o2755, 0o700, 0o555, 0o1777, 0o711]


def _mtime(rng: random.Random) -> int:
    """An mtime in ns: usually after 2000, sometimes before 1970, always with odd ns."""
    if rng.random() < 0.15:
        return -rng.randrange(1, 2_000_000_000) * 1_000_000_000 - rng.randrange(1, 1_000_000_000)
    return rng.randrange(946_684_800, 4_000_000_000) * 1_000_000_000 + rng.randrange(1, 1_000_000_000)


class _Names:
    """Unique names per directory, drawn from the odd pool or plain ones."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: dict[bytes, set[bytes]] = {}
        self.n = 0

    def new(self, parent: bytes) -> bytes:
        used = self.used.setdefault(parent, set())
        while True:
            self.n += 1
            if self.rng.random() < 0.3:
                name = self.rng.choice(NAME_POOL) + (b"%d" % self.n if self.rng.random() < 0.5 else b"")
            else:
                name = b"e%03d" % self.n
            if name not in used and not os.path.lexists(os.path.join(parent, name)):
                used.add(name)
                return name


def _write_sparse(path: bytes, rng: random.Random, where: str) -> None:
    size = rng.choice([1, 2, 3]) * MiB + rng.randrange(0, 5000)
    with open(path, "wb") as f:
        if where == "start":
            f.seek(size - 9000)
            f.write(rng.randbytes(9000))
        elif where == "middle":
            f.write(rng.randbytes(5000))
            f.seek(size - 7000)
            f.write(rng.randbytes(7000))
        else:  # end
            f.write(rng.randbytes(6000))
            f.truncate(size)


def make_random_tree(root: str | os.PathLike[str] | bytes, seed: int, *, max_entries: int = 150) -> None:
    rng = random.Random(seed)
    r = os.fsencode(root)
    os.makedirs(r)
    names = _Names(rng)
    owners = os.geteuid() == 0

    # Directories: a random tree, one chain at least 7 deep.
    dirs: list[bytes] = [r]
    chain = r
    for _ in range(7):
        chain = os.path.join(chain, names.new(chain))
        os.mkdir(chain)
        dirs.append(chain)
    for _ in range(rng.randrange(3, 15)):
        parent = rng.choice(dirs)
        d = os.path.join(parent, names.new(parent))
        os.mkdir(d)
        dirs.append(d)
    files: list[bytes] = []
    n_entries = rng.randrange(20, max_entries)
    big_left = 1 if rng.random() < 0.5 else 0
    for _ in range(n_entries):
        parent = rng.choice(dirs)
        p = os.path.join(parent, names.new(parent))
        roll = rng.random()
        if roll < 0.45:
            size = rng.choice(SIZES)
            if big_left and rng.random() < 0.1:
                size, big_left = rng.randrange(2 * MiB, 4 * MiB), big_left - 1
            with open(p, "wb") as f:
                f.write(rng.randbytes(size))
            files.append(p)
        elif roll < 0.52:
            _write_sparse(p, rng, rng.choice(["start", "middle", "end"]))
            files.append(p)
        elif roll < 0.62:
            kind = rng.choice(["rel", "abs", "dangling", "dir", "file"])
            if kind == "rel" and files:
                target = os.path.relpath(rng.choice(files), parent)
            elif kind == "abs":
                target = rng.choice([b"/etc/hostname", b"/nonexistent/x", rng.choice(dirs)])
            elif kind == "dir":
                target = os.path.relpath(rng.choice(dirs), parent)
            elif kind == "file" and files:
                target = rng.choice(files)
            else:
                target = b"does/not/" + names.new(b"//")
            os.symlink(target, p)
        elif roll < 0.72 and files:
            other = rng.choice(files)
            if rng.random() < 0.5:  # same directory as its first member
                p = os.path.join(os.path.dirname(other), names.new(os.path.dirname(other)))
            os.link(other, p)
        elif roll < 0.78:
            special = rng.choice(["fifo", "fifo", "socket", "device"])
            if special == "socket":
                # bind() takes at most 107 bytes: a short name through the directory's fd.
                dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    with socket.socket(socket.AF_UNIX) as sk:
                        sk.bind(b"/proc/self/fd/%d/.sock" % dfd)
                    os.rename(b".sock", os.path.basename(p), src_dir_fd=dfd, dst_dir_fd=dfd)
                finally:
                    os.close(dfd)
            elif special == "device" and owners:
                kind = rng.choice([stat.S_IFCHR, stat.S_IFBLK])
                os.mknod(p, kind | 0o640, os.makedev(rng.choice([1, 7]), rng.randrange(0, 300)))
            else:
                os.mkfifo(p, rng.choice([0o644, 0o600]))
        elif roll < 0.85:
            os.mkdir(p)  # stays empty unless a later entry lands in it
            dirs.append(p)
        else:
            with open(p, "wb") as f:
                f.write(rng.randbytes(rng.randrange(0, 300)))
            files.append(p)
    # Metadata: xattrs, modes and owners on a few of each.
    for p in rng.sample(files, min(len(files), rng.randrange(0, 8))) + rng.sample(dirs[1:], 2):
        for i in range(rng.randrange(1, 4)):
            os.setxattr(p, f"user.k{i}", rng.randbytes(rng.randrange(0, 100)))
    if owners:
        for p in rng.sample(files, min(len(files), 4)) + rng.sample(dirs[1:], 1):
            os.chown(p, rng.choice([1234, 0, 65534]), rng.choice([5678, 0, 65534]))
    for p in rng.sample(files, min(len(files), 6)):
        os.chmod(p, rng.choice(SPECIAL_MODES_FILE))
    for d in rng.sample(dirs[1:], 3):
        os.chmod(d, rng.choice(SPECIAL_MODES_DIR))
    set_random_times(r, rng)


def set_random_times(root: bytes, rng: random.Random) -> None:
    """Every entry (root too) gets a random mtime, children before their directory."""

    def walk(d: bytes) -> None:
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if os.path.isdir(p) and not os.path.islink(p):
                walk(p)
            t = _mtime(rng)
            os.utime(p, ns=(t, t), follow_symlinks=False)

    walk(root)
    t = _mtime(rng)
    os.utime(root, ns=(t, t))


def _entries(root: bytes) -> list[bytes]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out += [os.path.join(dirpath, n) for n in dirnames + filenames]
    return sorted(out)


def diverge_dest(dst: str | os.PathLike[str] | bytes, seed: int) -> None:
    """Make dst (a copy of a random tree) differ from its source as a stale mirror target."""
    rng = random.Random(seed * 7919 + 1)
    r = os.fsencode(dst)
    start = time.time_ns() - 2_000_000_000
    names = _Names(rng)
    entries = _entries(r)
    rng.shuffle(entries)
    changed: list[bytes] = []
    for p in entries[: max(3, len(entries) // 4)]:
        if any(p.startswith(c + b"/") for c in changed) or not os.path.lexists(p):
            continue
        st = os.lstat(p)
        parent = os.path.dirname(p)
        keep = st.st_mtime_ns
        roll = rng.random()
        if stat.S_ISREG(st.st_mode) and roll < 0.25 and st.st_size:
            # Same size, same mtime, other bytes: only --checksum may notice.
            with open(p, "r+b") as f:
                f.write(bytes(b ^ 0xFF for b in f.read(1)))
            os.utime(p, ns=(keep, keep))
        elif stat.S_ISREG(st.st_mode) and roll < 0.45:
            with open(p, "r+b") as f:
                f.truncate(max(0, st.st_size + rng.choice([-1, 1, 4096, -st.st_size])))
            os.utime(p, ns=(keep, keep))
        elif stat.S_ISREG(st.st_mode) and roll < 0.55:
            os.chmod(p, 0o600)
            os.setxattr(p, "user.stale", b"only in dst")
        elif roll < 0.85:
            # Another kind at the same name.
            if stat.S_ISDIR(st.st_mode):
                _rm(p)
                if rng.random() < 0.5:
                    with open(p, "wb") as f:
                        f.write(b"was a directory")
                else:
                    os.symlink(b"somewhere", p)
            else:
                os.unlink(p)
                k = rng.choice(["dir", "file", "symlink", "fifo"])
                if k == "dir":
                    os.makedirs(os.path.join(p, b"inner", b"deeper"))
                    with open(os.path.join(p, b"inner", b"f"), "wb") as f:
                        f.write(b"stale inside")
                elif k == "file":
                    with open(p, "wb") as f:
                        f.write(b"was something else")
                elif k == "symlink":
                    os.symlink(b"../elsewhere", p)
                else:
                    os.mkfifo(p)
            changed.append(p)
        else:
            # Extra entries beside it.
            e = os.path.join(parent, names.new(parent))
            if rng.random() < 0.5:
                os.makedirs(os.path.join(e, b"sub"))
                with open(os.path.join(e, b"sub", b"x"), "wb") as f:
                    f.write(b"extra")
            else:
                with open(e, "wb") as f:
                    f.write(rng.randbytes(rng.randrange(0, 5000)))
    # Metadata only, on entries of every kind left as they were: owner (uid, gid or both),
    # mode, xattrs; content and mtime stay, so the entry is up to date but for these.
    for p in entries[-8:]:
        if not os.path.lexists(p) or any(p.startswith(c + b"/") or p == c for c in changed):
            continue
        st = os.lstat(p)
        what = rng.choice(["uid", "gid", "both", "mode", "xattr"])
        if what in ("uid", "gid", "both") and os.geteuid() == 0:
            uid = 4321 if what != "gid" else st.st_uid
            gid = 8765 if what != "uid" else st.st_gid
            os.chown(p, uid, gid, follow_symlinks=False)
        elif what == "mode" and not stat.S_ISLNK(st.st_mode):
            os.chmod(p, stat.S_IMODE(st.st_mode) ^ 0o027)
        elif what == "xattr" and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            os.setxattr(p, "user.k0", b"changed in dst")
        os.utime(p, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)
    # What was made or changed here gets a time of its own, not the time of this run: a copy
    # made within the same second may keep the time rsync ran at (rsync compares directory
    # times to the second), and the trees compared later come from separate copies of this one.
    end = time.time_ns() + 2_000_000_000
    for dirpath, dirnames, filenames in os.walk(r, topdown=False):
        for p in [os.path.join(dirpath, n) for n in filenames + dirnames] + ([dirpath] if dirpath == r else []):
            if start <= os.lstat(p).st_mtime_ns <= end:
                t = _mtime(rng)
                os.utime(p, ns=(t, t), follow_symlinks=False)


def _rm(p: bytes) -> None:
    for dirpath, dirnames, filenames in os.walk(p, topdown=False):
        for n in filenames:
            os.unlink(os.path.join(dirpath, n))
        for n in dirnames:
            q = os.path.join(dirpath, n)
            os.unlink(q) if os.path.islink(q) else os.rmdir(q)
    os.rmdir(p)

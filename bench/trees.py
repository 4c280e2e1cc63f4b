"""Generated trees: make them fast and deterministically, change 1% of them, compare two trees.

A tree holds ``big_files`` files of ``big_size`` bytes at its root (``big00``, ``big01``, ...)
and ``files`` files of ``file_size`` bytes spread ``per_dir`` to a directory
(``d0000/f0000`` ...). Contents are slices of a pseudo-random pool drawn from a seeded
``random.Random``, at offsets that differ from file to file, so no two neighbouring files are
equal and nothing is sparse or trivially compressible. Empty files are made with one
``mknod`` each. Files are 0644, directories 0755, owned by whoever runs the bench.

Removal and copies outside the timing use ``rm -rf`` and ``cp -a`` (C, fast). This module must
not time anything.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from dataclasses import dataclass

POOL_SIZE = 8 << 20  # pseudo-random bytes that every file is cut from
_CHUNK = 8 << 20
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_O_REWRITE = os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC
BASE_MTIME_NS = 1_704_067_200_123_456_789  # 2024-01-01 00:00:00.123456789 UTC


@dataclass(frozen=True)
class TreeSpec:
    """The shape of one generated source tree."""

    name: str
    files: int = 0
    file_size: int = 0
    per_dir: int = 500
    big_files: int = 0
    big_size: int = 0
    seed: int = 1

    @property
    def total_bytes(self) -> int:
        return self.files * self.file_size + self.big_files * self.big_size

    @property
    def dirs(self) -> int:
        return -(-self.files // self.per_dir) if self.files else 0

    def describe(self) -> str:
        parts = []
        if self.big_files:
            parts.append(f"{self.big_files:,} x {human_bytes(self.big_size)}")
        if self.files:
            size = "empty" if self.file_size == 0 else human_bytes(self.file_size)
            parts.append(f"{self.files:,} x {size} ({self.per_dir:,} per directory)")
        return " + ".join(parts) + f", {human_bytes(self.total_bytes)} in all"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" or n == int(n) else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _pool(seed: int) -> memoryview:
    return memoryview(random.Random(seed).randbytes(POOL_SIZE))


def _offset(index: int, size: int, salt: int = 0) -> int:
    span = POOL_SIZE - size
    return ((index + 1) * 4099 + salt * 7919) % span if span > 0 else 0


def _write(path: str, pool: memoryview, size: int, offset: int, flags: int = _O_NEW) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        done = 0
        while done < size:
            n = min(_CHUNK, size - done, POOL_SIZE - offset)
            done += os.write(fd, pool[offset : offset + n])
            offset = (offset + n) % POOL_SIZE
    finally:
        os.close(fd)


def small_path(spec: TreeSpec, index: int) -> str:
    return f"d{index // spec.per_dir:04d}/f{index % spec.per_dir:04d}"


def mtime_ns(index: int) -> int:
    """The generated mtime of small file ``index``: in the past, with a nanosecond part."""
    return BASE_MTIME_NS + index * 1_000_003


def generate(spec: TreeSpec, root: str) -> None:
    """Create the tree ``spec`` at ``root`` (which must not exist).

    Every mtime is set, deterministically and in the past (files from ``BASE_MTIME_NS`` on,
    about a millisecond apart, with nanosecond parts; directories after their contents), as
    in a real tree that was not written a moment ago.
    """
    os.mkdir(root, 0o755)
    pool = _pool(spec.seed)
    for i in range(spec.big_files):
        path = f"{root}/big{i:02d}"
        _write(path, pool, spec.big_size, _offset(i, 0, salt=spec.seed + 1))
        t = BASE_MTIME_NS - (i + 1) * 3_600_000_000_007
        os.utime(path, ns=(t, t))
    size = spec.file_size
    for d in range(spec.dirs):
        dpath = f"{root}/d{d:04d}"
        os.mkdir(dpath, 0o755)
        first = d * spec.per_dir
        last = min(first + spec.per_dir, spec.files)
        for i in range(first, last):
            fpath = f"{dpath}/f{i - first:04d}"
            if size == 0:
                os.mknod(fpath, stat.S_IFREG | 0o644)
            else:
                _write(fpath, pool, size, _offset(i, size))
            t = mtime_ns(i)
            os.utime(fpath, ns=(t, t))
        t = mtime_ns(last) + 500_000_011
        os.utime(dpath, ns=(t, t))
    t = mtime_ns(spec.files) + 900_000_013
    os.utime(root, ns=(t, t))


def mutate(spec: TreeSpec, root: str, fraction: float = 0.01) -> int:
    """Rewrite ``fraction`` of the small files in place (same size, new content, mtime + 100 s).

    Files are picked evenly across the tree; directories are left as they were (an in-place
    rewrite does not touch them). Returns how many files were changed.
    """
    count = max(1, round(spec.files * fraction)) if spec.files else 0
    pool = _pool(spec.seed + 1000)
    step = spec.files / count if count else 1
    for k in range(count):
        index = int(k * step)
        path = f"{root}/{small_path(spec, index)}"
        st = os.lstat(path)
        _write(path, pool, spec.file_size, _offset(index, spec.file_size, salt=7), _O_REWRITE)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 100_000_000_000))
    return count


def remove(path: str) -> None:
    """Remove a tree (or file) if it exists."""
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--", path], check=True)
        if os.path.lexists(path):  # pragma: no cover - rm failing silently
            shutil.rmtree(path)


def clone(src: str, dst: str) -> None:
    """Exact copy of src at dst (which must not exist), outside any timing: ``cp -a``."""
    subprocess.run(["cp", "-a", "--", src, dst], check=True)


def sync() -> None:
    os.sync()


# -- comparison ---------------------------------------------------------------------------

STRUCTURAL = "structure"  # missing/extra entries, type, size or content: the copy is wrong
METADATA = "metadata"  # mode, owner, mtime, symlink target


@dataclass
class Difference:
    kind: str  # STRUCTURAL or METADATA
    path: str
    what: str

    @property
    def attribute(self) -> str:
        """What differs, in a word: missing, extra, type, size, content, mode, owner, mtime..."""
        word = self.what.split()[0]
        return {"symlink": "symlink target", "owner": "owner"}.get(word, word)

    def __str__(self) -> str:
        return f"{self.path or '.'}: {self.what}"


def compare(src: str, dst: str, *, content: bool, limit: int = 20) -> list[Difference]:
    """Compare ``dst`` with ``src`` entry by entry (lstat; symlinks never followed).

    Checks names, types, sizes, permission bits, owner and group, mtime in nanoseconds (files,
    directories and symlinks, including the root) and symlink targets; with ``content``, the
    bytes of every regular file. Stops after ``limit`` differences.
    """
    diffs: list[Difference] = []

    def add(kind: str, rel: bytes, what: str) -> bool:
        diffs.append(Difference(kind, os.fsdecode(rel), what))
        return len(diffs) >= limit

    def walk(rel: bytes) -> bool:
        a = os.fsencode(src) + (b"/" + rel if rel else b"")
        b = os.fsencode(dst) + (b"/" + rel if rel else b"")
        try:
            sa, sb = os.lstat(a), os.lstat(b)
        except FileNotFoundError:
            return add(STRUCTURAL, rel, "missing in destination")
        ta, tb = stat.S_IFMT(sa.st_mode), stat.S_IFMT(sb.st_mode)
        if ta != tb:
            return add(STRUCTURAL, rel, f"type {ta:o} became {tb:o}")
        if stat.S_ISREG(sa.st_mode):
            if sa.st_size != sb.st_size:
                return add(STRUCTURAL, rel, f"size {sa.st_size} became {sb.st_size}")
            if content and not _same_bytes(a, b):
                if add(STRUCTURAL, rel, "content differs"):
                    return True
        elif stat.S_ISLNK(sa.st_mode) and os.readlink(a) != os.readlink(b):
            if add(METADATA, rel, "symlink target differs"):
                return True
        if stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
            if add(METADATA, rel, f"mode {stat.S_IMODE(sa.st_mode):o} became "
                   f"{stat.S_IMODE(sb.st_mode):o}"):
                return True
        if (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
            if add(METADATA, rel, "owner or group differs"):
                return True
        if sa.st_mtime_ns != sb.st_mtime_ns:
            if add(METADATA, rel, f"mtime {sa.st_mtime_ns} became {sb.st_mtime_ns}"):
                return True
        if stat.S_ISDIR(sa.st_mode):
            na, nb = set(os.listdir(a)), set(os.listdir(b))
            for name in sorted(nb - na):
                if add(STRUCTURAL, rel + b"/" + name if rel else name, "extra in destination"):
                    return True
            for name in sorted(na):
                if walk(rel + b"/" + name if rel else name):
                    return True
        return False

    walk(b"")
    return diffs


def _same_bytes(a: bytes, b: bytes) -> bool:
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True

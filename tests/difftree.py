"""Differential testing of the local engine against rsync: seeded random trees, random changes,
and blit's result compared entry by entry with `rsync -aHAXS --numeric-ids` (`--delete` for
mirror) run from the same source in the same form.

`make_random_tree(root, seed, ...)` builds the same tree for the same seed wherever it is built
(names, bytes, holes, modes, owners, xattrs, hard-link groups, times), so a destination in a given
state can be built twice, once for each tool. `mutate_tree` changes a tree the way a user's next
day does (new, changed, deleted and retyped entries, new modes, links broken and made).
`run_case` runs one scenario in both tools and returns the differences as text lines.

Run many seeds from the command line (as root, with rsync installed):
    python tests/difftree.py --seeds 0-199 --scratch /tmp/blit-fuzz
tests/test_local_differential.py keeps a few seeds as a regression guard.
"""

from __future__ import annotations

import os
import random
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import (  # noqa: E402
    ACL_DEFAULT,
    SPARSE_SLACK_BLOCKS,
    ACL_FILE,
    BLIT,
    BLIT_ENV,
    Snapshot,
    describe_output,
    is_root,
    rmtree,
    snapshot,
    summary_of,
    tree_diff,
)

MiB = 1024 * 1024
OWNERS = [(0, 0), (0, 0), (1234, 5678), (65534, 65534), (0, 5678)]
FILE_MODES = [0o644, 0o644, 0o600, 0o755, 0o444, 0o000, 0o4755, 0o2755, 0o640, 0o1644]
DIR_MODES = [0o755, 0o755, 0o700, 0o555, 0o000, 0o2775, 0o1777, 0o711]
SIZES = [0, 1, 4095, 4096, 4097, 65537, 100, 12_345]
# Every time this module sets lies before this (2019-09) or after FUTURE; runs happen in between,
# so a time in that window can only be "set by the run" (directories a tool had to touch).
PAST_NS = 1_568_000_000_000_000_000
FUTURE_NS = 7_258_118_400_000_000_001  # 2200


def _name(rng: random.Random, taken: set[bytes]) -> bytes:
    """A fresh name for one directory: mostly plain, sometimes hostile."""
    while True:
        k = rng.random()
        n = rng.randrange(10_000)
        if k < 0.55:
            name = b"f%d" % n
        elif k < 0.62:
            name = b"with space %d " % n
        elif k < 0.67:
            name = b"new\nline%d" % n
        elif k < 0.74:
            name = b"caf\xe9\xff%d" % n  # not UTF-8
        elif k < 0.78:
            name = ("naïve 日本%d" % n).encode()
        elif k < 0.82:
            name = b"-dash%d" % n
        elif k < 0.86:
            name = b".hidden%d" % n
        elif k < 0.89:
            name = (b"n%d" % n).ljust(255, b"x")
        elif k < 0.92:
            name = b"glob*?[%d]\\" % n
        elif k < 0.95:
            name = b".blit-%d.tmp" % n  # looks like blit's temporary names
        else:
            name = b"ctl\x01\x7f%d" % n
        if name not in taken:
            taken.add(name)
            return name


def _rand_time(rng: random.Random) -> int:
    k = rng.random()
    if k < 0.08:
        return -rng.randrange(1, 2_000_000_000) * 1_000_000_000 - rng.randrange(1_000_000_000)
    if k < 0.12:
        return FUTURE_NS + rng.randrange(10**18)
    if k < 0.15:
        return rng.randrange(0, 10**9)  # within the first second of 1970
    return rng.randrange(PAST_NS - 10**18, PAST_NS)


def _write_sparse(path: bytes, rng: random.Random) -> None:
    size = rng.choice([1, 2, 4, 8]) * MiB + rng.choice([0, 1, 4095, 4096])
    shape = rng.choice(["start", "middle", "end", "all", "many"])
    with open(path, "wb") as f:
        if shape == "start":
            f.seek(size - 8192)
            f.write(rng.randbytes(8192))
        elif shape == "middle":
            f.write(rng.randbytes(5000))
            f.seek(size - 3000)
            f.write(rng.randbytes(3000))
        elif shape == "end":
            f.write(rng.randbytes(12_000))
            f.truncate(size)
        elif shape == "all":
            f.truncate(size)
        else:
            for off in range(0, size, 256 * 1024):
                if rng.random() < 0.3:
                    f.seek(off)
                    f.write(rng.randbytes(rng.choice([1, 4096, 70_000])))
            f.truncate(size)


@dataclass
class _State:
    rng: random.Random
    root: bytes
    outside: bytes
    sentinel: bytes
    privileged: bool
    dirs: list[bytes]  # relative paths, b"" is the root
    files: list[bytes]
    big_left: int = 2


def _j(st: _State, rel: bytes) -> bytes:
    return os.path.join(st.root, rel) if rel else st.root


def _taken(st: _State, d: bytes) -> set[bytes]:
    return set(os.listdir(_j(st, d)))


def _add_entry(st: _State, d: bytes, name: bytes, kind: str | None = None) -> None:
    rng = st.rng
    rel = os.path.join(d, name) if d else name
    p = _j(st, rel)
    if kind is None:
        kind = rng.choices(
            ["file", "dir", "symlink", "sparse", "big", "hardlink", "outside_link", "fifo",
             "dev", "socket"],
            [40, 14, 14, 3, 1, 8, 2, 2, 2, 1],
        )[0]  # fmt: skip
    if kind == "big" and st.big_left <= 0:
        kind = "file"
    if kind in ("dev", "socket") and not st.privileged:
        kind = "fifo"
    if kind == "hardlink" and not st.files:
        kind = "file"
    if kind == "file":
        with open(p, "wb") as f:
            f.write(rng.randbytes(rng.choice(SIZES)))
        st.files.append(rel)
    elif kind == "big":
        st.big_left -= 1
        with open(p, "wb") as f:
            f.write(rng.randbytes(rng.choice([1, 2, 3]) * MiB + rng.randrange(5000)))
        st.files.append(rel)
    elif kind == "sparse":
        _write_sparse(p, rng)
        st.files.append(rel)
    elif kind == "dir":
        os.mkdir(p)
        st.dirs.append(rel)
    elif kind == "symlink":
        k = rng.random()
        if k < 0.35 and (st.files or st.dirs):
            to = rng.choice(st.files + st.dirs)
            target = os.path.relpath(to or b".", d or b".")
        elif k < 0.55:
            target = os.path.join(st.sentinel, rng.choice([b"file", b"dir", b"missing"]))
        elif k < 0.75:
            target = b"dangling/" + name
        elif k < 0.85 and st.dirs:
            target = os.path.relpath(rng.choice(st.dirs) or b".", d or b".")
        else:
            target = rng.choice([b".", b"..", b"../../..", name, b"x" * 300])
        os.symlink(target, p)
    elif kind == "hardlink":
        os.link(_j(st, rng.choice(st.files)), p)
        st.files.append(rel)
    elif kind == "outside_link":
        with open(p, "wb") as f:
            f.write(rng.randbytes(rng.choice(SIZES)))
        os.link(p, os.path.join(st.outside, b"%d" % rng.randrange(10**9)))
        st.files.append(rel)
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "dev":
        if rng.random() < 0.5:
            os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        else:
            os.mknod(p, 0o660 | stat.S_IFBLK, os.makedev(7, 200 + rng.randrange(50)))
    elif kind == "socket":
        if len(p) > 100:  # sun_path is 108 bytes
            os.mkfifo(p)
        else:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.bind(p)
            finally:
                s.close()


def _finish_meta(st: _State, rels: list[bytes] | None = None) -> None:
    """Owners, modes and xattrs on the given entries (all by default), then every time."""
    rng = st.rng
    entries = rels if rels is not None else _all_rel(st.root)
    for rel in entries:
        p = _j(st, rel)
        s = os.lstat(p)
        if stat.S_ISLNK(s.st_mode):
            if st.privileged and rng.random() < 0.2:
                os.lchown(p, *rng.choice(OWNERS))
            continue
        if rng.random() < 0.15:
            try:
                os.setxattr(p, b"user.k%d" % rng.randrange(3), rng.randbytes(rng.choice([0, 5, 300])))
            except OSError:
                pass  # sockets, fifos and devices take no user.* xattrs
        if st.privileged and rng.random() < 0.02 and (stat.S_ISREG(s.st_mode) or stat.S_ISDIR(s.st_mode)):
            os.setxattr(p, "system.posix_acl_access", ACL_FILE)
            if stat.S_ISDIR(s.st_mode) and rng.random() < 0.5:
                os.setxattr(p, "system.posix_acl_default", ACL_DEFAULT)
        if st.privileged and rng.random() < 0.3:
            os.lchown(p, *rng.choice(OWNERS))
        if stat.S_ISDIR(s.st_mode):
            mode = rng.choice(DIR_MODES) if rng.random() < 0.3 else 0o755
        elif stat.S_ISREG(s.st_mode):
            mode = rng.choice(FILE_MODES) if rng.random() < 0.4 else 0o644
        else:
            mode = rng.choice([0o600, 0o644, 0o666])
        if s.st_nlink > 1 and stat.S_ISREG(s.st_mode):
            mode = stat.S_IMODE(s.st_mode)  # keep one mode per group, set once
            if mode == 0o644 and rng.random() < 0.5:
                mode = rng.choice(FILE_MODES)
        os.chmod(p, mode)
    stamp_times(st.root, rng, only_recent=rels is not None)


def _all_rel(root: bytes, prefix: bytes = b"") -> list[bytes]:
    """Every entry below root, relative, parents first, in name order (deterministic)."""
    out = []
    here = os.path.join(root, prefix) if prefix else root
    for n in sorted(os.listdir(here)):
        rel = os.path.join(prefix, n) if prefix else n
        out.append(rel)
        if os.path.isdir(os.path.join(root, rel)) and not os.path.islink(os.path.join(root, rel)):
            out.extend(_all_rel(root, rel))
    return out


def stamp_times(root: bytes, rng: random.Random, only_recent: bool = False) -> None:
    """Give entries (children before parents, root last) a random time; with only_recent, only
    those whose time lies in the run window (touched since they were last stamped)."""

    def one(path: bytes) -> None:
        s = os.lstat(path)
        if only_recent and not (PAST_NS <= s.st_mtime_ns < FUTURE_NS):
            return
        t = _rand_time(rng)
        os.utime(path, ns=(t, t), follow_symlinks=False)

    for rel in reversed(_all_rel(root)):  # children before their parents
        one(os.path.join(root, rel))
    one(root)


def make_random_tree(
    root: str | os.PathLike[str] | bytes,
    seed: int,
    *,
    outside: str | os.PathLike[str] | bytes,
    sentinel: str | os.PathLike[str] | bytes,
    privileged: bool | None = None,
    entries: int | None = None,
) -> Path:
    """Build a random tree of up to a few hundred entries (the same one for the same seed).

    outside: a directory beside root that receives the other names of hard-link groups only
    partly inside the tree. sentinel: absolute symlink targets point into it (a shared, fixed
    path, so two builds of one seed in different places carry the same targets).
    """
    if privileged is None:
        privileged = is_root()
    rng = random.Random(seed)
    st = _State(rng, os.fsencode(root), os.fsencode(outside), os.fsencode(sentinel), privileged, [b""], [])
    os.makedirs(st.root)
    os.makedirs(st.outside, exist_ok=True)
    # A chain 7 deep, then random entries in random directories.
    d = b""
    for depth in range(rng.randint(6, 8)):
        name = b"deep%d" % depth
        d = os.path.join(d, name) if d else name
        os.mkdir(_j(st, d))
        st.dirs.append(d)
    for _ in range(entries if entries is not None else rng.randint(40, 220)):
        parent = rng.choice(st.dirs)
        _add_entry(st, parent, _name(rng, _taken(st, parent)))
    _finish_meta(st)
    return Path(os.fsdecode(st.root))


def mutate_tree(
    root: str | os.PathLike[str] | bytes,
    seed: int,
    *,
    outside: str | os.PathLike[str] | bytes,
    sentinel: str | os.PathLike[str] | bytes,
    changes: int = 30,
    privileged: bool | None = None,
    as_destination: bool = False,
) -> None:
    """Change a tree at random: content, size, time, mode, owner, xattrs, kind; add and delete;
    break and make hard links. as_destination also makes entries newer than the source's and
    directories read-only (0o555), as a stale destination may have them."""
    if privileged is None:
        privileged = is_root()
    rng = random.Random(seed)
    st = _State(rng, os.fsencode(root), os.fsencode(outside), os.fsencode(sentinel), privileged, [b""], [])
    for rel in _all_rel(st.root):
        s = os.lstat(_j(st, rel))
        if stat.S_ISDIR(s.st_mode):
            st.dirs.append(rel)
        elif stat.S_ISREG(s.st_mode):
            st.files.append(rel)
    touched: list[bytes] = []
    for _ in range(changes):
        everything = [r for r in st.dirs + st.files if r]
        # (No change that keeps size and time: both tools skip such a file, and a hard-link
        # group then lands with the content of whichever member each tool met first.)
        op = rng.choice(["content", "size", "time", "meta", "add", "add", "delete", "retype",
                         "unlink_group", "link"])  # fmt: skip
        if op in ("content", "size", "time", "meta", "unlink_group", "link"):
            if not st.files:
                op = "add"
        if op in ("delete", "retype") and not everything:
            op = "add"
        if op == "add":
            parent = rng.choice(st.dirs)
            if not os.path.isdir(_j(st, parent)):
                continue
            name = _name(rng, _taken(st, parent))
            _add_entry(st, parent, name)
            touched.append(os.path.join(parent, name) if parent else name)
            continue
        if op in ("delete", "retype"):
            rel = rng.choice(everything)
        else:
            rel = rng.choice(st.files)
        p = _j(st, rel)
        if not os.path.lexists(p):
            continue
        if op == "content":
            size = os.lstat(p).st_size
            with open(p, "r+b") as f:
                f.write(rng.randbytes(min(size, 64)) if size else b"")
        elif op == "size":
            with open(p, "r+b") as f:
                f.truncate(rng.choice([0, 1, 4096, 70_000]))
        elif op == "time":
            t = _rand_time(rng)
            if as_destination and rng.random() < 0.5:
                t = PAST_NS - rng.randrange(10**12)  # newer than nearly all the source's
            os.utime(p, ns=(t, t), follow_symlinks=False)
            continue
        elif op == "meta":
            if privileged and rng.random() < 0.5:
                os.lchown(p, *rng.choice(OWNERS))
            os.chmod(p, rng.choice(FILE_MODES))
            try:
                if rng.random() < 0.5:
                    os.setxattr(p, b"user.k%d" % rng.randrange(3), rng.randbytes(rng.choice([0, 7])))
                else:
                    for n in os.listxattr(p):
                        if n.startswith("user."):
                            os.removexattr(p, n)
            except OSError:
                pass
            continue
        elif op == "unlink_group":  # break a hard link: a new inode with the same bytes
            # (and a new time: with size and time unchanged neither tool breaks the link in the
            # destination, and the two names then share whichever mode was applied last)
            data = open(p, "rb").read()
            os.unlink(p)
            with open(p, "wb") as f:
                f.write(data)
        elif op == "link":
            other = rng.choice(st.files)
            q = _j(st, other)
            if other == rel or not os.path.lexists(q) or not os.path.isdir(os.path.dirname(p)):
                continue
            os.unlink(p)
            os.link(q, p)
            continue
        elif op == "delete":
            rmtree(p)
            _forget(st, rel)
        elif op == "retype":
            s = os.lstat(p)
            rmtree(p)
            _forget(st, rel)
            parent, name = os.path.split(rel)
            kinds = ["file", "dir", "symlink", "fifo"]
            kinds.remove({stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}.get(
                stat.S_IFMT(s.st_mode), "fifo"))  # fmt: skip
            kind = rng.choice(kinds)
            _add_entry(st, parent, name, kind)
            if kind == "dir" and rng.random() < 0.7:
                for _ in range(rng.randint(1, 4)):
                    _add_entry(st, rel, _name(rng, _taken(st, rel)), "file")
                    touched.append(st.files[-1])
        touched.append(rel)
    if as_destination:
        for rel in rng.sample(st.dirs, min(3, len(st.dirs))):
            if rel and os.path.isdir(_j(st, rel)) and not os.path.islink(_j(st, rel)):
                os.chmod(_j(st, rel), 0o555)
    _finish_meta(st, [r for r in dict.fromkeys(touched) if os.path.lexists(_j(st, r))])


def _forget(st: _State, rel: bytes) -> None:
    pre = rel + b"/"
    st.files = [f for f in st.files if f != rel and not f.startswith(pre)]
    st.dirs = [d for d in st.dirs if d != rel and not d.startswith(pre)]


# --------------------------------------------------------------------------------------------
# Running both tools and comparing


RSYNC_FLAGS = ["-aHAXS", "--numeric-ids", "--no-inc-recursive", "--modify-window=-1"]
COMPARE_FLAGS = {"": [], "--checksum": ["-c"], "--ignore-times": ["-I"], "--size-only": ["--size-only"]}


def run_rsync_cmd(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["rsync", *args], cwd=cwd, capture_output=True, timeout=300)


def run_blit_cmd(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([BLIT, *args], cwd=cwd, capture_output=True, timeout=300,
                          env=BLIT_ENV, stdin=subprocess.DEVNULL)  # fmt: skip


def _window(snap: Snapshot, since: int, until: int) -> Snapshot:
    """Times set by a run (inside [since, until]) become -1: tools agree only on "recent"."""
    for e in snap.values():
        if since <= e.mtime_ns <= until:
            e.mtime_ns = -1
    return snap


def compare(rsync_root: Path, blit_root: Path, since: int, src: Path, landed: Path,
            size_only: bool = False) -> list[str]:  # fmt: skip
    """Entry-by-entry differences between rsync's result (a) and blit's (b), and the holes of
    src's sparse files that blit did not keep in landed (src's copy, inside blit_root).

    Holes are checked against the source, not rsync: `rsync -S` also turns runs of zeros that
    were written out into holes, while blit keeps the source's allocation as it is."""
    until = time.time_ns()
    a = _window(snapshot(rsync_root), since, until)
    b = _window(snapshot(blit_root), since, until)
    s = snapshot(src, content=False)
    rel_to_rsync = os.path.relpath(landed, blit_root).encode()
    # Names hard-linked in the destination but not in the source, whose content both tools
    # judge up to date, keep their link in both: they share one mode, owner, time and xattrs,
    # those of whichever name was fixed last (rsync's order is not blit's). Not compared.
    shared = set()
    for rel, e in s.items():
        p = os.path.normpath(os.path.join(rel_to_rsync, rel))
        ea, eb = a.get(p), b.get(p)
        if ea and eb and ea.links and ea.links == eb.links and ea.sha256 == eb.sha256:
            here = {os.path.relpath(x, rel_to_rsync) for x in ea.links}
            if here != set(e.links or ()):
                shared.add(p)
    for p in shared:
        for f in ("mode", "uid", "gid", "mtime_ns", "xattrs"):
            setattr(b[p], f, getattr(a[p], f))
    # Groups are compared on the names the source has as files: a leftover name (in a directory
    # that could not be replaced) may share the inode of an up-to-date member in one tool's
    # result, as it did before the run, and not in the other's (which rewrote that member).
    in_src = {os.path.normpath(os.path.join(rel_to_rsync, r)) for r, e in s.items() if e.kind == "file"}
    for snap in (a, b):
        for p, e in snap.items():
            if e.links:
                kept = tuple(x for x in e.links if x in in_src) if p in in_src else ()
                e.links = kept if len(kept) > 1 else None
    if size_only:
        # A group whose members at the destination hold other bytes of the same size: each tool
        # links the rest to the first member it meets, and --size-only keeps that one's bytes.
        for p, ea in a.items():
            eb = b.get(p)
            if eb and ea.links and eb.links and ea.size == eb.size:
                eb.sha256 = ea.sha256
    out = tree_diff(a, b, check_sparse=False)
    dst = snapshot(landed, content=False) if landed.is_dir() else {}
    for rel, e in s.items():
        d = dst.get(rel)
        r = a.get(os.path.normpath(os.path.join(rel_to_rsync, rel)))
        if not e.sparse or d is None or d.kind != "file":
            continue
        # An up-to-date file is left as it is, holes or not, by both tools.
        if d.blocks > max(e.blocks, r.blocks if r else 0) + SPARSE_SLACK_BLOCKS:
            out.append(f"{rel!r}: holes not kept: {d.blocks * 512} bytes allocated, "
                       f"{e.blocks * 512} in the source (size {e.size})")  # fmt: skip
    return out


def build_pair(base: Path, seed: int, sentinel: Path, dst_seed: int | None, dst_mutation: int | None,
               name: str) -> tuple[Path, Path]:  # fmt: skip
    """Two identical scratch destinations base/{rsync,blit}/name (missing if dst_seed is None)."""
    out = []
    for tool in ("rsync", "blit"):
        d = base / tool
        d.mkdir(parents=True, exist_ok=True)
        if dst_seed is not None:
            make_random_tree(d / name, dst_seed, outside=d / "dst_outside", sentinel=sentinel)
            if dst_mutation is not None:
                mutate_tree(d / name, dst_mutation, outside=d / "dst_outside", sentinel=sentinel,
                            changes=40, as_destination=True)  # fmt: skip
        out.append(d)
    return out[0], out[1]


@dataclass
class Result:
    label: str
    diffs: list[str]
    blit_code: int
    rsync_code: int
    blit_out: str

    @property
    def ok(self) -> bool:
        # Both finished with per-file failures (rsync 23, blit 3): the trees still must agree.
        # rsync alone may fail where blit has nothing to report (it reads ACLs of destination
        # entries it is about to delete, for one); blit alone failing is always looked at.
        codes_agree = self.blit_code == 0 or (self.blit_code == 3 and self.rsync_code == 23)
        return not self.diffs and codes_agree

    def describe(self) -> str:
        lines = [f"{self.label}: blit exit {self.blit_code}, rsync exit {self.rsync_code}"]
        lines += ["  " + d for d in self.diffs[:40]]
        if self.blit_code or self.rsync_code or len(self.diffs) > 40:
            lines.append(self.blit_out)
        return "\n".join(lines)


def run_case(base: Path, seed: int, *, op: str, src_form: str, dst_state: str,
             compare_flag: str = "") -> Result:  # fmt: skip
    """One scenario: op (copy|mirror|move) of `src/` or `src` (src_form) onto a destination that
    is "missing", "empty" or "stale" (a mutated tree of its own), in both tools.

    For move, blit moves its own build of the source and rsync copies another; the source left by
    blit must be what docs/cli.md says (an empty SRC for `src/`, nothing for `src`).
    """
    label = f"seed={seed} {op} {src_form} -> {dst_state} {compare_flag}".rstrip()
    sentinel = base / "sentinel"
    if not sentinel.exists():
        (sentinel / "dir").mkdir(parents=True)
        (sentinel / "file").write_bytes(b"sentinel\n")
    before_sentinel = snapshot(sentinel)
    src = make_random_tree(base / "src", seed, outside=base / "outside", sentinel=sentinel)
    dst_seed = {"missing": None, "empty": None, "stale": seed}[dst_state]
    name = "d"
    r_dir, b_dir = build_pair(base, seed, sentinel, dst_seed, seed + 7919 if dst_seed is not None else None,
                              name)  # fmt: skip
    if dst_state == "empty":
        for d in (r_dir, b_dir):
            (d / name).mkdir()
    if dst_state == "stale" and src_form == "src":
        # `src d` with d existing lands in d/src: put the stale tree there.
        for d in (r_dir, b_dir):
            (d / name).rename(d / "tmp")
            (d / name).mkdir()
            (d / "tmp").rename(d / name / "src")
    src_arg = f"{src}/" if src_form == "src/" else str(src)
    r_args = [*RSYNC_FLAGS, *COMPARE_FLAGS[compare_flag]]
    if op == "mirror":
        r_args.append("--delete")
    if src_form == "src" and dst_state == "missing":
        r_src = f"{src}/"  # SPEC: `dir DST` with DST missing lands dir as DST (cp -a's rule)
    else:
        r_src = src_arg
    since = time.time_ns() - 50_000_000  # file times come from a coarse clock
    r = run_rsync_cmd([*r_args, r_src, name], cwd=r_dir)
    b_src = src_arg
    if op == "move":
        msrc = make_random_tree(base / "msrc" / "src", seed, outside=base / "msrc" / "outside",
                                sentinel=sentinel)  # fmt: skip
        b_src = f"{msrc}/" if src_form == "src/" else str(msrc)
    b_flags = [compare_flag] if compare_flag else []
    if op == "move":
        before_move = snapshot(b_src, include_root=False, content=False)
    b = run_blit_cmd([op, "--json", *b_flags, b_src, name], cwd=b_dir)
    landed = b_dir / name / "src" if src_form == "src" and dst_state != "missing" else b_dir / name
    diffs = compare(r_dir / name, b_dir / name, since, src, landed, compare_flag == "--size-only")
    if op == "move":
        diffs += _check_moved_source(base / "msrc" / "src", src_form, before_move, b)
        # The other names of groups partly outside stay; a move by rename keeps them linked to
        # the destination's (as mv does), a copy leaves them alone: either way they are intact.
        moved_out = snapshot(base / "msrc" / "outside", include_root=False)
        if tree_diff(snapshot(base / "outside", include_root=False), moved_out):
            diffs.append("move: the hard-link partners outside the source changed")
    if snapshot(sentinel) != before_sentinel:
        diffs.append("the sentinel directory (absolute symlink targets) changed")
    out = describe_output(b) if b.returncode else ""
    if r.returncode:
        out += "\nrsync: " + r.stderr.decode(errors="replace")[-2000:]
    return Result(label, diffs, b.returncode, r.returncode, out)


def _check_moved_source(left: Path, src_form: str, before: Snapshot,
                        proc: subprocess.CompletedProcess[bytes]) -> list[str]:  # fmt: skip
    """docs/cli.md, Move: an entry whose copy failed stays at the source (and is listed), every
    other one is gone; directories go once empty; with `src/`, src itself stays."""
    try:
        failed = [os.fsencode(f["path"]) for f in summary_of(proc)["failures"]]
    except AssertionError as exc:
        return [f"move: no JSON summary: {exc}"]
    if src_form == "src":  # paths are relative to the source's parent: src/...
        failed = [p[4:] if p.startswith(b"src/") else b"." for p in failed]
    if not failed:
        if src_form == "src/" and os.listdir(left):
            return [f"move src/: the source still holds {os.listdir(left)[:5]}"]
        if src_form == "src" and os.path.lexists(left):
            return ["move src: the source directory is still there"]
        return []
    if not os.path.lexists(left):
        return [f"move: the source is gone, yet {failed[:3]} failed"]
    out = []
    after = snapshot(left, include_root=False, content=False)

    def covered(rel: bytes) -> bool:
        return any(rel == f or rel.startswith(f + b"/") or f == b"." for f in failed)

    for rel, e in after.items():
        if e.kind != "dir" and not covered(rel):
            out.append(f"move: {rel!r} stays at the source, yet it did not fail")
    for f in failed:
        if f in before and before[f].kind != "dir" and f not in after:
            out.append(f"move: {f!r} failed, yet it left the source")
    return out


def run_sequence(base: Path, seed: int, rounds: int = 3) -> list[Result]:
    """copy, then (mutate the source, mirror) `rounds` times; both tools each round."""
    results = []
    sentinel = base / "sentinel"
    if not sentinel.exists():
        (sentinel / "dir").mkdir(parents=True)
        (sentinel / "file").write_bytes(b"sentinel\n")
    src = make_random_tree(base / "src", seed, outside=base / "outside", sentinel=sentinel)
    for d in ("rsync", "blit"):
        (base / d).mkdir(exist_ok=True)
    for rnd in range(rounds + 1):
        op = "copy" if rnd == 0 else "mirror"
        if rnd:
            mutate_tree(src, seed * 100 + rnd, outside=base / "outside", sentinel=sentinel,
                        changes=25)  # fmt: skip
        since = time.time_ns() - 50_000_000  # file times come from a coarse clock
        r = run_rsync_cmd([*RSYNC_FLAGS, *(["--delete"] if rnd else []), f"{src}/", "d"], cwd=base / "rsync")
        b = run_blit_cmd([op, f"{src}/", "d"], cwd=base / "blit")
        diffs = compare(base / "rsync" / "d", base / "blit" / "d", since, src, base / "blit" / "d")
        out = describe_output(b) if b.returncode else ""
        results.append(Result(f"seed={seed} sequence round {rnd} ({op})", diffs, b.returncode, r.returncode, out))
        if not results[-1].ok:
            break  # keep the trees as they are for a look
    return results


CASES = [
    ("copy", "src/", "missing"),
    ("copy", "src", "empty"),
    ("copy", "src", "missing"),
    ("copy", "src/", "stale"),
    ("mirror", "src/", "stale"),
    ("mirror", "src", "stale"),
    ("mirror", "src/", "empty"),
    ("move", "src/", "stale"),
    ("move", "src", "missing"),
]


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--scratch", default="/tmp/blit-fuzz")
    ap.add_argument("--keep", action="store_true", help="keep the scratch tree of failing cases")
    ap.add_argument("--only", default="", help="case filter: substring of the label")
    args = ap.parse_args(argv)
    lo, _, hi = args.seeds.partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    scratch = Path(args.scratch)
    bad = 0
    for seed in seeds:
        rng = random.Random(seed ^ 0x5EED)
        jobs = [(c, rng.choice(list(COMPARE_FLAGS)) if rng.random() < 0.3 else "") for c in CASES]
        for (op, form, state), flag in jobs + [(("sequence", "", ""), "")]:
            if args.only and args.only not in f"{op} {form} -> {state}":
                continue
            base = scratch / f"s{seed}-{op}-{form.replace('/', 'S')}-{state}"
            rmtree(base)
            base.mkdir(parents=True)
            if op == "sequence":
                results = run_sequence(base, seed)
            else:
                results = [run_case(base, seed, op=op, src_form=form, dst_state=state, compare_flag=flag)]
            failed = [r for r in results if not r.ok]
            for r in failed:
                print(r.describe(), flush=True)
            bad += bool(failed)
            if not failed or not args.keep:
                rmtree(base)
        print(f"seed {seed} done", flush=True)
    print(f"{bad} failing case(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

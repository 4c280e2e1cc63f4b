"""Differential runs: one random tree (randtree.py) copied, mirrored and moved by `blit` through
real `blit daemon` processes (push, pull, daemon to daemon), each result compared entry by
entry with what `rsync -aHXS --numeric-ids` makes of the same source locally.

run_seed() returns the differences as lines (empty: blit agrees with rsync everywhere); the
tests and a longer fuzzing loop call it with their own seeds.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from helpers import recent_mtimes, rmtree, snapshot, tree_diff

from .conftest import DaemonProcess, blit_cmd
from .randtree import diverge_dest, make_random_tree

RSYNC = ["rsync", "-aHXS", "--numeric-ids"]
"""The oracle. No -A: these trees hold no ACLs beyond the mode bits, and rsync 3.5.0 -A fails
(get_acl: Permission denied, exit 23) where --delete replaces a directory by a file."""


@dataclass
class Sides:
    """A: the daemon push, pull and move talk to, and the source of daemon to daemon runs;
    B: the destination daemon of those (allow_peer_pull); work: local scratch space."""

    a: DaemonProcess
    b: DaemonProcess | None
    work: Path


CHECKS = ("copy", "mirror", "checksum", "stale", "size-only", "ignore-times", "single", "move", "movestale")
"""What run_seed does by default (each once per direction)."""


def _rsync(*args: str | Path, ok: tuple[int, ...] = (0,), flaky: bool = False) -> int | None:
    """rsync's exit code; None when `flaky` and rsync broke down: rsync 3.5.0 -H without
    --delete, on a destination with non-empty directories where the source has files, may
    deadlock or stop with "File-list index ... not in ... (finish_hard_link)" (exit 2)."""
    try:
        r = subprocess.run([*RSYNC, *map(os.fsdecode, args)], capture_output=True, timeout=20 if flaky else 120)
    except subprocess.TimeoutExpired:
        if flaky:
            return None
        raise
    if flaky and r.returncode not in ok:
        return None
    assert r.returncode in ok, f"rsync {args}: {r.stderr.decode(errors='replace')}"
    return r.returncode


def _blit(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*blit_cmd(), *args], env=d.env, capture_output=True, timeout=120)


def _ep(d: DaemonProcess, path: str) -> str:
    return f"127.0.0.1:{d.port}:/data/{path}"


def _diff(label: str, want: Path, got: Path, *, root: bool, src: Path | None = None, src_at: bytes = b"",
          since: int | None = None) -> list[str]:  # fmt: skip
    """Differences of `got` from the oracle's `want`. `src`: a file whose bytes are the source's
    where rsync's are not is no difference (a stale file of the same size and mtime is up to
    date for both tools; which member of a hard-link group the others are linked to, the stale
    one or the one copied, depends on the order they are met in); `src_at`: where the source's
    copy lies in the trees (b"src/" for `src dst/`). `since`: mtimes from then on are "recent"
    in both (a destination-only directory whose contents mirror deleted has the time of the
    run; the two tools agree only on "recent")."""
    a = snapshot(want, include_root=root)
    b = snapshot(got, include_root=root)
    if since is not None:
        recent_mtimes(a, since)
        recent_mtimes(b, since)
    if src is not None:
        s = {src_at + rel: e for rel, e in snapshot(src, include_root=False).items()}
        for rel, e in a.items():
            if rel in b and rel in s and e.kind == "file" and e.sha256 != b[rel].sha256 == s[rel].sha256:
                e.sha256 = b[rel].sha256
    return [f"{label}: {line}" for line in tree_diff(a, b)]


def _ran(label: str, r: subprocess.CompletedProcess[bytes]) -> list[str]:
    if r.returncode == 0:
        return []
    err = r.stderr.decode(errors="backslashreplace").strip().splitlines()
    return [f"{label}: exit {r.returncode}: " + " | ".join(err[-6:])]


def _fresh(*paths: Path) -> None:
    for p in paths:
        rmtree(p)


def _places(s: Sides, direction: str, name: str) -> tuple[Path, Path, str, str, DaemonProcess]:
    """(source dir, destination dir, source as blit names it, destination as blit names it,
    the daemon the client talks to) for one direction (local: no daemon in the way)."""
    a_mod = s.a.modules["data"]
    if direction == "local":
        return s.work / "src", s.work / name, str(s.work / "src"), str(s.work / name), s.a
    if direction == "push":
        return s.work / "src", a_mod / name, str(s.work / "src"), _ep(s.a, name), s.a
    if direction == "pull":
        return a_mod / "src", s.work / name, _ep(s.a, "src"), str(s.work / name), s.a
    assert s.b is not None
    return a_mod / "src", s.b.modules["data"] / name, _ep(s.a, "src"), _ep(s.b, name), s.b


def run_seed(s: Sides, seed: int, directions: tuple[str, ...] = ("push", "pull", "relay"),
             checks: tuple[str, ...] = CHECKS, max_entries: int = 150) -> list[str]:  # fmt: skip
    """Build the tree of `seed` and run `checks` in each direction; the differences found."""
    src = s.work / "src"
    _fresh(src, s.a.modules["data"] / "src")
    make_random_tree(src, seed, max_entries=max_entries)
    _rsync(f"{src}/", s.a.modules["data"] / "src")  # the pull and relay source: the same tree
    out: list[str] = []
    for direction in directions:
        run = _Run(s, seed, direction, src)
        for check in checks:
            out += getattr(run, "check_" + check.replace("-", "_"))()
        _fresh(run.dbase)
    _fresh(s.work / "oracle", s.work / "stale")
    shutil.rmtree(src, ignore_errors=True)
    return out


class _Run:
    """The checks of one seed in one direction; each returns its differences."""

    def __init__(self, s: Sides, seed: int, direction: str, src: Path) -> None:
        self.s, self.seed, self.direction, self.src = s, seed, direction, src
        _sdir, self.dbase, self.sname, self.dname, self.client = _places(s, direction, "dst")
        self.oracle = s.work / "oracle"
        self.template = s.work / "stale"
        self.moving = s.work / "moving" if direction == "push" else s.a.modules["data"] / "moving"
        self.mname = str(self.moving) if direction == "push" else _ep(s.a, "moving")

    def label(self, what: str) -> str:
        return f"seed {self.seed} {self.direction} {what}"

    def blit(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return _blit(self.client, *args)

    def _stale(self, *copies: Path) -> None:
        """The source's tree made stale (diverge_dest), copied to each of `copies`."""
        _fresh(self.template, *copies)
        _rsync(f"{self.src}/", self.template)
        diverge_dest(self.template, self.seed)
        for c in copies:
            _rsync(f"{self.template}/", c)

    def check_copy(self) -> list[str]:
        """`src/` and `src`, into a missing and an existing destination."""
        out = []
        for form, state in (("/", "missing"), ("", "missing"), ("", "existing"), ("/", "existing")):
            label = self.label(f"copy src{form} ({state} dst)")
            _fresh(self.dbase, self.oracle)
            if state == "existing":
                for p in (self.dbase, self.oracle):
                    p.mkdir()
                    (p / "already").write_text("there before")
                    os.utime(p / "already", ns=(10**18, 10**18))
            # SPEC: `dir DST` with DST missing lands dir as DST (rsync would make DST/dir).
            _rsync(f"{self.src}/" if form == "/" or state == "missing" else str(self.src), self.oracle)
            r = self.blit("copy", self.sname + form, self.dname)
            out += _ran(label, r)
            out += _diff(label, self.oracle, self.dbase, root=not (state == "existing" and form == ""))
        return out

    def _onto_stale(self, blit_args: list[str], rsync_args: list[str], flaky: bool = False) -> list[str]:
        label = self.label(f"{' '.join(blit_args)} (stale dst)")
        self._stale(self.dbase, self.oracle)
        # Copy cannot put a file where a non-empty directory is: rsync says so (23), blit too (3).
        code = _rsync(*rsync_args, f"{self.src}/", self.oracle, ok=(0, 23) if flaky else (0,), flaky=flaky)
        r = self.blit(*blit_args, self.sname + "/", self.dname + "/")
        if code in (23, None) and r.returncode == 3:
            r.returncode = 0
        out = _ran(label, r)
        if code is not None:
            out += _diff(label, self.oracle, self.dbase, root=True, src=self.src)
        return out

    def check_mirror(self) -> list[str]:
        """Mirror onto a stale destination, then again: nothing to do, nothing changed."""
        out = self._onto_stale(["mirror"], ["--delete"])
        label = self.label("mirror again")
        before = snapshot(self.dbase)
        r = self.blit("mirror", "-v", self.sname + "/", self.dname + "/")
        out += _ran(label, r)
        lines = r.stdout.decode(errors="backslashreplace").splitlines()
        if lines[:-1] or not lines[-1].startswith("copied 0 files (0 B), deleted 0"):
            out.append(f"{label}: not idle: {lines[-5:]}")
        return out + [f"{label}: {line}" for line in tree_diff(before, snapshot(self.dbase))]

    def check_checksum(self) -> list[str]:
        return self._onto_stale(["mirror", "--checksum"], ["--delete", "--checksum"])

    def check_size_only(self) -> list[str]:
        return self._onto_stale(["mirror", "--size-only"], ["--delete", "--size-only"])

    def check_ignore_times(self) -> list[str]:
        return self._onto_stale(["mirror", "--ignore-times"], ["--delete", "--ignore-times"])

    def check_stale(self) -> list[str]:
        """Copy onto a stale destination (conflicts with non-empty directories fail)."""
        return self._onto_stale(["copy"], [], flaky=True)

    def check_single(self) -> list[str]:
        """One entry as the source (a file, sparse or hard-linked too, a symlink, a special
        file), into a missing and an existing destination."""
        out = []
        for rel in _single_picks(self.src, self.seed):
            for state in ("missing", "existing"):
                label = self.label(f"copy {rel!r} ({state} dst)")
                _fresh(self.dbase, self.oracle)
                if state == "existing":
                    for p in (self.dbase, self.oracle):
                        p.mkdir()
                        os.utime(p, ns=(10**18, 10**18))
                _rsync(os.path.join(os.fsencode(self.src), rel), self.oracle)
                r = self.blit("copy", self.sname + "/" + os.fsdecode(rel), self.dname)
                out += _ran(label, r)
                out += _diff(label, self.oracle, self.dbase, root=state == "missing")
        return out

    def check_move(self) -> list[str]:
        """The destination is what a copy makes; the source is gone (`SRC/`: emptied)."""
        label = self.label("move")
        form = "/" if self.seed % 2 else ""
        _fresh(self.moving, self.dbase, self.oracle)
        _rsync(f"{self.src}/", self.moving)
        _rsync(f"{self.src}/", self.oracle)
        r = self.blit("move", self.mname + form, self.dname)
        out = _ran(label, r) + _diff(label, self.oracle, self.dbase, root=True)
        if form == "/":
            left = sorted(os.listdir(self.moving)) if self.moving.is_dir() else ["<source root gone>"]
        else:
            left = ["<source root kept>"] if os.path.lexists(self.moving) else []
        if left:
            out.append(f"{label}: left in the source: {left[:10]}")
        _fresh(self.moving)
        return out

    def check_movestale(self) -> list[str]:
        """Onto a stale destination: conflicts fail (exit 3); whatever left the source is at the
        destination, byte for byte, and whatever failed is still at the source."""
        label = self.label("move (stale dst)")
        _fresh(self.moving)
        _rsync(f"{self.src}/", self.moving)
        self._stale(self.dbase)
        before = snapshot(self.moving, include_root=False)
        stale = snapshot(self.dbase, include_root=False)
        r = self.blit("move", self.mname + "/", self.dname + "/")
        out = _ran(label, r) if r.returncode != 3 else []
        after = snapshot(self.moving, include_root=False) if self.moving.is_dir() else {}
        landed = snapshot(self.dbase, include_root=False)
        for rel, e in before.items():
            if rel in after or e.kind == "dir":
                continue
            olds = [stale.get(p) for p in (e.links or (rel,))]
            if any(o and o.kind == e.kind == "file" and (o.size, o.mtime_ns) == (e.size, e.mtime_ns) for o in olds):
                # Up to date by size and mtime (itself, or the member of its hard-link group the
                # others are linked to): counts as landed (docs/cli.md, Move), as with rsync.
                continue
            got = landed.get(rel)
            if got is None or (got.kind, got.sha256, got.target, got.mode, got.mtime_ns) != (
                e.kind, e.sha256, e.target, e.mode, e.mtime_ns
            ):  # fmt: skip
                out.append(f"{label}: {rel!r} left the source but the destination has {got and (got.kind, got.size)}")
        failed = {ln.split(b": ")[0][len(b"blit: ") :] for ln in r.stderr.splitlines() if ln.startswith(b"blit: ")}
        for rel in failed:
            if rel in before and rel not in after:
                out.append(f"{label}: {rel!r} failed yet left the source")
        _fresh(self.moving)
        return out


def _single_picks(src: Path, seed: int) -> list[bytes]:
    """A few entries of the tree to copy on their own: one of each kind there is."""
    by_kind: dict[str, list[bytes]] = {}
    for rel, e in snapshot(src, include_root=False).items():
        kind = e.kind + ("-sparse" if e.sparse else "") + ("-linked" if e.links else "")
        by_kind.setdefault(kind, []).append(rel)
    rng = random.Random(seed)
    return [rng.choice(v) for k, v in sorted(by_kind.items()) if k != "dir"]


_T_DST = 1_500_000_000_000_000_007


def run_case(s: Sides, direction: str, build: Callable[[Path, bool], None], op: str = "mirror", *,
             flags: tuple[str, ...] = (), form: str = "/", label: str = "") -> list[str]:  # fmt: skip
    """One hand-made case: build(root, is_destination) makes the source and (twice) the
    destination's copy of it before the run; blit's result is compared with rsync's (--delete
    for mirror). `flags` go to both tools (--exclude/--include). `form`: "/" runs `src/ dst/`,
    "" runs `src dst/` (the source lands in dst/src, where its destination copy is built)."""
    sdir, dbase, sname, dname, client = _places(s, direction, "dst")
    oracle = s.work / "oracle"
    _fresh(sdir, dbase, oracle)
    build(sdir, False)
    inner = "" if form == "/" else sdir.name
    for d in (dbase, oracle):
        if inner:
            d.mkdir(parents=True)
        build(d / inner, True)
        if inner:
            os.utime(d, ns=(_T_DST, _T_DST))  # made here: the same time in both trees
    since = time.time_ns() - 50_000_000  # file times come from a coarse clock (a jiffy behind)
    # An entry that cannot replace a directory holding excluded (kept) entries fails in both
    # tools: rsync exit 23, blit 3.
    code = _rsync(*(["--delete"] if op == "mirror" else []), *flags, f"{sdir}{form}", f"{oracle}/", ok=(0, 23))
    r = _blit(client, op, *flags, sname + form, dname + "/")
    if code == 23 and r.returncode == 3:
        r.returncode = 0
    label = label or f"{direction} {op} {' '.join(flags)} src{form}"
    out = _ran(label, r) + _diff(label, oracle, dbase, root=True, src=sdir,
                                 src_at=os.fsencode(inner + "/" if inner else ""), since=since)  # fmt: skip
    _fresh(sdir, dbase, oracle)
    return out

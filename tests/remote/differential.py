"""Differential runs: one random tree (randtree.py) copied, mirrored and moved by `blit` through
real `blit daemon` processes (push, pull, daemon to daemon), each result compared entry by
entry with what `rsync -aHXS --numeric-ids` makes of the same source locally.

run_seed() returns the differences as lines (empty: blit agrees with rsync everywhere); the
tests and a longer fuzzing loop call it with their own seeds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from helpers import rmtree, snapshot, tree_diff

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


def _rsync(*args: str | Path, ok: tuple[int, ...] = (0,), hangs: bool = False) -> int | None:
    """rsync's exit code; None when `hangs` and it did (rsync 3.5.0 without --delete can
    deadlock on a destination with non-empty directories where the source has files)."""
    try:
        r = subprocess.run([*RSYNC, *map(str, args)], capture_output=True, timeout=20 if hangs else 120)
    except subprocess.TimeoutExpired:
        if hangs:
            return None
        raise
    assert r.returncode in ok, f"rsync {args}: {r.stderr.decode(errors='replace')}"
    return r.returncode


def _blit(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*blit_cmd(), *args], env=d.env, capture_output=True, timeout=120)


def _ep(d: DaemonProcess, path: str) -> str:
    return f"127.0.0.1:{d.port}:/data/{path}"


def _diff(label: str, want: Path, got: Path, *, root: bool) -> list[str]:
    a = snapshot(want, include_root=root)
    b = snapshot(got, include_root=root)
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
             checks: tuple[str, ...] = ("copy", "mirror", "checksum", "stale", "move")) -> list[str]:  # fmt: skip
    w = s.work
    src = w / "src"
    _fresh(src, s.a.modules["data"] / "src")
    make_random_tree(src, seed)
    _rsync(f"{src}/", s.a.modules["data"] / "src")  # the pull and relay source: the same tree
    out: list[str] = []
    oracle = w / "oracle"
    for direction in directions:
        sdir, dbase, sname, dname, client = _places(s, direction, "dst")
        if "copy" in checks:
            # (blit source form, destination state, rsync's arguments giving the same result)
            for form, state in (("/", "missing"), ("", "missing"), ("", "existing"), ("/", "existing")):
                label = f"seed {seed} {direction} copy src{form} ({state} dst)"
                _fresh(dbase, oracle)
                if state == "existing":
                    for p in (dbase, oracle):
                        p.mkdir()
                        (p / "already").write_text("there before")
                        os.utime(p / "already", ns=(10**18, 10**18))
                # SPEC: `dir DST` with DST missing lands dir as DST (rsync would make DST/dir).
                r_src = f"{src}/" if form == "/" or state == "missing" else str(src)
                _rsync(r_src, oracle)
                r = _blit(client, "copy", sname + form, dname)
                out += _ran(label, r)
                out += _diff(label, oracle, dbase, root=not (state == "existing" and form == ""))
        for check, blit_args, rsync_args in (
            ("mirror", ["mirror"], ["--delete"]),
            ("checksum", ["mirror", "--checksum"], ["--delete", "--checksum"]),
            ("stale", ["copy"], []),
        ):
            if check not in checks:
                continue
            label = f"seed {seed} {direction} {' '.join(blit_args)} (stale dst)"
            template = w / "stale"
            _fresh(template, dbase, oracle)
            _rsync(f"{src}/", template)
            diverge_dest(template, seed)
            _rsync(f"{template}/", dbase)
            _rsync(f"{template}/", oracle)
            # Copy cannot put a file where a non-empty directory is: rsync says so (23), blit too (3).
            stale = check == "stale"
            code = _rsync(*rsync_args, f"{src}/", oracle, ok=(0, 23) if stale else (0,), hangs=stale)
            r = _blit(client, *blit_args, sname + "/", dname + "/")
            if code in (23, None) and r.returncode == 3:
                r.returncode = 0
            out += _ran(label, r)
            if code is not None:
                out += _diff(label, oracle, dbase, root=True)
            if check == "mirror":
                # A second run finds nothing to do and changes nothing.
                before = snapshot(dbase)
                r = _blit(client, "mirror", "-v", sname + "/", dname + "/")
                out += _ran(label + " again", r)
                lines = r.stdout.decode(errors="backslashreplace").splitlines()
                if lines[:-1] or not lines[-1].startswith("copied 0 files (0 B), deleted 0"):
                    out.append(f"{label} again: not idle: {lines[-5:]}")
                out += [f"{label} again: {line}" for line in tree_diff(before, snapshot(dbase))]
        if "move" in checks and direction != "relay":
            label = f"seed {seed} {direction} move"
            form = "/" if seed % 2 else ""
            moving = w / "moving" if direction == "push" else s.a.modules["data"] / "moving"
            _fresh(moving, dbase, oracle)
            _rsync(f"{src}/", moving)
            _rsync(f"{src}/", oracle)
            mname = str(moving) if direction == "push" else _ep(s.a, "moving")
            r = _blit(client, "move", mname + form, dname)
            out += _ran(label, r)
            out += _diff(label, oracle, dbase, root=True)
            if form == "/":
                left = sorted(os.listdir(moving)) if moving.is_dir() else ["<source root gone>"]
            else:
                left = ["<source root kept>"] if os.path.lexists(moving) else []
            if left:
                out.append(f"{label}: left in the source: {left[:10]}")
            _fresh(moving)
        _fresh(dbase)
    _fresh(oracle, w / "stale")
    shutil.rmtree(src, ignore_errors=True)
    return out


def run_case(s: Sides, direction: str, build: Callable[[Path, bool], None], op: str = "mirror") -> list[str]:
    """One hand-made case: build(root, is_destination) makes the source and (twice) the
    destination before the run; blit's result is compared with rsync's (--delete for mirror)."""
    sdir, dbase, sname, dname, client = _places(s, direction, "dst")
    oracle = s.work / "oracle"
    _fresh(sdir, dbase, oracle)
    build(sdir, False)
    build(dbase, True)
    build(oracle, True)
    _rsync(*(["--delete"] if op == "mirror" else []), f"{sdir}/", oracle)
    r = _blit(client, op, sname + "/", dname + "/")
    out = _ran(f"{direction} {op}", r) + _diff(f"{direction} {op}", oracle, dbase, root=True)
    _fresh(sdir, dbase, oracle)
    return out

"""blit against `rsync -aHXS --numeric-ids` as the oracle, entry by entry (kind, bytes, mode,
owner, ns mtime, symlink target, hard-link groups, xattrs, holes), through real `blit daemon`
processes on 127.0.0.1: a few seeded random trees copied, mirrored and moved (differential.py),
and the cases that fuzzing with more seeds found, each in every topology."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import rmtree

from .conftest import run_daemon_process
from .differential import Sides, run_case, run_seed

DIRECTIONS = ["local", "push", "pull", "relay"]
T = 1_600_000_000_123_456_789


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sides]:
    tmp = tmp_path_factory.mktemp("differential")
    try:
        with run_daemon_process(tmp / "A") as a, run_daemon_process(tmp / "B", peer_pull=True) as b:
            (tmp / "work").mkdir()
            yield Sides(a, b, tmp / "work")
    finally:
        rmtree(tmp)


SEEDS = [
    (3, "push", ("copy", "mirror", "single", "movestale")),
    (5, "pull", ("copy", "checksum", "size-only", "move")),
    (0, "relay", ("copy", "mirror", "ignore-times", "move")),
]
"""A few seeds, each direction, the checks shared out among them (run_seed's CHECKS, except a
copy onto a stale destination: rsync 3.5.0 -H, the oracle, may hang or break down there)."""


@pytest.mark.parametrize(("seed", "direction", "checks"), SEEDS, ids=[f"{s}-{d}" for s, d, _ in SEEDS])
def test_random_tree_lands_as_rsync_lands_it(sides: Sides, seed: int, direction: str, checks: tuple[str, ...]) -> None:
    """Copy (src and src/, into a missing and an existing destination; single entries of each
    kind), mirror onto a stale destination (then again: nothing to do; with --checksum,
    --size-only, --ignore-times), move: the trees blit leaves are those rsync leaves; a move onto
    a stale destination removes from the source only what landed."""
    assert run_seed(sides, seed, (direction,), checks, max_entries=60) == []


def _relinked(root: Path, is_dst: bool) -> None:
    """Source: x/a and y/b are one file. Destination: two equal, up-to-date files."""
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir()
    (root / "x" / "a").write_bytes(b"A" * 100)
    if is_dst:
        (root / "y" / "b").write_bytes(b"A" * 100)
    else:
        os.link(root / "x" / "a", root / "y" / "b")
    for i, p in enumerate((root / "x" / "a", root / "y" / "b", root / "x", root / "y", root)):
        os.utime(p, ns=(T + i // 2, T + i // 2))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_mirror_links_up_to_date_files_and_keeps_their_directory_times(sides: Sides, direction: str) -> None:
    """Linking y/b to x/a replaces y/b: y's mtime must be put back (remotely it stayed the time
    of the run)."""
    assert run_case(sides, direction, _relinked) == []


def _stale_xattr_on_linked(root: Path, is_dst: bool) -> None:
    """One file with two names on both sides, up to date; the destination's has an xattr more."""
    root.mkdir(parents=True)
    (root / "a").write_bytes(b"linked")
    os.link(root / "a", root / "b")
    if is_dst:
        os.setxattr(root / "a", "user.stale", b"only in the destination")
    os.utime(root / "a", ns=(T, T))
    os.utime(root, ns=(T, T))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_mirror_drops_stale_xattrs_of_an_up_to_date_hard_linked_file(sides: Sides, direction: str) -> None:
    assert run_case(sides, direction, _stale_xattr_on_linked) == []


def _symlink_owners(root: Path, is_dst: bool) -> None:
    """Up-to-date symlinks (same target, same mtime) whose owner, group or both differ."""
    root.mkdir(parents=True)
    for name, (uid, gid) in {"uid": (4321, 0), "gid": (0, 8765), "both": (4321, 8765)}.items():
        os.symlink("target", root / name)
        if is_dst:
            os.chown(root / name, uid, gid, follow_symlinks=False)
        os.utime(root / name, ns=(T, T), follow_symlinks=False)
    os.utime(root, ns=(T, T))


@pytest.mark.root
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_up_to_date_symlinks_take_the_source_owner(sides: Sides, direction: str) -> None:
    """Remotely an up-to-date symlink kept a stale owner; locally a stale group."""
    for op in ("copy", "mirror"):
        assert run_case(sides, direction, _symlink_owners, op) == []


def _non_utf8_names(root: Path, is_dst: bool) -> None:
    """Names that are not UTF-8 (latin-1 caf\\xe9, a lone \\xff) beside UTF-8 ones; the
    destination has extras of both kinds."""
    root.mkdir(parents=True)
    for name in (b"caf\xe9", b"caf\xc3\xa9", b"\xffx", b"plain") + ((b"\xffold", b"old") if is_dst else ()):
        (root / os.fsdecode(name)).write_bytes(name)
        os.utime(root / os.fsdecode(name), ns=(T, T))
    os.utime(root, ns=(T, T))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_a_pattern_that_is_not_utf8_filters_as_rsync_filters(sides: Sides, direction: str) -> None:
    """Patterns are bytes as names are: a push and a remote to remote run crashed with a
    traceback (a CBOR text string must be UTF-8); the filter rule now travels as bytes (R46)."""
    flags = ("--exclude", os.fsdecode(b"caf\xe9"), "--exclude", os.fsdecode(b"\xffo*"))
    assert run_case(sides, direction, _non_utf8_names, "mirror", flags=flags) == []

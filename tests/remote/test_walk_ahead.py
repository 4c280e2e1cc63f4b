"""A tree walk stays within MAX_QUEUED_FILES of its data (transport/tree.py `_walk`'s `behind`,
daemon/handlers.py `_behind_landing`): a tree of many small or empty files, whose listing runs
far ahead of its landing, is not planned nearly whole before it lands. A 1,000,000-file pull
held 412 MiB in the client and a push 373 MiB in the daemon; now about 120 MiB each."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blit.daemon import handlers
from blit.transport import tree
from blit.transport.tree import DestTree, TopJob, TreeSpec, pull_tree, push_tree

from .conftest import Daemon
from .treeutil import assert_same_tree

DIRS, FILES, LIMIT = 40, 100, 50


def _empty_files(root: Path) -> Path:
    root.mkdir()
    for d in range(DIRS):
        (root / f"d{d:02}").mkdir()
        for i in range(FILES):
            (root / f"d{d:02}" / f"f{i:03}").touch()
    return root


class PendingSpy:
    """The destination's files needed and not landed, each time DestTree.`method` starts: a
    directory (plan) or a batch of them in one thread hop (plan_many, the daemon's tree/dirs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
        self.seen: list[int] = []
        real = getattr(DestTree, method)

        def spy(t: DestTree, *args: object) -> object:
            self.seen.append(len(t.pending))
            return real(t, *args)

        monkeypatch.setattr(DestTree, method, spy)


async def test_the_walk_starts_no_directory_while_the_data_is_behind() -> None:
    """`behind()` true: no job starts, whatever the stack holds; false again: the walk goes on
    and visits every directory once."""
    behind = True
    visited: list[str] = []

    async def visit(rel: str, dst_rel: str, new: bool, only: object) -> list[tuple[str, str, bool]]:
        visited.append(rel)
        return [(f"c{i}", f"c{i}", True) for i in range(3)] if "/" not in rel else []  # two levels

    async def release() -> None:
        nonlocal behind
        await trio.sleep(0.2)
        assert visited == [""], visited  # the top, then nothing while behind
        behind = False

    async with trio.open_nursery() as n:
        n.start_soon(release)
        await tree._walk(TopJob(), visit, behind=lambda: behind and bool(visited))
    assert sorted(visited) == sorted({""} | {f"c{i}" for i in range(3)} | {f"c{i}/c{j}" for i in range(3) for j in range(3)})
    assert len(visited) == 13


async def test_a_push_is_planned_no_further_ahead_than_it_lands(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon plans a push's next batch of directories (tree/dirs) only once at most LIMIT
    files it needs have not landed (it planned them as fast as they came before: hundreds
    ahead). A batch is planned whole, in one thread hop."""
    monkeypatch.setattr(handlers, "MAX_QUEUED_FILES", LIMIT)
    spy = PendingSpy(monkeypatch, "plan_many")
    src = _empty_files(tmp_path / "src")
    async with daemon.session() as s:
        done = await push_tree(s, os.fsencode(src), "data", b"dst", TopJob(), TreeSpec(operation="copy"), create_base=True)
    assert done.files_copied == DIRS * FILES and not done.failures, done
    assert_same_tree(src, daemon.modules["data"] / "dst")
    assert len(spy.seen) > 1 and max(spy.seen) <= LIMIT, spy.seen


async def test_a_pull_lists_no_further_ahead_than_it_lands(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pulling client lists and plans more directories only while at most LIMIT files it
    asked for have not landed, also between the directories of one tree/scans batch; what is
    planned beyond is what the jobs in flight hold (WALK_CONCURRENCY, a directory each)."""
    monkeypatch.setattr(tree, "MAX_QUEUED_FILES", LIMIT)
    waited: list[bool] = []
    real_walk = tree._walk

    async def walk(*args: object, **kw: object) -> None:
        behind = args[4] if len(args) > 4 else kw.get("behind")
        assert callable(behind)

        def spy() -> bool:
            waited.append(bool(behind()))
            return waited[-1]

        await real_walk(*args[:4], behind=spy)  # type: ignore[arg-type]

    monkeypatch.setattr(tree, "_walk", walk)
    spy = PendingSpy(monkeypatch, "plan")
    src = _empty_files(daemon.modules["data"] / "src")
    async with daemon.session() as s:
        done = await pull_tree(s, "data", b"src", os.fsencode(tmp_path / "dst"), TopJob(), TreeSpec(operation="copy"), create_root=True)
    assert done.files_copied == DIRS * FILES and not done.failures, done
    assert_same_tree(src, tmp_path / "dst")
    assert waited, "the pull's walk never asked whether it was ahead of its data"
    assert max(spy.seen) <= LIMIT + tree.WALK_CONCURRENCY * FILES, spy.seen


async def test_a_pull_of_one_large_directory_lists_its_parts_no_further_ahead_than_it_lands(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One directory in parts (PART_ENTRIES 200 here, 4,000 entries): the next part is fetched
    and planned only once at most LIMIT files asked for have not landed."""
    from blit.transport import protocol

    monkeypatch.setattr(protocol, "PART_ENTRIES", 200)
    monkeypatch.setattr(tree, "MAX_QUEUED_FILES", LIMIT)
    spy = PendingSpy(monkeypatch, "plan")
    src = daemon.modules["data"] / "flat"
    src.mkdir()
    for i in range(DIRS * FILES):
        (src / f"f{i:04}").touch()
    async with daemon.session() as s:
        done = await pull_tree(s, "data", b"flat", os.fsencode(tmp_path / "dst"), TopJob(), TreeSpec(operation="copy"), create_root=True)
    assert done.files_copied == DIRS * FILES and not done.failures, done
    assert_same_tree(src, tmp_path / "dst")
    assert len(spy.seen) >= DIRS * FILES // 200 and max(spy.seen) <= LIMIT, spy.seen


async def test_a_push_of_one_large_directory_is_planned_part_by_part_no_further_ahead_than_it_lands(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same directory pushed: each part (tree/dir) is planned once at most LIMIT files the
    daemon needs have not landed."""
    from blit.transport import protocol

    monkeypatch.setattr(protocol, "PART_ENTRIES", 200)
    monkeypatch.setattr(handlers, "MAX_QUEUED_FILES", LIMIT)
    spy = PendingSpy(monkeypatch, "plan")
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(DIRS * FILES):
        (src / f"f{i:04}").touch()
    async with daemon.session() as s:
        done = await push_tree(s, os.fsencode(src), "data", b"dst", TopJob(), TreeSpec(operation="copy"), create_base=True)
    assert done.files_copied == DIRS * FILES and not done.failures, done
    assert_same_tree(src, daemon.modules["data"] / "dst")
    assert len(spy.seen) >= DIRS * FILES // 200 and max(spy.seen) <= LIMIT, spy.seen

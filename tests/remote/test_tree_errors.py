"""Tree transfers that fail or are interrupted end promptly and leave no temporary files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blit.transport import tree
from blit.transport.tree import TopJob, TreeSpec, push_tree

from .conftest import Daemon
from .treeutil import make_full_tree


async def test_an_error_in_the_walk_ends_the_push_promptly(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    await trio.to_thread.run_sync(make_full_tree, src)
    dst = daemon.modules["data"]
    real_scan = tree.SourceTree.scan_parts

    def failing_scan(self: tree.SourceTree, rel: str, *args):  # type: ignore[no-untyped-def]
        if rel:
            raise RuntimeError("boom")
        return real_scan(self, rel, *args)

    monkeypatch.setattr(tree.SourceTree, "scan_parts", failing_scan)
    t0 = trio.current_time()
    with pytest.raises(RuntimeError, match="boom"):
        async with daemon.session() as s:
            await push_tree(s, os.fsencode(src), "data", b"", TopJob(), TreeSpec())
    assert trio.current_time() - t0 < 5
    await trio.sleep(0.5)
    assert not [n for n in os.listdir(dst) if n.startswith(".blit-")]


async def test_cancelling_a_push_ends_promptly(daemon: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"f{i}").write_bytes(os.urandom(2 << 20))
    t0 = trio.current_time()
    with trio.move_on_after(0.2):
        async with daemon.session() as s:
            await push_tree(s, os.fsencode(src), "data", b"", TopJob(), TreeSpec())
    assert trio.current_time() - t0 < 4
    await trio.sleep(0.5)
    assert not [n for n in os.listdir(daemon.modules["data"]) if n.startswith(".blit-")]

"""A tree transfer connects no more data streams than it has files to carry (at least one, at
once), and still two once it has two files: a one-file run pays one connection and one TLS
handshake, not two, and a many-file run keeps its parallel streams."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blit.transport.tree import TopJob, TreeCounters, TreeSpec, pull_tree, push_tree

from .conftest import Daemon
from .treeutil import assert_same_tree


@pytest.mark.parametrize("direction", ["push", "pull"])
@pytest.mark.parametrize(("files", "streams"), [(0, 1), (1, 1), (2, 2), (40, 2)])
async def test_streams_follow_the_files_to_carry(daemon: Daemon, tmp_path: Path, direction: str, files: int, streams: int) -> None:
    local = tmp_path / "local"
    remote = daemon.modules["data"] / "t"
    src, dst = (local, remote) if direction == "push" else (remote, local)
    src.mkdir()
    for i in range(files):
        (src / f"f{i}").write_bytes(os.urandom(100 + i))
    dst.mkdir()
    counters = TreeCounters()
    async with daemon.session() as s:
        if direction == "push":
            done = await push_tree(s, os.fsencode(local), "data", b"t", TopJob(), TreeSpec(), 2, counters=counters)
        else:
            done = await pull_tree(s, "data", b"t", os.fsencode(local), TopJob(), TreeSpec(), 2, counters=counters)
    assert done.files_copied == files and not done.failures, done
    await trio.to_thread.run_sync(assert_same_tree, src, dst)
    assert len(counters.streams) == streams

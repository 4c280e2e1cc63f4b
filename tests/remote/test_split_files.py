"""A large file goes in parts over the transfer's raw streams at once (FEATURE_SPLIT, decisions
R71): what lands is the file, byte for byte, both ways, TLS (sealed) or not; a part that breaks
leaves no file and no temporary. Thresholds are lowered so that small files split."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blit.transport import data
from blit.transport.tree import TopJob, TreeCounters, TreeSpec, pull_tree, push_tree

from .conftest import Daemon, start_daemon
from .treeutil import assert_same_tree


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Split files of 1 MiB and more, in 256 KiB frames; record each part taken (file, parts)."""
    monkeypatch.setattr(data, "SPLIT_MIN", 1 << 20)
    monkeypatch.setattr(data, "FRAME_CHUNK", 256 << 10)
    seen: list[tuple[int, int]] = []
    real = data._Landing.part_target

    def spy(self: data._Landing, file_id: int, total: int) -> int:
        if file_id not in self._held:
            seen.append((file_id, total))
        return real(self, file_id, total)

    monkeypatch.setattr(data._Landing, "part_target", spy)
    return seen


async def _run(d: Daemon, tmp_path: Path, direction: str) -> tuple[Path, Path, TreeCounters]:
    local = tmp_path / f"local-{direction}"
    remote = d.modules["data"] / direction
    src, dst = (local, remote) if direction == "push" else (remote, local)
    src.mkdir()
    (src / "big").write_bytes(os.urandom((3 << 20) + 12345))  # not a multiple of a frame
    (src / "exact").write_bytes(os.urandom(2 << 20))
    (src / "small").write_bytes(b"x" * 100)
    dst.mkdir()
    counters = TreeCounters()
    async with d.session() as s:
        if direction == "push":
            done = await push_tree(s, os.fsencode(local), "data", direction.encode(), TopJob(), TreeSpec(), 2, counters=counters)
        else:
            done = await pull_tree(s, "data", direction.encode(), os.fsencode(local), TopJob(), TreeSpec(), 2, counters=counters)
    assert done.files_copied == 3 and not done.failures, done
    return src, dst, counters


@pytest.mark.parametrize("tls", [True, False], ids=["sealed", "cleartext"])
@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_a_large_file_lands_whole_from_parts_sent_at_once(nursery, tmp_path: Path, direction: str, tls: bool, small_parts: list[tuple[int, int]]) -> None:  # type: ignore[no-untyped-def]
    d = await start_daemon(nursery, tmp_path / "d", tls=tls)
    src, dst, counters = await _run(d, tmp_path, direction)
    assert_same_tree(src, dst)
    # Both large files came in two parts (one per stream granted), on the two streams there are
    # (which stream takes which part is the streams' race), and every byte came once.
    assert sorted(t for _, t in small_parts) == [2, 2, 2, 2], small_parts
    assert len(counters.streams) == 2
    assert sum(st.bytes for st in counters.streams) == (3 << 20) + 12345 + (2 << 20) + 100
    assert not [p for p in dst.rglob("*") if p.name.startswith(".blit-")]


async def test_a_peer_without_parts_gets_whole_files(nursery, tmp_path: Path, small_parts: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A daemon from before FEATURE_SPLIT (it does not grant it): files go whole, as before."""
    from blit.daemon import handlers
    from blit.transport import protocol

    real = handlers._features
    monkeypatch.setattr(handlers, "_features", lambda asked: [f for f in real(asked) if f != protocol.FEATURE_SPLIT])
    d = await start_daemon(nursery, tmp_path / "d", tls=True)
    for direction in ("push", "pull"):
        src, dst, _ = await _run(d, tmp_path, direction)
        assert_same_tree(src, dst)
    assert small_parts == []


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_a_part_whose_stream_breaks_leaves_no_file(nursery, tmp_path: Path, direction: str, small_parts: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The second part's stream breaks mid-way: the file fails (the run says so), nothing lands
    under its name and no temporary is left; the rest of the run is unaffected."""
    real = data.StreamIO.send_file_range
    broke: list[int] = []

    def breaking(self: data.StreamIO, fd: int, offset: int, length: int) -> int:
        if offset >= (2 << 20) and not broke:  # a frame of the big file's second part
            broke.append(offset)
            self.kick()
        return real(self, fd, offset, length)

    monkeypatch.setattr(data.StreamIO, "send_file_range", breaking)
    d = await start_daemon(nursery, tmp_path / "d", tls=True)
    local = tmp_path / "local"
    remote = d.modules["data"] / "t"
    src, dst = (local, remote) if direction == "push" else (remote, local)
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    dst.mkdir()
    from blit.errors import BlitError

    try:
        async with d.session() as s:
            if direction == "push":
                done = await push_tree(s, os.fsencode(local), "data", b"t", TopJob(), TreeSpec(), 2)
            else:
                done = await pull_tree(s, "data", b"t", os.fsencode(local), TopJob(), TreeSpec(), 2)
        assert done.failures, done
    except BlitError:
        pass
    assert broke, "the second part was never sent"
    assert not (dst / "big").exists()
    assert not [p for p in dst.rglob("*") if p.name.startswith(".blit-")]


async def test_a_file_pulled_in_parts_through_the_file_api_lands_whole(nursery, tmp_path: Path, small_parts: list[tuple[int, int]]) -> None:  # type: ignore[no-untyped-def]
    """The file-level API (`RemoteSession.transfer`, a LocalSink: a dataclass, not hashable)
    takes a file in parts too."""
    from blit.transport import protocol as p
    from blit.transport.client import LocalSink

    d = await start_daemon(nursery, tmp_path / "d", tls=True)
    payload = os.urandom((2 << 20) + 7)
    (d.modules["data"] / "x").write_bytes(payload)
    out = tmp_path / "x.out"
    async with d.session() as s:
        async with s.transfer("data", b"", "pull", streams=2) as t:
            await t.send_files([p.FileRef(id=1, path=b"x")], last=True)
            await t.run_receivers(LocalSink({1: (out, None, None)}))
    assert out.read_bytes() == payload
    assert sorted(small_parts) == [(1, 2), (1, 2)]

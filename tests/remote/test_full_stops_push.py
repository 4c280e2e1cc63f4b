"""A push into a daemon whose disk fills up stops there: the daemon ends the data streams as
soon as a write fails with ENOSPC, and the client reports the daemon's reason (R30's
`No space left on device (writing PATH)`) instead of sending the rest of the file first. Every
carrier: raw TCP with TLS (records opened in memory), raw cleartext (spliced), and the HTTP/2
fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blit.errors import RemoteError
from blit.transport.tree import TopJob, TreeCounters, TreeSpec, push_tree

from helpers import mounted_tmpfs
from .conftest import start_daemon

MiB = 1 << 20
SIZE = 256 * MiB


def _big_file(path: Path) -> None:
    block = os.urandom(MiB)  # not sparse: the sender skips holes
    with open(path, "wb") as f:
        for _ in range(SIZE // MiB):
            f.write(block)


@pytest.mark.root
@pytest.mark.parametrize(("tls", "force_h2"), [(True, False), (False, False), (True, True)], ids=["tls", "cleartext", "h2"])
async def test_a_push_into_a_full_module_stops_within_a_few_frames(nursery: trio.Nursery, tmp_path: Path, tls: bool, force_h2: bool) -> None:
    d = await start_daemon(nursery, tmp_path / "d", tls=tls, force_h2_data=force_h2, stall=20.0)
    src = tmp_path / "src"
    src.mkdir()
    await trio.to_thread.run_sync(_big_file, src / "big")
    with mounted_tmpfs(d.modules["data"] / "full", "3m"):
        counters = TreeCounters()
        async with d.session(force_h2_data=force_h2) as s:
            with pytest.raises(RemoteError) as got:
                await push_tree(s, os.fsencode(src), "data", b"full", TopJob(), TreeSpec(), 2, counters=counters)
        assert got.value.code == "io-error"
        assert got.value.message == "No space left on device (writing big)"
        sent = sum(st.bytes for st in counters.streams)
        # 3 MiB fit; then at most the rest of one 16 MiB frame and what the sockets buffer.
        assert sent < 96 * MiB, f"the client sent {sent / MiB:.0f} MiB of a {SIZE // MiB} MiB file into a full disk"
        assert not [p for p in (d.modules["data"] / "full").rglob("*") if p.is_file()]  # nothing partial

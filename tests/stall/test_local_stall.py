"""Stall injection on the local engine: a file operation that never returns is reported as a
stall within the stall timeout, the rest of the run goes on, and nothing is left half-written."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

import blit
from blit import fsops
from blit.ffi import scan
from blit.transfer import Timeouts


def _tree(root: Path, dirs: int = 4, files: int = 5) -> None:
    for d in range(dirs):
        p = root / f"d{d}"
        p.mkdir(parents=True)
        for f in range(files):
            (p / f"f{f}").write_bytes(os.urandom(100))


async def _copy_stalled(src: Path, dst: Path, release: threading.Event, limit: float) -> blit.Summary:
    """Copy `src/` to `dst` with a 0.5 s stall time, failing the test past `limit` s; the hung
    call is let go afterwards, whatever happened."""
    try:
        with trio.fail_after(limit):
            return await blit.copy(f"{src}/", str(dst), blit.Options(timeouts=Timeouts(stall=0.5)))
    finally:
        release.set()


async def test_stuck_small_file_copy_is_reported_as_stall_and_others_land(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    release = threading.Event()
    real, real_batch = fsops.copy_small, scan.copy_new

    def in_d1(src_dir: int) -> bool:
        return os.path.basename(os.readlink(f"/proc/self/fd/{src_dir}")) == "d1"

    def stuck(src_dir, name, dst_dir, dst_name, m, replace, inherit_gid=True):  # type: ignore[no-untyped-def]
        if name == "f2" and in_d1(src_dir):
            release.wait(30)  # a hung syscall, as on a dead NFS mount
        return real(src_dir, name, dst_dir, dst_name, m, replace, inherit_gid)

    def stuck_batch(src_dir, dst_dir, batch, inherit_gid):  # type: ignore[no-untyped-def]
        # New small files are copied in C, a directory batch per call: the same hang there.
        if any(n == b"f2" for n, _ in batch) and in_d1(src_dir):
            release.wait(30)
        return real_batch(src_dir, dst_dir, batch, inherit_gid)

    monkeypatch.setattr(fsops, "copy_small", stuck)
    monkeypatch.setattr(scan, "copy_new", stuck_batch)
    summary = await _copy_stalled(src, dst, release, 10)
    stalls = [f for f in summary.failures if f.op == "stall"]
    assert [f.path for f in stalls] == ["d1"]
    assert "no progress for 0.5 s" in stalls[0].message
    assert summary.exit_code == 3
    for d in ("d0", "d2", "d3"):
        for f in range(5):
            assert (dst / d / f"f{f}").read_bytes() == (src / d / f"f{f}").read_bytes()
    # Whatever landed in the stalled directory is complete; nothing is half-written.
    for p in (dst / "d1").iterdir():
        assert p.read_bytes() == (src / "d1" / p.name).read_bytes()


async def test_stuck_large_file_chunk_is_reported_as_stall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(6 << 20))
    (src / "small").write_bytes(b"ok")
    release = threading.Event()

    def stuck(sfd, dfd, offset, length):  # type: ignore[no-untyped-def]
        release.wait(30)
        return 0

    monkeypatch.setattr(fsops, "copy_range", stuck)
    monkeypatch.setattr(blit.transfer.ffi, "reflink", lambda a, b: False)
    try:
        with trio.fail_after(10):
            summary = await blit.copy(f"{src}/", str(dst), blit.Options(timeouts=Timeouts(stall=0.5)))
    finally:
        release.set()
    assert [(f.path, f.op) for f in summary.failures] == [("big", "copy")]
    assert "stall" in summary.failures[0].message or "no progress" in summary.failures[0].message
    assert (dst / "small").read_bytes() == b"ok"
    assert not (dst / "big").exists()
    assert [p.name for p in dst.iterdir() if p.name.startswith(".blit-")] == []


async def test_a_hung_hard_link_member_is_reported_as_a_stall_and_its_group_hands_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hard-link members are made in batches per thread hop (R63): a copy in such a batch that
    never returns (a hung disk) is reported within the stall time, the other members of its
    group land linked to the next one, and the run ends. The batches had no stall guard: the
    run waited for the disk forever (QA pass 4)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
    for g in range(20):
        (src / "a" / f"g{g}").write_bytes(b"%d" % g)
        os.link(src / "a" / f"g{g}", src / "b" / f"g{g}")
    release = threading.Event()
    real = fsops.copy_small
    hung: list[str] = []

    def stuck(src_dir, name, dst_dir, dst_name, m, replace, inherit_gid=True, acl_inherited=False):  # type: ignore[no-untyped-def]
        if name == "g7" and not hung:  # the group's first copy, in whichever directory
            hung.append(os.path.basename(os.readlink(f"/proc/self/fd/{src_dir}")))
            release.wait(30)  # a hung syscall, as on a dead NFS mount
        return real(src_dir, name, dst_dir, dst_name, m, replace, inherit_gid, acl_inherited)

    monkeypatch.setattr(fsops, "copy_small", stuck)
    summary = await _copy_stalled(src, dst, release, 15)
    first = hung[0]
    other = "b" if first == "a" else "a"
    # g7 and the firsts after it in the same call (name order) were not done: each is a stall
    # failure, and the other name of its group became the group's first.
    names = sorted(f"g{g}" for g in range(20))
    failed = names[names.index("g7") :]
    assert [(f.path, f.op) for f in summary.failures] == [(f"{first}/{n}", "copy") for n in failed], summary.failures
    assert all(f.message == "hard links: no progress for 0.5 s" for f in summary.failures), summary.failures
    assert summary.exit_code == 3
    for n in names:
        assert (dst / other / n).read_bytes() == (src / other / n).read_bytes()
        if n not in failed:
            assert os.stat(dst / "a" / n).st_ino == os.stat(dst / "b" / n).st_ino

"""The library API for Trio applications: blit.copy/mirror/move return a Summary or raise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import blit


async def test_copy_returns_summary_with_counts(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"x" * 10)
    (src / "g").write_bytes(b"y" * 5)
    s = await blit.copy(f"{src}/", str(tmp_path / "dst"))
    assert (s.files_copied, s.bytes_copied, s.exit_code) == (2, 15, 0)
    assert (tmp_path / "dst" / "a" / "f").read_bytes() == b"x" * 10
    again = await blit.copy(f"{src}/", str(tmp_path / "dst"))
    assert (again.files_copied, again.files_skipped) == (0, 2)


async def test_mirror_deletes_extras(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "keep").write_bytes(b"k")
    dst.mkdir()
    (dst / "extra").write_bytes(b"e")
    s = await blit.mirror(f"{src}/", str(dst))
    assert s.files_deleted == 1
    assert sorted(os.listdir(dst)) == ["keep"]


async def test_move_removes_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    s = await blit.move(f"{src}/", str(tmp_path / "dst"))
    assert s.exit_code == 0
    assert (tmp_path / "dst" / "f").read_bytes() == b"data"
    assert not (src / "f").exists()


async def test_bad_input_raises_usage_error_and_changes_nothing(tmp_path: Path) -> None:
    with pytest.raises(blit.UsageError, match="source does not exist"):
        await blit.copy(str(tmp_path / "missing"), str(tmp_path / "dst"))
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(blit.UsageError, match="inside the source"):
        await blit.copy(f"{src}/", str(src / "sub"))
    assert os.listdir(src) == []
    assert not (tmp_path / "dst").exists()


def test_public_api_is_pinned() -> None:
    assert sorted(blit.__all__) == sorted(
        [
            "BlitError", "Compare", "ConfigError", "ConnectError", "FatalError", "FileError",
            "Options", "ProtocolError", "RemoteError", "StallError", "Summary", "Timeouts",
            "TransportError", "UsageError", "__version__", "copy", "mirror", "move",
        ]
    )
    for name in blit.__all__:
        assert getattr(blit, name) is not None

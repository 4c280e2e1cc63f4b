"""A directory whose listing is above the control plane's message limit (8 MiB; here 2,600
files with a 3.5 KiB xattr each) goes in manifest parts (decisions R32) with the real limits,
through a real daemon: it lands exactly, both ways, and the daemon logs no traceback. (Before
the parts, this was refused: "directory 'wide' is too large to send".)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import rmtree

from .conftest import DaemonProcess
from .test_cli_transfer import blit, url
from .treeutil import assert_same_tree


def _huge(d: Path) -> None:
    (d / "wide").mkdir(parents=True)
    value = b"x" * 3500
    for i in range(2600):
        p = d / "wide" / f"f{i:04d}"
        p.write_bytes(b"")
        os.setxattr(p, "user.big", value)


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_listing_above_the_message_limit_goes_in_parts(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    d = daemon_process
    module = d.modules["data"]
    local = tmp_path / "local"
    src, dst = (local / "src", module / "dst") if direction == "push" else (module / "src", local / "dst")
    try:
        _huge(src)
        a, b = (f"{src}/", url(d, "data/dst/")) if direction == "push" else (url(d, "data/src/"), f"{dst}/")
        r = blit(d, "copy", a, b)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert_same_tree(src, dst)
        assert "Traceback" not in d.log()
    finally:
        for p in (local, module / "src", module / "dst"):
            rmtree(p)

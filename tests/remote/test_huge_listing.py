"""A directory whose listing is above the control plane's message limit (8 MiB; here 2,600
files with a 3.5 KiB xattr each): the run stops with one line naming the directory and saying
it is not supported yet (exit 1), nothing is written, and the daemon logs no traceback and
keeps serving."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import rmtree

from .conftest import DaemonProcess
from .test_cli_transfer import blit, errors, url


def _huge(d: Path) -> None:
    (d / "wide").mkdir(parents=True)
    value = b"x" * 3500
    for i in range(2600):
        p = d / "wide" / f"f{i:04d}"
        p.write_bytes(b"")
        os.setxattr(p, "user.big", value)


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_listing_above_the_message_limit_is_one_clear_error(daemon_process: DaemonProcess, tmp_path: Path, direction: str) -> None:
    d = daemon_process
    module = d.modules["data"]
    local = tmp_path / "local"
    src, dst = (local / "src", module / "dst") if direction == "push" else (module / "src", local / "dst")
    try:
        _huge(src)
        a, b = (f"{src}/", url(d, "data/dst/")) if direction == "push" else (url(d, "data/src/"), f"{dst}/")
        r = blit(d, "copy", a, b)
        assert r.returncode == 1, (r.stdout, r.stderr)
        lines = errors(r)
        assert len(lines) == 1, r.stderr
        assert "'wide'" in lines[0] and "too large" in lines[0] and "not supported yet" in lines[0], lines
        assert not (dst / "wide").exists() or not os.listdir(dst / "wide")
        assert "Traceback" not in d.log()
        # The daemon still serves.
        (local / "ok").mkdir(parents=True, exist_ok=True)
        (local / "ok" / "f").write_bytes(b"still here")
        r = blit(d, "copy", f"{local}/ok/", url(d, "data/ok/"))
        assert r.returncode == 0, r.stderr
        assert (module / "ok" / "f").read_bytes() == b"still here"
    finally:
        for p in (local, module / "src", module / "dst", module / "ok"):
            rmtree(p)

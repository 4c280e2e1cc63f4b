"""A remote copy loads the remote stack only: the local engine (transfer, worker) stays out of
it, as the remote stack stays out of a local copy (tests/test_cli_startup.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from helpers import imported_modules

from .conftest import DaemonProcess, blit_cmd

LOCAL_ENGINE = ("blit.transfer", "blit.worker")


def test_a_push_and_a_pull_import_nothing_of_the_local_engine(daemon_process: DaemonProcess, tmp_path: Path) -> None:
    d = daemon_process
    (tmp_path / "f").write_bytes(b"payload")
    cmd = blit_cmd()
    assert cmd[0] == sys.executable
    for args in (["copy", str(tmp_path / "f"), f"127.0.0.1:{d.port}:/data/f"],
                 ["copy", f"127.0.0.1:{d.port}:/data/f", str(tmp_path / "back")]):  # fmt: skip
        names = imported_modules([*cmd, *args], d.env)
        local = sorted(n for n in names if n.startswith(LOCAL_ENGINE))
        assert not local, f"blit {' '.join(args)} imports {local}"
    assert (d.modules["data"] / "f").read_bytes() == b"payload"
    assert (tmp_path / "back").read_bytes() == b"payload"

"""The remote commands as typer commands: registration, flags -> config, light imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import typer
from typer.testing import CliRunner

from blit import cli_remote

from .conftest import SRC

runner = CliRunner()


def make_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    cli_remote.register(app)
    return app


def test_register_adds_daemon_scan_and_list() -> None:
    result = runner.invoke(make_app(), ["--help"])
    assert result.exit_code == 0
    for name in ("daemon", "scan", "list"):
        assert name in result.output


def test_daemon_flags_become_overrides() -> None:
    with mock.patch.object(cli_remote, "_run_daemon") as run:
        result = runner.invoke(
            make_app(),
            ["daemon", "--config", "x.toml", "--root", "/srv", "--bind", "127.0.0.1", "--port", "7000", "--no-mdns", "--force-h2-data"],
        )
    assert result.exit_code == 0, result.output
    assert run.call_args.args == (Path("x.toml"),)
    assert run.call_args.kwargs == {
        "root": Path("/srv"),
        "bind": "127.0.0.1",
        "port": 7000,
        "mdns": False,
        "force_h2_data": True,
        "tls": None,
        "verbose": 0,
    }


def test_absent_flags_do_not_override_the_file() -> None:
    with mock.patch.object(cli_remote, "_run_daemon") as run:
        runner.invoke(make_app(), ["daemon"])
    kw = run.call_args.kwargs
    assert kw["mdns"] is None and kw["force_h2_data"] is None and kw["tls"] is None and kw["port"] is None


def test_list_rejects_a_malformed_target_with_one_line() -> None:
    result = runner.invoke(make_app(), ["list", "host:70000:/m"])
    assert result.exit_code == 2
    assert "out of range" in result.output


def test_daemon_bad_config_exits_nonzero(tmp_path: Path) -> None:
    result = runner.invoke(make_app(), ["daemon", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code != 0 and "cannot read config file" in result.output


@pytest.mark.parametrize("module", ["blit.cli_remote", "blit.cli"])
def test_importing_the_cli_stays_light(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "heavy = [m for m in ('trio', 'h2', 'cbor2', 'zeroconf', 'httpx2', 'cryptography') if m in sys.modules]; "
        "print(heavy)"
    )
    r = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"

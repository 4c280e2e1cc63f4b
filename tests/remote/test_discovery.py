"""mDNS advertise and browse, only inside a fresh network namespace (`unshare -n`, lo only), so
nothing is ever multicast on a real interface (STACK-NOTES §6)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import assert_one_branch, load_schema

from .conftest import SRC, blit_cmd, write_config

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare for a private network namespace"
)


def in_namespace(script: str, tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    body = tmp_path / "ns.sh"
    body.write_text("set -e\nip link set lo up\n" + script)
    env = dict(os.environ, PYTHONPATH=str(SRC), HOME=str(tmp_path / "home"))
    return subprocess.run(["unshare", "-n", "sh", str(body)], env=env, capture_output=True, text=True, timeout=timeout)


def test_advertise_and_browse_in_one_process(tmp_path: Path) -> None:
    prog = tmp_path / "mdns.py"
    prog.write_text(
        textwrap.dedent(
            """
            import json, trio
            from blit import discovery

            async def main():
                async with trio.open_nursery() as n:
                    n.start_soon(discovery.advertise,
                                 discovery.Advertisement(name="box-a", port=9031, modules=["photos", "music"], tls=True),
                                 ["127.0.0.1"])
                    await trio.sleep(2.5)
                    found = await discovery.browse(3.0, ["127.0.0.1"])
                    n.cancel_scope.cancel()
                print(json.dumps([s.__dict__ for s in found]))

            trio.run(main)
            """
        )
    )
    r = in_namespace(f"{sys.executable} {prog}\n", tmp_path)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout.strip().splitlines()[-1])
    (svc,) = [s for s in found if s["name"] == "box-a"]
    assert svc["port"] == 9031 and svc["version"] == 1 and svc["tls"] is True
    assert svc["modules"] == ["photos", "music"] and "127.0.0.1" in svc["addresses"]


def test_blit_scan_finds_a_running_blit_daemon(tmp_path: Path) -> None:
    cfg, _mods = write_config(tmp_path)
    text = cfg.read_text().replace("mdns = false", 'mdns = true\nmdns_name = "nsbox"\nmdns_interfaces = ["127.0.0.1"]')
    cfg.write_text(text)
    blit = " ".join(blit_cmd())
    r = in_namespace(
        f"""
{blit} daemon --config {cfg} --port 19555 > {tmp_path}/d.log 2>&1 &
pid=$!
sleep 3
{blit} scan --wait 3 --json
kill -TERM $pid
wait $pid
""",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr + (tmp_path / "d.log").read_text()
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    for x in rows:
        assert_one_branch(load_schema("list.schema.json"), x)
    (row,) = [x for x in rows if x["name"] == "nsbox"]
    assert row["port"] == 19555 and row["modules"] == ["data", "ro", "other"] and row["version"] == 1


def test_no_mdns_flag_advertises_nothing(tmp_path: Path) -> None:
    cfg, _mods = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("mdns = false", 'mdns = true\nmdns_name = "hidden"'))
    blit = " ".join(blit_cmd())
    r = in_namespace(
        f"""
{blit} daemon --config {cfg} --port 19556 --no-mdns > {tmp_path}/d.log 2>&1 &
pid=$!
sleep 2
{blit} scan --wait 2 --json
kill -TERM $pid
wait $pid
""",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "hidden" not in r.stdout

"""Start-up stays light: `blit --help` in under 100 ms without the heavy modules (best of 10), and a
copy of an empty tree in under 300 ms (best of 5); each after a warm-up, wall clock, real processes.
A local copy loads none of the remote stack (tests/remote/test_cli_imports.py: the converse)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import BLIT, BLIT_ENV, imported_modules, make_tree

pytestmark = pytest.mark.usefixtures("blit_exe")

# The list, plus what httpx brings along.
HEAVY = ("trio", "h2", "httpx", "httpx2", "httpcore", "httpcore2", "anyio", "zeroconf", "pydantic")


REMOTE_STACK = ("h2", "hpack", "hyperframe", "cbor2", "platformdirs", "blit.transport", "blit.credentials")


def _best_of(argv: list[str], n: int = 10) -> float:
    subprocess.run(argv, capture_output=True, env=BLIT_ENV, check=True)  # warm-up
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, env=BLIT_ENV)
        best = min(best, time.perf_counter() - t0)
        assert proc.returncode == 0, proc.stderr
    return best


def test_help_answers_in_under_100_ms() -> None:
    best = _best_of([BLIT, "--help"])
    assert best < 0.100, f"blit --help took {best * 1000:.0f} ms (best of 10)"


@pytest.mark.parametrize("argv", [["--help"], ["copy", "--help"]], ids=["blit --help", "blit copy --help"])
def test_help_imports_no_heavy_module(argv: list[str]) -> None:
    """Run the console script under -X importtime and list every top-level package imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", BLIT, *argv],
                          capture_output=True, env=BLIT_ENV, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Usage" in proc.stdout
    imported = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            imported.add(name.split(".")[0])
    assert "typer" in imported or "click" in imported, "importtime output not understood"
    heavy = sorted(set(HEAVY) & imported)
    assert not heavy, f"`blit {' '.join(argv)}` imports {heavy}"


def test_help_via_python_m_imports_no_heavy_module() -> None:
    code = (
        "import sys, runpy\n"
        "sys.argv = ['blit', '--help']\n"
        "try:\n    runpy.run_module('blit', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=BLIT_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = proc.stdout.rsplit("LOADED", 1)[1].strip()
    assert loaded == "[]", f"python -m blit --help imports {loaded}"


def test_copy_of_an_empty_tree_finishes_in_under_300_ms(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {})
    best = float("inf")
    for i in range(6):  # the first run is the warm-up
        dst = tmp_path / f"dst{i}"
        t0 = time.perf_counter()
        proc = subprocess.run([BLIT, "copy", f"{src}/", str(dst)], capture_output=True, env=BLIT_ENV)
        elapsed = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr
        assert dst.is_dir()
        if i:
            best = min(best, elapsed)
    assert best < 0.300, f"copy of an empty tree took {best * 1000:.0f} ms (best of 5)"


def test_version_and_help_exit_0() -> None:
    proc = subprocess.run([BLIT, "--version"], capture_output=True, text=True, env=BLIT_ENV)
    assert proc.returncode == 0 and proc.stdout.startswith("blit "), proc
    proc = subprocess.run([BLIT, "--help"], capture_output=True, text=True, env=BLIT_ENV)
    for verb in ("copy", "mirror", "move"):
        assert verb in proc.stdout


def test_a_local_copy_imports_nothing_of_the_remote_stack(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"a": "x", "d": {"b": "y"}})
    names = imported_modules([sys.executable, BLIT, "copy", f"{src}/", str(tmp_path / "dst")], BLIT_ENV)
    assert (tmp_path / "dst" / "d" / "b").read_text() == "y"
    remote = sorted(n for n in names if n.startswith(REMOTE_STACK))
    assert not remote, f"a local copy imports {remote}"

"""The `blit` console script: start the prefetch (blit.prefetch) before the heavy imports, then
hand over to the typer CLI. It must stay this small: everything it imports delays every command."""

from __future__ import annotations

import sys


def main() -> None:
    from . import prefetch

    prefetch.start(sys.argv[1:])
    from .cli import main as cli_main

    cli_main()

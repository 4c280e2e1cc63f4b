"""The `blit-utils` command: admin verbs over a blit daemon.

The verbs arrive with the daemon (issue 4); until then each names itself and exits 2.
This module must not contain transfer logic.
"""

from __future__ import annotations

import sys

VERBS = ("scan", "ls", "list", "rm", "find", "du", "df", "completions", "profile")


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print("usage: blit-utils VERB [ARGS] [--json]\n\nverbs: " + ", ".join(VERBS))
        raise SystemExit(0 if args else 2)
    sys.stderr.write(f"blit-utils: error: '{args[0]}' is not available yet\n")
    raise SystemExit(2)

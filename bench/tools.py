"""The commands being compared: blit and its peers, for a fresh copy and for a mirror.

Each tool is named by a short key (used by ``--tools`` and in ratios) and run in one of two
modes. The command lines are the ones ANCHORS.md measured:

| key | copy | mirror |
|---|---|---|
| blit | ``blit copy SRC/ DST/`` | ``blit mirror SRC/ DST/`` |
| rsync | ``rsync -a SRC/ DST/`` | ``rsync -a --delete SRC/ DST/`` |
| cp | ``cp -a SRC DST`` (DST absent) | |
| tar | ``tar -C SRC -cf - . | tar -C DST -xf -`` (DST an empty dir; bash, pipefail) | |
| shutil | ``python -c 'shutil.copytree(SRC, DST, symlinks=True)'`` (DST absent) | |

``shutil`` runs under the same interpreter as the bench (the venv's), like blit itself.

Remote workloads use the same command lines with an endpoint in place of SRC (pull) or DST
(push), built by daemons.py: ``127.0.0.1:PORT:/mod/PATH/`` for blit, ``rsync://127.0.0.1:PORT/
mod/PATH/`` for rsync. They add one tool, ``blit-notls``: blit with ``--no-tls``, against a
daemon run with ``--no-tls``.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

COPY = "copy"
MIRROR = "mirror"
PEERS = ("rsync", "cp", "tar", "shutil")
ALL = ("blit", *PEERS)
REMOTE = ("blit", "blit-notls", "rsync")
EVERY = (*ALL, "blit-notls")  # what --tools accepts
BLITS = ("blit", "blit-notls")

_TAR_PIPE = 'set -o pipefail; tar -C "$1" -cf - . | tar -C "$2" -xf -'
_SHUTIL = "import shutil,sys; shutil.copytree(sys.argv[1], sys.argv[2], symlinks=True)"


def default_blit() -> str:
    """The ``blit`` console script next to the running interpreter (the venv's)."""
    return str(Path(sys.executable).parent / "blit")


@dataclass(frozen=True)
class Tools:
    """Builds command lines; ``blit`` is the path of the blit executable under test."""

    blit: str
    python: str = sys.executable

    def blit_available(self) -> bool:
        return os.path.isfile(self.blit) and os.access(self.blit, os.X_OK)

    @staticmethod
    def label(key: str, mode: str) -> str:
        if mode == MIRROR:
            return {"blit": "blit mirror", "blit-notls": "blit mirror --no-tls",
                    "rsync": "rsync -a --delete"}[key]
        return {
            "blit": "blit copy",
            "blit-notls": "blit copy --no-tls",
            "rsync": "rsync -a",
            "cp": "cp -a",
            "tar": "tar pipe",
            "shutil": "shutil.copytree",
        }[key]

    @staticmethod
    def needs_empty_dir(key: str) -> bool:
        """True when DST must exist (empty) before a fresh copy; else it must be absent."""
        return key == "tar"

    def argv(self, key: str, mode: str, src: str, dst: str) -> list[str]:
        s, d = src.rstrip("/"), dst.rstrip("/")
        if key == "blit-notls":
            return [*self.argv("blit", mode, src, dst), "--no-tls"]
        if mode == MIRROR:
            if key == "blit":
                return [self.blit, "mirror", s + "/", d + "/"]
            if key == "rsync":
                return ["rsync", "-a", "--delete", s + "/", d + "/"]
            raise ValueError(f"{key} has no mirror mode")
        if key == "blit":
            return [self.blit, "copy", s + "/", d + "/"]
        if key == "rsync":
            return ["rsync", "-a", s + "/", d + "/"]
        if key == "cp":
            return ["cp", "-a", s, d]
        if key == "tar":
            return [shutil.which("bash") or "bash", "-c", _TAR_PIPE, "tar-pipe", s, d]
        if key == "shutil":
            return [self.python, "-c", _SHUTIL, s, d]
        raise ValueError(f"unknown tool {key!r}")

    def shown(self, key: str, mode: str, direction: str | None = None) -> str:
        """The command line as the report prints it, with SRC and DST placeholders (and the
        endpoint's shape for a remote ``direction``, push or pull)."""
        src, dst = "SRC", "DST"
        if direction is not None:
            url = ("rsync://127.0.0.1:PORT/mod/{}" if key == "rsync"
                   else "127.0.0.1:PORT:/mod/{}")
            if direction == "push":
                dst = url.format("DST")
            else:
                src = url.format("SRC")
        argv = self.argv(key, mode, src, dst)
        if key == "tar":
            return "tar -C SRC -cf - . | tar -C DST -xf -"
        if key == "shutil":
            return f"python -c '{_SHUTIL}' SRC DST"
        if key in BLITS:
            argv[0] = "blit"
        return " ".join(argv)

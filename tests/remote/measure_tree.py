"""Tree push/pull through a real `blit daemon` vs an rsync daemon, loopback, /dev/shm (by hand).

    python tests/remote/measure_tree.py [--files 20000] [--size 4096] [--per-dir 500] [--big-mib 0]

Runs are interleaved (blit push, rsync push, blit pull, rsync pull, ...) and the medians are
printed. blit runs in this process (no interpreter start-up counted); rsync as a command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio  # noqa: E402

from blit.transport.remote import remote_transfer  # noqa: E402
from tests.remote.conftest import run_daemon_process  # noqa: E402
from blit.transport import protocol as _p  # noqa: E402
_p.VALIDATE_OUTGOING = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tree(root: Path, files: int, size: int, per_dir: int, big_mib: int) -> None:
    root.mkdir(parents=True)
    data = os.urandom(size)
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir()
        (d / f"f{i:06d}").write_bytes(data)
    if big_mib:
        with open(root / "big.bin", "wb") as f:
            block = os.urandom(8 << 20)
            for _ in range(big_mib // 8):
                f.write(block)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--per-dir", type=int, default=500)
    ap.add_argument("--big-mib", type=int, default=0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--streams", type=int, default=2)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="blit-mtree-", dir="/dev/shm"))
    try:
        src = base / "src"
        make_tree(src, args.files, args.size, args.per_dir, args.big_mib)
        rs_mod = base / "rsync_mod"
        rs_mod.mkdir()
        rs_port = free_port()
        (base / "rsyncd.conf").write_text(
            f"pid file = {base}/rsyncd.pid\nuse chroot = no\n[m]\npath = {rs_mod}\nread only = no\nuid = root\ngid = root\n"
        )
        rsyncd = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={base}/rsyncd.conf", f"--port={rs_port}", "--address=127.0.0.1"])
        time.sleep(0.5)
        with run_daemon_process(base, tls=args.tls) as d:
            bmod = d.modules["data"]
            kh = base / "kh"
            host = f"127.0.0.1:{d.port}"
            res: dict[str, list[float]] = {k: [] for k in ("blit push", "rsync push", "blit pull", "rsync pull", "blit push (nothing changed)", "rsync push (nothing changed)")}
            for _ in range(args.runs):
                shutil.rmtree(bmod / "t", ignore_errors=True)
                t0 = time.perf_counter()
                s = trio.run(lambda: remote_transfer("copy", f"{src}/", f"{host}:/data/t/", tls_enabled=args.tls, known_hosts=kh, streams=args.streams))
                res["blit push"].append(time.perf_counter() - t0)
                assert s.exit_code == 0 and s.files_copied >= args.files, s
                t0 = time.perf_counter()
                s = trio.run(lambda: remote_transfer("mirror", f"{src}/", f"{host}:/data/t/", tls_enabled=args.tls, known_hosts=kh, streams=args.streams))
                res["blit push (nothing changed)"].append(time.perf_counter() - t0)
                assert s.files_copied == 0, s
                shutil.rmtree(rs_mod / "t", ignore_errors=True)
                t0 = time.perf_counter()
                subprocess.run(["rsync", "-a", f"{src}/", f"rsync://127.0.0.1:{rs_port}/m/t/"], check=True)
                res["rsync push"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                subprocess.run(["rsync", "-a", "--delete", f"{src}/", f"rsync://127.0.0.1:{rs_port}/m/t/"], check=True)
                res["rsync push (nothing changed)"].append(time.perf_counter() - t0)
                out = base / "out"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                s = trio.run(lambda: remote_transfer("copy", f"{host}:/data/t/", f"{out}/", tls_enabled=args.tls, known_hosts=kh, streams=args.streams))
                res["blit pull"].append(time.perf_counter() - t0)
                assert s.exit_code == 0 and s.files_copied >= args.files, s
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                subprocess.run(["rsync", "-a", f"rsync://127.0.0.1:{rs_port}/m/t/", f"{out}/"], check=True)
                res["rsync pull"].append(time.perf_counter() - t0)
                shutil.rmtree(out, ignore_errors=True)
            what = f"{args.files} x {args.size} B in dirs of {args.per_dir}" + (f" + {args.big_mib} MiB" if args.big_mib else "")
            print(f"{what}, TLS={args.tls}, streams={args.streams}, medians of {args.runs}:")
            for k, v in res.items():
                print(f"  {k:30s} {statistics.median(v):7.3f} s   (all: {', '.join(f'{x:.2f}' for x in v)})")
        rsyncd.terminate()
        rsyncd.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Launcher run between the bench and a measured command: ``python -I -S _spawn.py FD CMD...``.

Why it exists: a process forked from the bench and then exec'd keeps, in its ``ru_maxrss``,
the resident size the bench (a big Python process) had at fork time, so ``wait4`` on a direct
child overstates small commands by tens of MiB. This launcher is a bare interpreter (no site,
imports os, sys and time only): it forks, execs the command in the child, reaps it with
``wait4``, and writes ``maxrss_kib t_start t_end exit_code cpu_s`` to FD (``cpu_s``: user +
system time of the command and the descendants it reaped). The command's own
``ru_maxrss`` then carries only this launcher's few MiB (the "RSS floor", measured with
``true`` and printed in the report), and the times are taken right around fork and reap, on
CLOCK_MONOTONIC (``time.perf_counter``), the clock the bench's TTFB watcher uses too.
"""

import os
import sys
import time


def main() -> None:
    fd = int(sys.argv[1])
    argv = sys.argv[2:]
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(fd)
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"bench launcher: {argv[0]}: {exc.strerror}\n".encode())
        os._exit(127)
    _pid, status, usage = os.wait4(pid, 0)
    t1 = time.perf_counter()
    code = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    os.write(fd, f"{usage.ru_maxrss} {t0!r} {t1!r} {code} {cpu!r}\n".encode())
    os._exit(code if 0 <= code < 256 else 128 - code)


main()

"""Blit's benchmark harness: blit beside rsync, cp, a tar pipe and shutil.copytree.

Run from the repository root::

    python -m bench                      # every workload, tmpfs then disk, full SPEC sizes
    python -m bench --quick              # reduced sizes, one run each
    python -m bench --smoke --out F.md   # tiny trees, seconds; what tests/test_bench_smoke.py runs

See bench/README.md for every option and for what is measured. Standard library only; the peers
are rsync, GNU cp, GNU tar and bash from the system.
"""

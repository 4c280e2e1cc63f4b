"""Anonymous memory for the data plane's buffers (data streams, sealed records, TLS BIOs).

`anonymous(size)` is a zeroed buffer whose pages the kernel maps as they are first written and
takes back whole when it is freed: a stream's buffers cost nothing until data arrives, and a
small transfer touches a few pages of them. A bytearray of the same size writes every byte up
front (0.7 ms of CPU per MiB, at each stream's set-up on both sides), and glibc may keep its
memory after it is freed (decisions R67's QA: a daemon grew by 297 MB).

This module must not import anything of blit: the modules that use it import each other.
"""

from __future__ import annotations

import mmap


def anonymous(size: int) -> mmap.mmap:
    """`size` zeroed bytes, mapped as they are first written."""
    return mmap.mmap(-1, size)

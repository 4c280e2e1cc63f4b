"""A test server on 127.0.0.1 that takes one connection and hands it to `serve` in a thread of
its own (a proxy, an impostor data port). `close()` stops it and waits for the thread."""

from __future__ import annotations

import socket
import threading


class OneConnection:
    def __init__(self, timeout: float = 20) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(timeout)
        self.port: int = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)

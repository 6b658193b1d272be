"""A TCP proxy for tests that can drop every connection and stop listening, then
listen again on the same port: a network cut between a client and the server."""

from __future__ import annotations

import selectors
import socket
import threading
from typing import List, Optional, Tuple


class TcpProxy:
    def __init__(self, upstream: Tuple[str, int], port: int = 0) -> None:
        self.upstream = upstream
        self.port = port
        self.connections_accepted = 0
        self._lock = threading.Lock()
        self._sockets: List[socket.socket] = []
        self._listener: Optional[socket.socket] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def open(self) -> "TcpProxy":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, args=(listener, self._stop), daemon=True)
        self._thread.start()
        return self

    def cut(self) -> None:
        """Stops listening (new connections are refused) and drops every open connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    close = cut

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            while not stop.is_set():
                if not selector.select(timeout=0.05):
                    continue
                try:
                    downstream, _ = listener.accept()
                except OSError:
                    continue
                try:
                    upstream = socket.create_connection(self.upstream, timeout=10)
                    upstream.settimeout(None)
                except OSError:
                    downstream.close()
                    continue
                with self._lock:
                    if stop.is_set():
                        downstream.close()
                        upstream.close()
                        return
                    self._sockets += [downstream, upstream]
                    self.connections_accepted += 1
                for src, dst in ((downstream, upstream), (upstream, downstream)):
                    threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

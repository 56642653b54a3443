"""Server-side faults for the tests: a counting TCP proxy, a server filled to the brim."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from tests.support.db import connect, driver
from tests.support.proxy import _shut, listener, pipe


class CountingProxy:
    """A TCP proxy to ``upstream`` that counts the connections clients make through it.

    Each accepted client is one connection attempt of libpq; when the server
    is down the client is hung up on at once (as a refused connection would be).
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sock, self.port = listener()
        self.accepted = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _shut(client)
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        _shut(*self._sockets)


@contextlib.contextmanager
def server_filled(url: str, leave: int, **params: Any) -> Iterator[list[Any]]:
    """Open connections to ``url`` until the server refuses one, then close ``leave`` of them.

    While the block runs, the server accepts exactly ``leave`` more
    connections of that user (none once ``leave`` more are open).
    """
    held: list[Any] = []
    try:
        for _ in range(500):
            try:
                held.append(connect(url, **params))
            except driver.OperationalError:
                break
        else:  # pragma: no cover - the server has no limit this low
            raise RuntimeError("the server never refused a connection")
        for _ in range(leave):
            held.pop().close()
        yield held
    finally:
        for conn in held:
            with contextlib.suppress(Exception):
                conn.close()

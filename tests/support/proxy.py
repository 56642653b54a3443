"""A byte pump between two sockets, for the tests' TCP proxies."""

from __future__ import annotations

import socket
import threading


def listener(backlog: int = 64) -> tuple[socket.socket, int]:
    """A socket listening on a free port of 127.0.0.1, and that port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock, sock.getsockname()[1]


def pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until either side closes; then shut both down."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _shut(src, dst)


class HoldingProxy:
    """A TCP proxy to ``upstream`` that can hold back what the server sends.

    After ``hold(marker)``, once a client sends ``marker`` (a query's text),
    what the server sends next on that connection is kept until the server
    hangs up, then passed on in one piece, and the client's socket is left
    open: the client reads the last result and the server's goodbye
    together, and its socket stays quiet, as in the moment between a
    backend's farewell message and its exit. The client's next bytes find no
    server: the proxy hangs up on it then.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sock, self.port = listener(16)
        self._marker: bytes | None = None
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def hold(self, marker: bytes) -> None:
        self._marker = marker

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self._sockets += [client, upstream]
            gone = threading.Event()
            held: list[list[bytes]] = []  # this connection's: [what the server sent] once marked
            for target, args in ((self._up, (client, upstream)), (self._down, (upstream, client))):
                threading.Thread(target=target, args=(*args, gone, held), daemon=True).start()

    def _up(
        self,
        client: socket.socket,
        upstream: socket.socket,
        gone: threading.Event,
        held: list[list[bytes]],
    ) -> None:
        try:
            while (data := client.recv(65536)) and not gone.is_set():
                if self._marker is not None and self._marker in data:
                    self._marker = None
                    held.append([])
                upstream.sendall(data)
        except OSError:
            pass
        _shut(client, upstream)  # nothing to send it to: hang up on the client

    def _down(
        self,
        upstream: socket.socket,
        client: socket.socket,
        gone: threading.Event,
        held: list[list[bytes]],
    ) -> None:
        try:
            while data := upstream.recv(65536):
                if held:
                    held[0].append(data)
                else:
                    client.sendall(data)
        except OSError:
            pass
        gone.set()
        if not held:
            _shut(upstream, client)
            return
        client.sendall(b"".join(held[0]))  # the client's socket stays open

    def close(self) -> None:
        self.sock.close()
        _shut(*self._sockets)


def _shut(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

"""A session the server ends right after a result is not lent again (as JSON).

    manage.py farewell   # prints {"answer": 42, "first": PID, "second": PID, ...}

A proxy between the pool and the server holds the server's answer to one
query until the backend has been terminated and has exited, then passes the
answer and the backend's FATAL farewell on together and keeps the client's
socket open: the moment, made to last, between a backend's last message and
the close of its socket, when the socket check sees nothing to read.
"""
import json
import socket
import threading
import time

from django.core.management.base import BaseCommand
from django.db import connections

from django_postgrespool._legacy import pool_stats

SQL = "SELECT 42 AS held_result"


def shut(*sockets):
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except socket.error:
            pass


class HoldingProxy(object):
    """Forward to ``upstream``; once the client sends ``marker``, keep the server's bytes until it hangs up."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.marker = None
        self.sockets = []
        self.spawn(self.serve)

    def spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args)
        thread.daemon = True
        thread.start()

    def serve(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except socket.error:
                return
            upstream = socket.create_connection(self.upstream)
            self.sockets += [client, upstream]
            gone = threading.Event()
            held = []  # this connection's: [what the server sent] once marked
            self.spawn(self.up, client, upstream, gone, held)
            self.spawn(self.down, upstream, client, gone, held)

    def up(self, client, upstream, gone, held):
        try:
            while True:
                data = client.recv(65536)
                if not data or gone.is_set():
                    break  # nothing to send it to: hang up on the client
                if self.marker is not None and self.marker in data:
                    self.marker = None
                    held.append([])
                upstream.sendall(data)
        except socket.error:
            pass
        shut(client, upstream)

    def down(self, upstream, client, gone, held):
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if held:
                    held[0].append(data)
                else:
                    client.sendall(data)
        except socket.error:
            pass
        gone.set()
        if not held:
            shut(upstream, client)
        else:
            client.sendall(b"".join(held[0]))  # the client's socket stays open

    def close(self):
        self.sock.close()
        shut(*self.sockets)


def one(alias, sql, params=()):
    cursor = connections[alias].cursor()
    cursor.execute(sql, params)
    row = cursor.fetchone()
    connections[alias].close()  # the pool takes it back
    return row[0] if row else None


class Command(BaseCommand):
    def handle(self, *args, **options):
        default = connections.databases["default"]
        proxy = HoldingProxy((default["HOST"], int(default["PORT"])))
        connections.databases["farewell"] = dict(
            default, HOST="127.0.0.1", PORT=str(proxy.port),
            POOL_OPTIONS={"pre_ping": "socket", "pool_size": 1, "max_overflow": 0})
        report = {"error": None}
        try:
            first = report["first"] = one("farewell", "SELECT pg_backend_pid()")
            proxy.marker = SQL.encode("ascii")
            answer = []
            request = threading.Thread(target=lambda: answer.append(one("farewell", SQL)))
            request.start()
            deadline = time.time() + 5
            while time.time() < deadline and not one(
                    "default", "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
                    " AND state = 'idle' AND query = %s", (first, SQL)):
                time.sleep(0.02)
            one("default", "SELECT pg_terminate_backend(%s)", (first,))
            request.join(10)
            report["answer"] = answer[0] if answer else None
            try:
                report["second"] = one("farewell", "SELECT pg_backend_pid()")
            except Exception as error:
                report["error"] = "%s: %s" % (type(error).__name__, str(error).strip())
            report["invalidated"] = pool_stats("farewell")[0]["invalidated"]
        finally:
            proxy.close()
        self.stdout.write(json.dumps(report) + "\n")

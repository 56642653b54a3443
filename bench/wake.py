"""What waking a sleeping thread or process costs on this machine, in CPU time.

    python bench/wake.py [ROUND_TRIPS]

Two ping-pongs, each side sleeping until the other wakes it:

- ``thread``: two threads of one Python process over eventfds, the way the
  pool hands a connection to a waiting checkout (with the GIL changing hands);
- ``process``: two processes over a socket pair, the way a client and
  PgBouncer (or a server) wake each other.

Prints one JSON line: CPU µs (user + system, both sides) per wake-up, and
context switches per wake-up. The fleet report uses it to explain the CPU a
request costs (run.py).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import threading


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def thread_wakes(n: int) -> tuple[float, float]:
    """CPU µs and switches per wake-up, two threads ringing each other's eventfd."""
    ping, pong = os.eventfd(0), os.eventfd(0)

    def other() -> None:
        for _ in range(n):
            os.eventfd_read(ping)
            os.eventfd_write(pong, 1)

    peer = threading.Thread(target=other)
    before = resource.getrusage(resource.RUSAGE_SELF)
    peer.start()
    for _ in range(n):
        os.eventfd_write(ping, 1)
        os.eventfd_read(pong)
    peer.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.close(ping)
    os.close(pong)
    switches = (after.ru_nvcsw - before.ru_nvcsw) + (after.ru_nivcsw - before.ru_nivcsw)
    return (_cpu(after) - _cpu(before)) / (2 * n) * 1e6, switches / (2 * n)


def process_wakes(n: int) -> tuple[float, float]:
    """CPU µs and switches per wake-up, two processes over a socket pair."""
    mine, theirs = socket.socketpair()
    before = resource.getrusage(resource.RUSAGE_SELF)
    before_child = resource.getrusage(resource.RUSAGE_CHILDREN)
    pid = os.fork()
    if pid == 0:
        mine.close()
        for _ in range(n):
            theirs.recv(1)
            theirs.send(b"x")
        os._exit(0)
    theirs.close()
    for _ in range(n):
        mine.send(b"x")
        mine.recv(1)
    os.waitpid(pid, 0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    after_child = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine.close()
    cpu = _cpu(after) - _cpu(before) + _cpu(after_child) - _cpu(before_child)
    switches = sum(
        (a.ru_nvcsw - b.ru_nvcsw) + (a.ru_nivcsw - b.ru_nivcsw)
        for a, b in ((after, before), (after_child, before_child))
    )
    return cpu / (2 * n) * 1e6, switches / (2 * n)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    thread_us, thread_switches = thread_wakes(n)
    process_us, process_switches = process_wakes(n)
    print(json.dumps({
        "thread_us": thread_us, "thread_switches": thread_switches,
        "process_us": process_us, "process_switches": process_switches,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

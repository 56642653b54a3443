"""Failover through libpq's host list: the primary dies, the standby is promoted.

16 threads run write transactions on an alias whose ``HOST``/``PORT`` list
the primary then the standby, with ``target_session_attrs=read-write``. The
primary is stopped with ``-m immediate`` and, half a second later, the
standby is promoted. Commits are synchronous (``synchronous_standby_names =
'*'``), so an acknowledged commit is on the standby before the client hears
of it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest
from django.core.signals import request_finished, request_started
from django.db import DatabaseError, connections, transaction
from django_postgrespool import pool_stats

from tests.ha.conftest import Pair
from tests.reliability.figures import record
from tests.reliability.load import wait_until
from tests.support.db import connect
from tests.support.requests import open_idle

pytestmark = pytest.mark.reliability

THREADS = 16
POOL = {"pool_size": 8, "max_overflow": 8, "timeout": 10}
OUTAGE = 0.5  # seconds between the primary's death and the promotion
TABLE = "CREATE TABLE ha_commits (thread int, seq int, port int, PRIMARY KEY (thread, seq))"


@dataclass
class Attempt:
    thread: int
    seq: int
    start: float
    end: float = 0.0
    ok: bool = False
    port: int | None = None
    in_recovery: bool | None = None
    read_only: str | None = None
    error: BaseException | None = None


@dataclass
class Writers:
    """``threads`` threads of write transactions on ``alias``, each attempt recorded."""

    alias: str
    threads: int
    attempts: list[Attempt] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(n,), name=f"writer-{n}", daemon=True)
            for n in range(self.threads)
        ]

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        deadline = time.monotonic() + 30
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [t.name for t in self._threads if t.is_alive()]
        assert not hung, f"writer threads still running 30 s after the stop (a hang): {hung}"

    def _loop(self, n: int) -> None:
        seq = 0
        try:
            while not self._stop.is_set():
                seq += 1
                a = Attempt(n, seq, time.monotonic())
                request_started.send(sender=None)
                try:
                    with transaction.atomic(using=self.alias):
                        with connections[self.alias].cursor() as cursor:
                            # What the pool lent: a server in recovery, or a
                            # read-only session, would be a violation.
                            cursor.execute(
                                "SELECT pg_is_in_recovery(), "
                                "current_setting('transaction_read_only'), inet_server_port()"
                            )
                            a.in_recovery, a.read_only, a.port = cursor.fetchone()
                            cursor.execute(
                                "INSERT INTO ha_commits VALUES (%s, %s, %s)", (n, seq, a.port)
                            )
                    a.ok = True
                except DatabaseError as error:
                    a.error = error
                a.end = time.monotonic()
                request_finished.send(sender=None)
                with self._lock:
                    self.attempts.append(a)
                if not a.ok:
                    time.sleep(0.01)
        finally:
            connections.close_all()

    def snapshot(self) -> list[Attempt]:
        with self._lock:
            return list(self.attempts)


def _alias_from_settings(pooled_alias, pair: Pair, pre_ping: object) -> tuple[str, str]:
    return pooled_alias(
        "ha",
        NAME="postgres",
        HOST=pair.hosts,
        PORT=pair.ports,
        options={"target_session_attrs": "read-write", "connect_timeout": 2},
        pool_options={**POOL, "pre_ping": pre_ping},
    )


def _alias_from_url(pooled_alias, pair: Pair, pre_ping: object) -> tuple[str, str]:
    import django_postgrespool_dburl as dburl

    p, s = pair.primary, pair.standby
    url = (
        f"postgres://{p.user}:{quote(p.password, safe='')}@{p.host}:{p.port},{s.host}:{s.port}"
        f"/postgres?target_session_attrs=read-write&connect_timeout=2"
        f"&pool_size={POOL['pool_size']}&max_overflow={POOL['max_overflow']}"
        f"&timeout={POOL['timeout']}&pre_ping={str(pre_ping).lower()}"
    )
    entry = dburl.parse(url)
    assert (entry["HOST"], entry["PORT"]) == (pair.hosts, pair.ports)
    assert entry["OPTIONS"] == {"target_session_attrs": "read-write", "connect_timeout": 2}
    alias, app = pooled_alias("ha", pool_options=entry["POOL_OPTIONS"])
    settings = connections.settings[alias]
    for key in ("NAME", "USER", "PASSWORD", "HOST", "PORT"):
        settings[key] = entry[key]  # type: ignore[literal-required]
    settings["OPTIONS"] = {**entry["OPTIONS"], "application_name": app}
    return alias, app


@pytest.mark.parametrize("form", ["settings", "url"])
@pytest.mark.parametrize("pre_ping", ["socket", True], ids=["socket", "ping"])
def test_promoted_standby_serves_writes_within_2s_and_keeps_every_acknowledged_commit(
    pooled_alias, pair: Pair, form: str, pre_ping: object
) -> None:
    pair.primary.psql(TABLE)
    make = _alias_from_settings if form == "settings" else _alias_from_url
    alias, _app = make(pooled_alias, pair, pre_ping)
    primary, standby = pair.primary, pair.standby
    with Writers(alias, THREADS) as writers:
        assert wait_until(lambda: sum(a.ok for a in writers.snapshot()) >= 300, 30)
        killed = time.monotonic()
        primary.stop("immediate")
        time.sleep(OUTAGE)
        promoting = time.monotonic()
        standby.promote()
        promoted = time.monotonic()  # pg_ctl promote -w: the standby accepts writes
        back = wait_until(
            lambda: any(a.ok and a.start >= promoted for a in writers.snapshot()), 10, 0.005
        )
        time.sleep(1.0)  # keep writing on the new primary
    attempts = writers.snapshot()
    assert back, "no write succeeded within 10 s of the promotion"

    # Never lent a session in recovery, nor a read-only one.
    lent = [a for a in attempts if a.in_recovery is not None]
    wrong = [a for a in lent if a.in_recovery or a.read_only != "off"]
    assert not wrong, wrong[:3]

    # Every acknowledged commit is on the new primary.
    conn = connect(standby.url())
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT thread, seq FROM ha_commits")
            stored = set(cur.fetchall())
    finally:
        conn.close()
    acked = {(a.thread, a.seq) for a in attempts if a.ok}
    lost = acked - stored
    assert not lost, f"{len(lost)} acknowledged commit(s) missing on the new primary"

    after = [a for a in attempts if a.start >= promoted]
    first_ok = min(a.end for a in after if a.ok)
    recovery = first_ok - promoted
    failed = [a for a in attempts if not a.ok]
    # Once one write succeeded on the new primary, the pool knows where it is:
    # a failure after that would be a connection to the dead primary lent.
    stale = [a for a in attempts if a.start >= first_ok and not a.ok]
    case = f"failover ({form}), pre_ping={pre_ping}"
    record(case, "transactions", len(attempts))
    record(case, "committed", len(acked))
    record(case, "failed", len(failed))
    record(case, "failed in flight at the kill", sum(a.start < killed for a in failed))
    record(case, "failed after the promotion", sum(not a.ok for a in after))
    record(case, "failed after the first write on the new primary", len(stale))
    record(case, "promote", promoted - promoting, "s")
    record(case, "recovery after promotion", recovery, "s")
    record(case, "writes down", first_ok - killed, "s")
    assert all(isinstance(a.error, DatabaseError) for a in failed)
    assert not stale, [repr(a.error) for a in stale[:3]]
    assert {a.port for a in attempts if a.ok and a.start >= first_ok} == {standby.port}
    # The target is 2 s; it takes about 0.3 s here (the reconnect backoff).
    assert recovery < 2.0
    (stats,) = pool_stats(alias)
    assert stats["checked_out"] == 0, stats


@pytest.mark.parametrize("pre_ping", ["socket", True], ids=["socket", "ping"])
def test_session_that_became_read_only_is_not_lent_when_read_write_was_asked(
    pooled_alias, pair: Pair, pre_ping: object
) -> None:
    # A switchover script often starts by making the old primary read-only
    # (default_transaction_read_only=on, then a reload): the pool's idle
    # sessions stay open and become read-only; libpq only checks at connect,
    # so the pool has to, whatever pre_ping says.
    alias, _app = _alias_from_settings(pooled_alias, pair, pre_ping)
    open_idle(alias, 4)
    (stats,) = pool_stats(alias)
    assert stats["idle"] == 4
    pair.primary.psql("ALTER SYSTEM SET default_transaction_read_only = on")
    pair.primary.psql("SELECT pg_reload_conf()")
    time.sleep(0.2)  # the backends read the new configuration
    lent = []
    for _ in range(6):
        try:
            with connections[alias].cursor() as cursor:
                cursor.execute("SHOW transaction_read_only")
                lent.append(cursor.fetchone()[0])
        except DatabaseError:
            pass  # no read-write server left: refusing is right
        finally:
            connections[alias].close()
    assert "on" not in lent, f"read-only sessions lent: {lent}"

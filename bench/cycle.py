"""The pool's checkout → checkin cycle on a real connection, with and without metrics.

    python bench/cycle.py MODE CYCLES   # prints {"mode": ..., "us": µs per cycle}

One process per measurement (``run.py`` alternates the modes, round after
round): ``off`` (no exporter), ``merge`` (an OpenTelemetry SDK; the
histograms fed from the pool's counts, the default) and ``replay`` (the same
SDK, every timing recorded through ``record()``: the feed a view that changes
the histograms gets). The measured time covers CYCLES cycles and then one
collection of the SDK's metrics (with an exporter writing to /dev/null), so
what a collection does is counted too. The end-to-end request cycle
(cell ``ours_metrics``) carries the same difference, but a request costs
~200 µs and the machine's noise between rounds is several µs: this isolates
the part metrics can touch. The database is in ``BENCH_DB`` (JSON, as for
the worker).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def main(mode: str, cycles: int) -> None:
    import psycopg
    from django_postgrespool.options import PoolOptions
    from django_postgrespool.pool import ConnectionPool, Target

    db = json.loads(os.environ["BENCH_DB"])
    pool = ConnectionPool(
        "cycle",
        PoolOptions(pool_size=1, max_overflow=0),
        Target(database=db["database"], host=db["host"], port=str(db["port"]), user=db["user"]),
    )
    reader = None
    if mode != "off":
        from django_postgrespool.metrics import otel
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            PeriodicExportingMetricReader,
        )

        reader = PeriodicExportingMetricReader(
            # Collected once, at the end of the measurement (force_flush).
            ConsoleMetricExporter(out=open(os.devnull, "w")), export_interval_millis=3_600_000
        )
        meter = MeterProvider(metric_readers=[reader]).get_meter("django_postgrespool")
        instruments = otel.Instruments(
            meter, sdk=True, pools=lambda: [pool], merge=mode == "merge"
        )
        assert instruments.feed == mode, instruments.feed

    def connect() -> psycopg.Connection:
        return psycopg.connect(
            host=db["host"], port=db["port"], user=db["user"], password=db["password"],
            dbname=db["database"], autocommit=True,
        )

    me = threading.current_thread()
    lease = pool.checkout(connect, None, me)
    pool.checkin(lease)

    def run(n: int) -> None:
        for _ in range(n):
            pool.checkin(pool.checkout(connect, lease, me))
        if reader is not None:
            reader.force_flush()

    run(cycles // 10)  # warm-up
    started = time.perf_counter()
    run(cycles)
    elapsed = time.perf_counter() - started
    pool.close()
    print(json.dumps({"mode": mode, "us": elapsed / cycles * 1e6, "cycles": cycles}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

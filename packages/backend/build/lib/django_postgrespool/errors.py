"""Errors raised by the pool at run time."""

from __future__ import annotations

from typing import Any

from django.db.utils import OperationalError

__all__ = ["PoolError", "PoolTimeout"]


class PoolError(OperationalError):
    """Base class of the pool's run-time errors.

    Subclasses ``django.db.utils.OperationalError`` so that code already
    catching database errors keeps working.
    """


class PoolTimeout(PoolError):
    """No connection became free within the pool's ``timeout``."""

    def __init__(
        self,
        *,
        alias: str,
        pool_size: int,
        max_overflow: int,
        checked_out: int,
        timeout: float,
    ) -> None:
        self.alias = alias
        self.pool_size = pool_size
        self.max_overflow = max_overflow
        self.checked_out = checked_out
        self.timeout = timeout
        cap = pool_size + max_overflow
        super().__init__(
            f"Connection pool of database alias {alias!r} is exhausted: "
            f"{checked_out} of {cap} connections (pool_size={pool_size} + "
            f"max_overflow={max_overflow}) are checked out and none was returned "
            f"within timeout={timeout:g}s. Hint: look for requests or threads that "
            f"hold a connection (long transactions, CONN_MAX_AGE > 0 with more "
            f"threads than connections), or raise pool_size/max_overflow if the "
            f"server's max_connections allows it (README.rst, 'Sizing the pool')."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the error picklable (Django's parallel test runner pickles errors).
        return (
            _rebuild_timeout,
            (self.alias, self.pool_size, self.max_overflow, self.checked_out, self.timeout),
        )


def _rebuild_timeout(
    alias: str, pool_size: int, max_overflow: int, checked_out: int, timeout: float
) -> PoolTimeout:
    return PoolTimeout(
        alias=alias,
        pool_size=pool_size,
        max_overflow=max_overflow,
        checked_out=checked_out,
        timeout=timeout,
    )

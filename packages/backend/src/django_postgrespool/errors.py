"""Errors raised by the pool at run time."""

from __future__ import annotations

from typing import Any

from django.db.utils import OperationalError

from django_postgrespool import _rules

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
        super().__init__(
            _rules.timeout_message(alias, pool_size, max_overflow, checked_out, timeout)
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


def missing_extra(feature: str, extra: str, error: ImportError) -> ImportError:
    """The error for ``feature`` when a package of the ``extra`` it needs is not installed."""
    return ImportError(
        f"{feature} needs {error.name or 'a package'}, which is not installed: "
        f"pip install 'django-postgrespool[{extra}]'"
    )

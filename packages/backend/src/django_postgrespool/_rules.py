# -*- coding: utf-8 -*-
"""The pool options' rules and the texts users read: one copy for both backends.

``options.py`` (Python 3) and ``_legacy.py`` (Python 2.7, Django 1.4-1.6) both
validate with :func:`normalize` and :func:`merge`, and word their errors and
hints with the functions below, so a setting is read, refused and explained the
same way on every lane. This module is parsed by Python 2.7 too: no f-strings,
no annotations (type comments instead).
"""
import difflib
import math
import sys

from django.core.exceptions import ImproperlyConfigured

MYPY = False
if MYPY:  # pragma: no cover - type checking only
    from collections.abc import Callable, Mapping
    from typing import Any

if sys.version_info[0] >= 3:
    from collections.abc import Mapping as _Mapping

    _text = str  # type: Any
    _integer = (int,)  # type: Any
    _r = repr
else:  # pragma: no cover - legacy lane
    from collections import Mapping as _Mapping

    _text = basestring  # noqa: F821
    _integer = (int, long)  # noqa: F821

    def _r(value):
        """Return repr() as Python 3 writes it, so that messages read the same in both lanes."""
        if isinstance(value, _text):
            return "'%s'" % (value,)
        return repr(value)


#: Every pool option and its default.
DEFAULTS = {
    "pool_size": 5,
    "max_overflow": 10,
    "recycle": 3600.0,
    "timeout": 30.0,
    "pre_ping": "socket",
    "use_lifo": False,
    "reset": "rollback",
    "max_idle": None,
    "leak_timeout": None,
    "lease": "request",
    "fair_after": 0.03,
}  # type: dict[str, Any]
NAMES = tuple(sorted(DEFAULTS))

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NEVER = ("none", "never", "-1")

# -- where the documentation lives: every hint names a page of docs/ ----------

DOCS_URL = "https://django-postgrespool.readthedocs.io/en/latest/"
#: The pages hints point at (paths under docs/, without .rst); tests/docs checks they exist.
PAGES = {
    "options": "reference/options",
    "sizing": "guide/sizing",
    "conn_max_age": "guide/configuration",
    "pgbouncer": "guide/pgbouncer",
    "south": "guide/south",
    "legacy": "guide/south",
}


def see(topic):
    # type: (str) -> str
    """Return the end of a hint: the address of the docs page about ``topic``."""
    return "See %s%s.html" % (DOCS_URL, PAGES[topic])


# -- the rules ----------------------------------------------------------------


class Invalid(ValueError):
    """A value that an option does not accept; ``expected`` says what it accepts."""

    def __init__(self, expected):
        # type: (str) -> None
        super(Invalid, self).__init__(expected)
        self.expected = expected


def _int(value, minimum):
    # type: (object, int) -> int
    expected = "an integer >= %d" % minimum
    if isinstance(value, bool):
        raise Invalid(expected)
    if isinstance(value, _text):
        try:
            value = int(value.strip())
        except ValueError:
            raise Invalid(expected)
    if not isinstance(value, _integer) or value < minimum:
        raise Invalid(expected)
    return int(value)


def _number(value, expected):
    # type: (object, str) -> float
    """``value`` as a finite float (a number, or text of one), else Invalid(expected)."""
    if isinstance(value, bool):
        raise Invalid(expected)
    if isinstance(value, _text):
        try:
            value = float(value.strip())
        except ValueError:
            raise Invalid(expected)
    if not isinstance(value, _integer + (float,)):
        raise Invalid(expected)
    number = float(value)
    if math.isinf(number) or math.isnan(number):
        raise Invalid(expected)
    return number


def _seconds(value):
    # type: (object) -> float
    expected = "a number of seconds > 0"
    number = _number(value, expected)
    if number <= 0:
        raise Invalid(expected)
    return number


def _fair_after(value):
    # type: (object) -> float
    expected = "a number of seconds >= 0 (0: first come, first served)"
    number = _number(value, expected)
    if number < 0:
        raise Invalid(expected)
    return number


def _is_never(value, words):
    # type: (object, tuple[str, ...]) -> bool
    """None, one of ``words``, or the number -1 (SQLAlchemy's own spelling of "never")."""
    if value is None:
        return True
    if isinstance(value, _text):
        return value.strip().lower() in words
    return isinstance(value, _integer + (float,)) and not isinstance(value, bool) and value == -1


def _recycle(value):
    # type: (object) -> float | None
    if _is_never(value, _NEVER):
        return None
    try:
        return _seconds(value)
    except Invalid:
        raise Invalid("a number of seconds > 0, or None (never recycle)")


def _optional_seconds(value):
    # type: (object) -> float | None
    if _is_never(value, _NEVER + ("off",)):
        return None
    try:
        return _seconds(value)
    except Invalid:
        raise Invalid("a number of seconds > 0, or None (off)")


def _bool(value):
    # type: (object) -> bool
    if isinstance(value, bool):
        return value
    if isinstance(value, _integer) and value in (0, 1):
        return bool(value)
    if isinstance(value, _text):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise Invalid("a boolean (True/False, 'true'/'false', 1/0)")


def _pre_ping(value):
    # type: (object) -> bool | str
    if isinstance(value, _text) and value.strip().lower() == "socket":
        return "socket"
    try:
        return _bool(value)
    except Invalid:
        raise Invalid("one of True, False or 'socket'")


def _reset(value):
    # type: (object) -> str
    if isinstance(value, _text) and value.strip().lower() in ("rollback", "discard"):
        return str(value.strip().lower())
    raise Invalid("one of 'rollback' or 'discard'")


def _lease(value):
    # type: (object) -> str
    if isinstance(value, _text) and value.strip().lower() in ("request", "transaction"):
        return str(value.strip().lower())
    raise Invalid("one of 'request' or 'transaction'")


NORMALIZERS = {
    "pool_size": lambda v: _int(v, 1),
    "max_overflow": lambda v: _int(v, 0),
    "recycle": _recycle,
    "timeout": _seconds,
    "pre_ping": _pre_ping,
    "use_lifo": _bool,
    "reset": _reset,
    "max_idle": _optional_seconds,
    "leak_timeout": _optional_seconds,
    "lease": _lease,
    "fair_after": _fair_after,
}  # type: dict[str, Callable[[object], Any]]
assert set(NORMALIZERS) == set(DEFAULTS)


def normalize(options, source, unavailable=()):
    # type: (Mapping[str, object], str, tuple[str, ...]) -> dict[str, Any]
    """Validate pool options and return them in their canonical types.

    ``source`` names where the options were written (for example
    ``"DATABASES['default']['POOL_OPTIONS']"``); every error message starts
    with it. It must never contain a password. An option of ``unavailable``
    is refused unless it has its default (the legacy backend lacks a few).
    """
    if not isinstance(options, _Mapping):
        raise ImproperlyConfigured(
            "%s must be a dict of pool options, got %s. Valid options: %s."
            % (source, type(options).__name__, ", ".join(NAMES))
        )
    normalized = {}  # type: dict[str, Any]
    for key, value in options.items():
        normalizer = NORMALIZERS.get(key) if isinstance(key, _text) else None
        if normalizer is None:
            close = difflib.get_close_matches(str(key), NAMES, n=1)
            hint = " (did you mean %s?)" % _r(close[0]) if close else ""
            raise ImproperlyConfigured(
                "%s: unknown pool option %s%s. Valid options: %s."
                % (source, _r(key), hint, ", ".join(NAMES))
            )
        try:
            normalized[str(key)] = normalizer(value)
        except Invalid as error:
            raise ImproperlyConfigured(
                "%s: pool option %s must be %s; got %s."
                % (source, _r(key), error.expected, _r(value))
            )
        if key in unavailable and normalized[str(key)] != DEFAULTS[key]:
            raise ImproperlyConfigured(not_on_legacy_message(source, str(key)))
    return normalized


def split(options):
    # type: (Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]
    """Split a mapping into (pool options, everything else)."""
    pool = dict((k, v) for k, v in options.items() if k in NORMALIZERS)
    rest = dict((k, v) for k, v in options.items() if k not in NORMALIZERS)
    return pool, rest


def merge(alias, settings_dict, global_args, unavailable=()):
    # type: (str, Mapping[str, Any], Mapping[str, object] | None, tuple[str, ...]) -> dict[str, Any]
    """Return the validated options one alias sets, lowest precedence first.

    ``DATABASE_POOL_ARGS`` (every alias) < pool keys in ``OPTIONS`` (where
    dj-database-url puts a URL's query string) < ``POOL_OPTIONS``. Options
    not set are left out: the caller fills in the defaults. ``unavailable``
    is passed on to :func:`normalize`.
    """
    merged = {}  # type: dict[str, Any]
    if global_args is not None:
        merged.update(normalize(global_args, "DATABASE_POOL_ARGS", unavailable))
    if "OPTIONS" in settings_dict and not isinstance(settings_dict["OPTIONS"], _Mapping):
        raise ImproperlyConfigured(options_type_message(alias, settings_dict["OPTIONS"]))
    in_options, _ = split(settings_dict.get("OPTIONS") or {})
    merged.update(normalize(in_options, "DATABASES[%s]['OPTIONS']" % _r(alias), unavailable))
    per_alias = settings_dict.get("POOL_OPTIONS")
    merged.update(
        normalize({} if per_alias is None else per_alias,
                  "DATABASES[%s]['POOL_OPTIONS']" % _r(alias), unavailable)
    )
    if settings_dict.get("CONN_HEALTH_CHECKS") and "pre_ping" not in merged:
        # CONN_HEALTH_CHECKS asks for a verified connection at the start of
        # each request; under pooling that is a ping at checkout.
        merged["pre_ping"] = True
    return merged


def pool_settings(settings_dict):
    # type: (Mapping[str, Any]) -> dict[str, Any]
    """Return the part of an alias's settings :func:`merge` reads: no password in it.

    The frames that read the pool options may raise (a bad value), and
    Django's error page shows their locals (see :class:`HiddenParams`).
    """
    return {
        "OPTIONS": split(settings_dict.get("OPTIONS") or {})[0],
        "POOL_OPTIONS": settings_dict.get("POOL_OPTIONS"),
        "CONN_HEALTH_CHECKS": settings_dict.get("CONN_HEALTH_CHECKS"),
    }


# -- what Django's error page shows -------------------------------------------


class HiddenParams(dict):  # type: ignore[type-arg]
    """Connection parameters: a dict, shown without its values (the password is one).

    Django's DEBUG error page shows every local of every frame, and its
    emailed report those of frames not marked with ``sensitive_variables``:
    the frames of the backends hold the parameters only in this form.
    """

    __slots__ = ()

    def __repr__(self):
        # type: () -> str
        return "<connection parameters>"


class HiddenKey(tuple):  # type: ignore[type-arg]
    """A pool's key, made of an alias's settings (the password among them), shown without them."""

    __slots__ = ()

    def __repr__(self):
        # type: () -> str
        return "<settings of a pooled alias>"


# -- the server's farewell ----------------------------------------------------

#: Severities of the message with which the server ends a session.
FAREWELL = ("FATAL", "PANIC")


def said_farewell(notices):
    # type: (Any) -> bool
    """Tell whether the last of psycopg2's ``conn.notices`` is the server ending the session.

    A backend terminated, timed out or shut down while idle sends a FATAL
    message and exits. When that message comes right after a result, libpq
    reads both at once and hands the message to the notice processor (an
    error outside a query is not raised); the socket then stays quiet until
    the backend has exited, and the socket check would lend a connection
    already gone. Nothing can come after a farewell, so the last notice is the
    one to read, at checkin. psycopg2 gives the text only ("FATAL:  ..."), its
    severity as the server's lc_messages spells it (untranslated in English,
    the default). ``notices`` is whatever the application left there: a list,
    a deque, or None.
    """
    if not notices:
        return False
    try:
        return str(notices[-1]).startswith(FAREWELL)
    except Exception:  # not a sequence: the application replaced it
        return False


# -- ending a transaction -------------------------------------------------------


def roll_back(raw, status):
    # type: (Any, Callable[[], int]) -> None
    """End any transaction on the session of ``raw``, as the server sees it.

    ``status()`` reads libpq's transaction status (0: idle). psycopg2's
    rollback() goes by its own idea of the connection: in autocommit mode it
    sends nothing, so a transaction begun by hand (``cursor.execute("BEGIN")``)
    would stay open for the next borrower, who would run inside it, its
    writes never committed. ROLLBACK is then sent as a statement (harmless
    when nothing is open; psycopg 3 goes by the server's status already).
    """
    raw.rollback()
    if status() != 0:
        cursor = raw.cursor()
        try:
            cursor.execute("ROLLBACK")
        finally:
            cursor.close()


# -- texts --------------------------------------------------------------------


def timeout_message(alias, pool_size, max_overflow, checked_out, timeout):
    # type: (str, int, int, int, float) -> str
    """Return the text of ``PoolTimeout``: the alias, its sizes, the wait and the fix."""
    return (
        "Connection pool of database alias %s is exhausted: %d of %d connections "
        "(pool_size=%d + max_overflow=%d) are checked out and none was returned "
        "within timeout=%gs. Hint: look for requests or threads that hold a "
        "connection (long transactions, CONN_MAX_AGE > 0 with more threads than "
        "connections), or raise pool_size/max_overflow if the server's "
        "max_connections allows it. %s"
        % (_r(alias), checked_out, pool_size + max_overflow, pool_size, max_overflow, timeout,
           see("sizing"))
    )


def options_type_message(alias, options):
    # type: (str, object) -> str
    """Return the error for an alias whose OPTIONS is not a mapping (never quoting it)."""
    return "DATABASES[%s]['OPTIONS'] must be a dict of connection options, got %s." % (
        _r(alias), type(options).__name__)


def not_on_legacy_message(source, key):
    # type: (str, str) -> str
    """Return the error for an option the legacy backend (Python 2.7) does not implement."""
    return (
        "%s: pool option %s is not available on Python 2.7 with Django 1.4-1.6 (the legacy "
        "backend); remove it, or set it to %s. %s"
        % (source, _r(key), _r(DEFAULTS[key]), see("legacy"))
    )


def shown(value):
    # type: (object) -> str
    """A setting as a pool shows it (repr, stats, logs, metrics' labels).

    libpq takes a connection string or URI where a database name goes: with
    a password in it, perhaps. Such a value is shown as "(connection string)".
    """
    text = str(value)
    return "(connection string)" if "=" in text or "://" in text else text

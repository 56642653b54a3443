"""Configure the pooled PostgreSQL engine from one database URL.

    import django_postgrespool_dburl as dburl

    DATABASES = {"default": dburl.config(pool_size=5, max_overflow=10, recycle=300)}

A thin layer over dj-database-url: it parses the URL, this module picks the
engine (``django_postgrespool``, or ``django_postgrespool.postgis`` for a
PostGIS URL), reads a host list, keeps the query string's text for libpq
where dj-database-url's int/bool typing would change it, and moves the pool
options of the query string into ``POOL_OPTIONS``, where the backend reads
per-alias options. Values are checked by
:func:`django_postgrespool.options.normalize_pool_options`, the backend's own
validation. Importing this module also registers the
``postgrespool://`` and ``postgrespool+postgis://`` schemes with
dj-database-url, so a plain ``dj_database_url.config()`` works too.
"""

from __future__ import annotations

import difflib
import os
import re
import urllib.parse
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypedDict

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django_postgrespool.options import (
    POOL_OPTION_NAMES,
    normalize_pool_options,
    split_pool_options,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__version__ = "1.0.0"

__all__ = [
    "DEFAULT_ENV",
    "SCHEMES",
    "DatabaseURLError",
    "PoolArgs",
    "PooledDBConfig",
    "config",
    "mask_password",
    "parse",
]

DEFAULT_ENV = "DATABASE_URL"

#: The URL schemes this helper accepts, and the engine each one selects.
SCHEMES: Mapping[str, str] = MappingProxyType(
    {
        "postgres": "django_postgrespool",
        "postgresql": "django_postgrespool",
        "pgsql": "django_postgrespool",
        "postgis": "django_postgrespool.postgis",
        "postgrespool": "django_postgrespool",
        "postgrespool+postgis": "django_postgrespool.postgis",
    }
)
# The schemes this package adds to dj-database-url (the others it knows).
_OWN_SCHEMES = ("postgrespool", "postgrespool+postgis")

_EXAMPLE = "postgres://USER:PASSWORD@HOST:5432/NAME"
_MASK = "********"
_SHOWN = 256  # longest URL quoted in a message; the rest is elided


class PoolArgs(TypedDict, total=False):
    """The pool options, as keyword arguments (docs: reference/options)."""

    pool_size: int | str
    max_overflow: int | str
    recycle: float | str | None
    timeout: float | str
    pre_ping: bool | str
    use_lifo: bool | str
    reset: str
    max_idle: float | str | None
    leak_timeout: float | str | None
    lease: str
    fair_after: float | str


class _DjArgs(TypedDict):
    """dj-database-url's own keywords, as parse() and config() take them."""

    engine: str | None
    conn_max_age: int | None
    conn_health_checks: bool
    disable_server_side_cursors: bool
    ssl_require: bool
    test_options: dict[str, Any] | None


class PooledDBConfig(dj_database_url.DBConfig, total=False):
    """A ``DATABASES`` entry for the pooled engine."""

    POOL_OPTIONS: dict[str, Any]


class DatabaseURLError(ImproperlyConfigured, ValueError):  # type: ignore[misc]
    """The database URL cannot configure the pooled engine.

    A ``ValueError`` too, like dj-database-url's own errors, so code that
    catches those keeps working.
    """


# The description of the URL being parsed by parse(), for the scheme hook
# below, which dj-database-url calls with the parsed settings only.
_describing: ContextVar[str | None] = ContextVar("django_postgrespool_dburl_source", default=None)


# The query keys whose value libpq reads as a password.
_PASSWORD_KEYS = frozenset({"password", "sslpassword"})
# A query key: after "?" or "&", up to its "=". Its value ends at the next
# "&" or "#". A key after a "?" inside another's value ("?a=b?password=x")
# is found too (parse_qsl reads it as part of that value): masking more is safe.
_QUERY_KEY = re.compile(r"[?&]([^?&#=]*)=")
_VALUE_END = re.compile(r"[&#]")


def mask_password(url: str) -> str:
    """Return ``url`` with its password (in the authority or the query) masked.

    A query key is compared decoded, as dj-database-url reads it and libpq
    gets it: ``pass%77ord=`` and ``%70assword=`` are masked like ``password=``.
    """
    start = url.find("://")
    start = 0 if start < 0 else start + 3
    # The last "@" ends the user info even when a password holds an unquoted
    # "@" or "/"; masking too much (an "@" in the query) only hides more.
    at = url.rfind("@")
    if at > start:
        colon = url.find(":", start, at)
        if colon >= 0:
            url = f"{url[: colon + 1]}{_MASK}{url[at:]}"
    shown, done = [], 0
    for key in _QUERY_KEY.finditer(url):
        if key.start() < done or not _is_password_key(key.group(1)):
            continue  # not a password, or inside a value masked already
        end = _VALUE_END.search(url, key.end())
        shown.append(f"{url[done : key.end()]}{_MASK}")
        done = end.start() if end else len(url)
    return "".join(shown) + url[done:]


def _is_password_key(raw: str) -> bool:
    # Decoded as parse_qsl does ("+" is a space); libpq skips the blanks
    # around a keyword in a conninfo string. Its keywords are lower case;
    # any case is masked.
    return urllib.parse.unquote_plus(raw).strip().lower() in _PASSWORD_KEYS


def _describe(url: str, label: str) -> str:
    shown = mask_password(url)
    if len(shown) > _SHOWN:
        shown = f"{shown[:_SHOWN]}... ({len(url)} characters)"
    return f"{label} {shown!r}"


def _looks_like_pool_option(key: str) -> bool:
    # A misspelt pool option would go to the driver and fail at the first
    # connection with a libpq message; catch it at settings load instead.
    # No libpq or Django option starts with "pool_" or is this close to one.
    return key.startswith("pool_") or bool(
        difflib.get_close_matches(key, POOL_OPTION_NAMES, n=1, cutoff=0.8)
    )


def _move_pool_options(settings: PooledDBConfig, source: str) -> None:
    """Move the pool keys of ``OPTIONS`` into ``POOL_OPTIONS``, validated."""
    pool, rest = split_pool_options(settings.get("OPTIONS") or {})
    misspelt = {key: value for key, value in rest.items() if _looks_like_pool_option(key)}
    if misspelt:
        normalize_pool_options(misspelt, source=source)  # raises, naming the valid options
    if not pool:
        return
    settings["OPTIONS"] = rest
    settings["POOL_OPTIONS"] = {
        **settings.get("POOL_OPTIONS", {}),
        **normalize_pool_options(pool, source=source),
    }


# OPTIONS that Django or the driver reads itself, not libpq: they keep
# dj-database-url's int or bool (IsolationLevel(3), "server_side_binding is
# True", psycopg's prepare_threshold, a false "pool").
_TYPED_OPTIONS = frozenset({"isolation_level", "server_side_binding", "prepare_threshold", "pool"})


def _keep_as_written(settings: PooledDBConfig, query: str) -> None:
    """Give back the query string's text to the ``OPTIONS`` that libpq reads.

    dj-database-url turns an all-digit value into an int and "true"/"false"
    into a bool; libpq gets ``str()`` of it, so ``password=0123`` would log in
    with ``123`` and ``application_name=true`` show ``True``. A value keeps
    dj-database-url's type only where libpq gets the very same text
    (``keepalives_idle=5``); else the string as written. Pool options are
    left to their own validation, and the values dj-database-url did not
    take from the query as they are (``ssl_require``) are strings.
    """
    options: dict[str, Any] = settings.get("OPTIONS") or {}
    written: dict[str, list[str]] = {}
    for key, value in urllib.parse.parse_qsl(query):  # as dj-database-url's parse_qs
        written.setdefault(key, []).append(value)
    # dj-database-url makes currentSchema libpq's options from the converted
    # value: "0123" gave search_path=123, and "0" or "false" none at all.
    schemas = written.get("currentSchema", [])
    if len(schemas) == 1:
        options["options"] = f"-c search_path={schemas[0]}"
    for key, texts in written.items():
        if key not in options or key in _TYPED_OPTIONS or key in POOL_OPTION_NAMES:
            continue
        value = options[key]
        parsed = value if isinstance(value, list) else [value]
        if len(parsed) != len(texts):
            continue  # not the query's values
        kept = [
            item if isinstance(item, str) or str(item) == text else text
            for item, text in zip(parsed, texts, strict=True)
        ]
        options[key] = kept if isinstance(value, list) else kept[0]
    if options:
        settings["OPTIONS"] = options


def _scheme_hook(scheme: str) -> dj_database_url.PostprocessCallable:
    def postprocess(settings: dj_database_url.DBConfig) -> None:
        dj_database_url.apply_current_schema(settings)
        source = _describing.get()
        if source is None:  # called by dj_database_url.parse() directly
            user, port = settings.get("USER"), settings.get("PORT")
            source = _describe(
                f"{scheme}://{f'{user}:{_MASK}@' if user else ''}{settings.get('HOST', '')}"
                f"{f':{port}' if port else ''}/{settings.get('NAME', '')}",
                "database URL",
            )
        _move_pool_options(settings, source)  # type: ignore[arg-type]

    return postprocess


for _scheme in _OWN_SCHEMES:
    dj_database_url.register(_scheme, SCHEMES[_scheme])(_scheme_hook(_scheme))


def _hosts(netloc: str, where: str) -> tuple[str, str] | None:
    """Return libpq's (host list, port list) of a multi-host authority, else None."""
    hostlist = netloc.rpartition("@")[2]
    if "," not in hostlist:
        return None
    hosts, ports = [], []
    for item in hostlist.split(","):
        # [0-9], not \d: a port of other Unicode digits (fullwidth, Arabic-Indic)
        # is refused here as urllib refuses it on a single host; libpq would
        # refuse it only at the first connection.
        match = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]*)(?::([0-9]*))?", item)
        if match is None or not match.group(1):
            raise DatabaseURLError(
                f"{where}: host {mask_password(item)!r} of the host list is not HOST or HOST:PORT."
            )
        if match.group(2) and not 0 < int(match.group(2)) < 65536:
            # As urllib refuses it on a single host, not later in libpq's words.
            raise DatabaseURLError(
                f"{where}: host {item!r} of the host list has port {int(match.group(2))}; "
                f"a port is 1 to 65535."
            )
        hosts.append(urllib.parse.unquote(match.group(1).strip("[]")))
        ports.append(match.group(2) or "")
    return ",".join(hosts), ",".join(ports) if any(ports) else ""


def _userinfo_cut_short(split: urllib.parse.SplitResult) -> bool:
    """Tell whether an unencoded / ? or # in the password ended the authority early.

    Then the user info's "@" is left in the path, the fragment or the query,
    and pieces of the password would be read as hosts and ports: with
    ``app:2024?Summer=1@db/shop``, host ``app``, port 2024 and a libpq option
    ``Summer``. A "?" that ends the authority leaves the path empty, so an "@"
    anywhere in such a query is refused; after a path (``/shop?...``) only
    the first key is looked at, and a value such as ``application_name=me@corp``
    stays valid.
    """
    if "@" in split.netloc:
        return False
    if "@" in split.path or "@" in split.fragment:
        return True
    return "@" in (split.query if not split.path else split.query.partition("=")[0])


def _not_a_url(where: str) -> DatabaseURLError:
    return DatabaseURLError(
        f"{where} is not a valid URL: check that the port is a number, an IPv6 host "
        f"is in [brackets], and any of : / @ ? # % in the user name or password is "
        f"percent-encoded (urllib.parse.quote(password, safe=''))."
    )


def parse(
    url: str,
    engine: str | None = None,
    conn_max_age: int | None = 0,
    conn_health_checks: bool = False,
    disable_server_side_cursors: bool = False,
    ssl_require: bool = False,
    test_options: dict[str, Any] | None = None,
    **pool_options: Unpack[PoolArgs],
) -> PooledDBConfig:
    """Parse a PostgreSQL URL into a ``DATABASES`` entry for the pooled engine."""
    dj_args = _DjArgs(
        engine=engine,
        conn_max_age=conn_max_age,
        conn_health_checks=conn_health_checks,
        disable_server_side_cursors=disable_server_side_cursors,
        ssl_require=ssl_require,
        test_options=test_options,
    )
    return _parse(url, "database URL", dj_args, dict(pool_options))


def config(
    env: str = DEFAULT_ENV,
    default: str | None = None,
    engine: str | None = None,
    conn_max_age: int | None = 0,
    conn_health_checks: bool = False,
    disable_server_side_cursors: bool = False,
    ssl_require: bool = False,
    test_options: dict[str, Any] | None = None,
    **pool_options: Unpack[PoolArgs],
) -> PooledDBConfig:
    """Return a ``DATABASES`` entry for the pooled engine from the URL in ``env``.

    Unlike dj-database-url, which returns ``{}``, an unset or empty variable
    with no ``default`` is an error: a pooled app without a database is a
    deployment mistake worth stopping at settings load.
    """
    url, label = os.environ.get(env), env
    if not url:
        if not default:
            state = "is set but empty" if env in os.environ else "is not set"
            raise DatabaseURLError(
                f"{env} {state} and config() was given no default: set {env} to a URL "
                f"such as {_EXAMPLE}, or pass default=."
            )
        url, label = default, "config() default"
    dj_args = _DjArgs(
        engine=engine,
        conn_max_age=conn_max_age,
        conn_health_checks=conn_health_checks,
        disable_server_side_cursors=disable_server_side_cursors,
        ssl_require=ssl_require,
        test_options=test_options,
    )
    return _parse(url, label, dj_args, dict(pool_options))


def _parse(
    url: object, label: str, dj_args: _DjArgs, pool_kwargs: dict[str, Any]
) -> PooledDBConfig:
    if not isinstance(url, str):
        raise DatabaseURLError(f"The {label} must be a str, got {type(url).__name__}.")
    url = url.strip()
    if not url:
        raise DatabaseURLError(f"The {label} is empty: expected a URL such as {_EXAMPLE}.")
    where = _describe(url, label)
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        found = f"scheme '{scheme}://' is not PostgreSQL" if scheme else "has no scheme"
        raise DatabaseURLError(
            f"{where}: {found}; django-postgrespool pools PostgreSQL only. "
            f"Valid schemes: {', '.join(sorted(SCHEMES))}."
        )
    # dj-database-url reads one host; libpq takes a list (host=a,b port=1,2),
    # so a list is parsed here and one placeholder host goes through.
    try:
        split: urllib.parse.SplitResult | None = urllib.parse.urlsplit(url)
    except ValueError:
        split = None  # dj-database-url reports it below
    if split is not None:
        if _userinfo_cut_short(split):
            raise _not_a_url(where)
        # dj-database-url drops a query key without a value: a pool option
        # left blank would silently fall back to its default.
        blank = {
            key: value
            for key, value in urllib.parse.parse_qsl(split.query, keep_blank_values=True)
            if not value and (key in POOL_OPTION_NAMES or _looks_like_pool_option(key))
        }
        if blank:
            normalize_pool_options(blank, source=where)  # raises: '' is no valid value
    hosts = _hosts(split.netloc, where) if split is not None else None
    if hosts is not None and split is not None:
        userinfo = split.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@placeholder" if userinfo else "placeholder"
        url = urllib.parse.urlunsplit(split._replace(netloc=netloc))
    token = _describing.set(where)
    try:
        settings: PooledDBConfig = dj_database_url.parse(  # type: ignore[assignment]
            f"{scheme}{url[len(scheme) :]}",
            **{**dj_args, "engine": dj_args["engine"] or SCHEMES[scheme]},  # type: ignore[arg-type]
        )
    except ValueError:
        # The driver's reason may quote a piece of a badly quoted password.
        raise _not_a_url(where) from None
    finally:
        _describing.reset(token)
    if hosts is not None:
        settings["HOST"], settings["PORT"] = hosts
    if split is not None:
        _keep_as_written(settings, split.query)
    _move_pool_options(settings, where)
    if pool_kwargs:
        settings["POOL_OPTIONS"] = {
            **settings.get("POOL_OPTIONS", {}),
            **normalize_pool_options(pool_kwargs, source=f"{where} (keyword arguments)"),
        }
    return settings

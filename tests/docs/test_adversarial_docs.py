"""The docs against the code: each test reads a claim from README.rst or docs/ and checks it.

Most tests extract the claim from the .rst (a table, an example, a number) so that the page
and the code cannot drift apart silently.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, get_type_hints

import django_postgrespool
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.test import override_settings
from django_postgrespool import _rules, normalize_pool_options
from django_postgrespool import pool as pool_module

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SRC = ROOT / "packages" / "backend" / "src" / "django_postgrespool"
README = (ROOT / "README.rst").read_text()


def page(name: str) -> str:
    return (DOCS / f"{name}.rst").read_text()


def every_page() -> dict[str, str]:
    pages = {"README.rst": README}
    for path in sorted(DOCS.rglob("*.rst")):
        if "_build" not in path.parts:
            pages[str(path.relative_to(ROOT))] = path.read_text()
    return pages


def literal_block_after(text: str, marker: str) -> str:
    """Return the indented literal block that follows the line containing ``marker``."""
    after = text.split(marker, 1)[1].split("\n", 1)[1]
    lines = []
    for line in after.lstrip("\n").splitlines():
        if line and not line.startswith(" "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines)).strip()


def one_line(text: str) -> str:
    return " ".join(text.split())


def entries(text: str) -> dict[str, str]:
    """Return a definition list's ``term``: body (terms in double backquotes at column 0)."""
    found = re.findall(r"^``([^`]+)``\n((?:    .*\n|\n)+)", text, re.M)
    return {term: one_line(body) for term, body in found}


def table_rows(text: str, title: str) -> list[list[str]]:
    """Return the rows of the first simple table after ``title`` (first column is one word)."""
    body = text.split(f"\n{title}\n", 1)[1]
    rules = [m.start() for m in re.finditer(r"^=+(?:  +=+)+$", body, re.M)][:3]
    rows = []
    for line in body[rules[1] : rules[2]].splitlines()[1:]:
        if line and not line.startswith(" "):
            rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


# -- pool options ---------------------------------------------------------------


def test_options_reference_valid_values_are_what_the_rules_accept() -> None:
    """Each option's second sentence on reference/options says what it accepts: probe it."""
    text = page("reference/options")
    checked = set()
    for name, body in entries(text).items():
        if name not in django_postgrespool.POOL_OPTION_NAMES:
            continue
        valid = re.match(r"Default ``[^`]+``\. (.+?\.)(?: |$)", body).group(1)

        def accepts(value: object, expected: object, name: str = name) -> None:
            assert normalize_pool_options({name: value}, source="S") == {name: expected}, (
                name,
                value,
            )

        def refuses(value: object, name: str = name) -> None:
            with pytest.raises(ImproperlyConfigured, match=f"S: pool option '{name}' must be"):
                normalize_pool_options({name: value}, source="S")

        if m := re.match(r"Integer ≥ (\d)", valid):
            low = int(m.group(1))
            accepts(low, low)
            accepts(str(low + 4), low + 4)
            refuses(low - 1)
            refuses(2.5)
        elif valid.startswith("Seconds > 0"):
            accepts(0.5, 0.5)
            accepts("2.5", 2.5)
            refuses(0)
        elif valid.startswith("Seconds ≥ 0"):
            accepts(0, 0.0)
            refuses(-0.01)
        elif valid.startswith("Boolean"):
            accepts(True, True)
            accepts(False, False)
            refuses("maybe")
        literals = [ast.literal_eval(v) for v in re.findall(r"``([^`]+)``", valid)]
        off = re.search(r"``None``(?: / ``[^`]+``)*(?: for (never|off))?", valid)
        for value in literals:
            if off and (value is None or value in ("none", "never", -1)):
                accepts(value, None)
            else:
                accepts(value, value)
        if literals and not valid.startswith("Seconds"):  # an enumeration: nothing else
            refuses("bogus")
        checked.add(name)
    assert checked == set(django_postgrespool.POOL_OPTION_NAMES)


def test_options_reference_spellings_are_normalised_as_written() -> None:
    """The first paragraph of reference/options lists the accepted spellings."""
    intro = one_line(page("reference/options").split("\n``pool_size``\n", 1)[0])
    booleans = re.search(r"booleans as (.+?); numbers", intro).group(1)
    pairs = re.findall(r"``([^`]+)``/``([^`]+)``", booleans)
    assert len(pairs) == 5
    for yes, no in pairs:
        for written, meant in ((yes, True), (no, False)):
            value = ast.literal_eval(written)
            assert normalize_pool_options({"use_lifo": value}, source="S") == {"use_lifo": meant}
    numbers = re.search(r"numbers as numbers or strings \((.+?)\)", intro).group(1)
    for written in re.findall(r"``([^`]+)``", numbers):
        value = ast.literal_eval(written)
        assert normalize_pool_options({"timeout": value}, source="S") == {"timeout": float(value)}
    off = re.search(r'"off" as (.+?)\.', intro).group(1)
    for written in re.findall(r"``([^`]+)``", off):
        value = ast.literal_eval(written)
        for name in ("max_idle", "leak_timeout", "recycle"):
            assert normalize_pool_options({name: value}, source="S") == {name: None}


@pytest.mark.parametrize("name", ["max_idle", "leak_timeout"])
def test_a_number_and_its_string_are_read_alike(name: str) -> None:
    def read(value: object) -> object:
        try:
            return normalize_pool_options({name: value}, source="S")
        except ImproperlyConfigured:
            return "refused"

    assert read(-1) == read("-1")


def test_configuration_error_example_is_the_message() -> None:
    text = page("guide/configuration")
    shown = one_line(literal_block_after(text, "what is valid, for example::"))
    with pytest.raises(ImproperlyConfigured) as raised:
        normalize_pool_options({"poolsize": 5}, source="DATABASES['default']['POOL_OPTIONS']")
    assert shown == str(raised.value)


def test_legacy_refusals_are_the_same_everywhere_in_the_docs() -> None:
    """README, reference/options and guide/south name the options the legacy backend refuses."""
    tree = ast.parse((SRC / "_legacy.py").read_text())
    [unavailable] = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "_UNAVAILABLE" for t in node.targets)
    ]
    clauses = {
        "README.rst": re.search(r"\(([^()]*are refused[^()]*)\)", one_line(README)),
        "options": re.search(
            r"\* (``max_idle``.*?refused.*?) \(that backend", one_line(page("reference/options"))
        ),
        "south": re.search(
            r"; (``max_idle``[^;]*? are refused [^:]*):", one_line(page("guide/south"))
        ),
    }
    for where, clause in clauses.items():
        assert clause is not None, where
        named = set(re.findall(r"``(\w+)``", clause.group(1))) & set(_rules.NAMES)
        assert named == set(unavailable), where
        for name in unavailable:  # "unless <its default>", where the default is spelt out
            default = _rules.DEFAULTS[name]
            spelt = {f"``{default!r}``", f"``{default}``", "their defaults"}
            assert any(s in clause.group(1) for s in spelt), (where, name)


def test_override_settings_of_database_pool_args_reaches_the_pool(pooled_alias) -> None:
    alias, _ = pooled_alias("docs_override")
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
    connections[alias].close()
    with override_settings(DATABASE_POOL_ARGS={"pool_size": 2}):
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
        connections[alias].close()
        current = [s for s in django_postgrespool.pool_stats(alias) if not s["retired"]]
        assert [s["pool_size"] for s in current] == [2]


# -- errors ---------------------------------------------------------------------


def test_sizing_timeout_example_is_the_traceback_line() -> None:
    from django_postgrespool import PoolTimeout

    shown = one_line(literal_block_after(page("guide/sizing"), "longer than ``timeout``::"))
    error = PoolTimeout(alias="default", pool_size=5, max_overflow=10, checked_out=15, timeout=30)
    # What a traceback prints: the class's module path, then the message.
    assert shown == f"{type(error).__module__}.{type(error).__qualname__}: {error}"


# -- statistics -----------------------------------------------------------------


def stats_tables() -> dict[str, dict[str, bool]]:
    """Return, per section of reference/stats, {key: marked legacy}."""
    text = page("reference/stats")
    out: dict[str, dict[str, bool]] = {}
    for title in (
        "Where the pool connects, and its options",
        "Now",
        "Counted over the pool's life",
    ):
        keys: dict[str, bool] = {}
        for row in table_rows(text, title):
            legacy = len(row) > 2 and row[1] == "yes"
            for key in re.findall(r"``([\w*]+)``", row[0]):
                if key == "*_histogram":
                    for kind in ("wait_time", "use_time", "create_time"):
                        keys[f"{kind}_histogram"] = legacy
                else:
                    keys[key] = legacy
        out[title] = keys
    return out


def test_stats_reference_lists_every_pool_stats_key() -> None:
    from django_postgrespool.pool import CountedStats, PoolStats

    tables = stats_tables()
    documented = {k for keys in tables.values() for k in keys}
    assert documented == set(get_type_hints(PoolStats))
    counted = set(tables["Counted over the pool's life"]) - {"peak_checked_out"}
    assert counted == set(get_type_hints(CountedStats))


def test_stats_reference_departed_keys_are_departed_stats() -> None:
    from django_postgrespool.pool import CountedStats
    from django_postgrespool.registry import DepartedStats

    text = one_line(page("reference/stats").split("Departed pools", 1)[1])
    named = re.search(r"returns one dict per alias with departed pools: (.+?), and the keys", text)
    own = set(re.findall(r"``([a-z_]+)``", named.group(1)))
    assert own | set(get_type_hints(CountedStats)) == set(get_type_hints(DepartedStats))


def test_stats_reference_legacy_column_is_the_legacy_backends_keys() -> None:
    """The keys marked *legacy* are those of _legacy._Pool.stats() (parsed: it runs on 2.7)."""
    source = (SRC / "_legacy.py").read_text()
    tree = ast.parse(source)
    keys: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Attribute) and t.attr in ("target", "_counts") for t in node.targets
        ):
            if isinstance(node.value, ast.Dict):
                keys |= {ast.literal_eval(k) for k in node.value.keys}
        if isinstance(node, ast.FunctionDef) and node.name == "stats":
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "dict":
                    keys |= {kw.arg for kw in call.keywords if kw.arg}
    legacy = {k for keys_ in stats_tables().values() for k, marked in keys_.items() if marked}
    assert legacy == keys


def test_pool_stats_port_is_default_when_libpq_chooses(pooled_alias) -> None:
    alias, _ = pooled_alias("docs_port", PORT="", options={"connect_timeout": 2})
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        pass  # 5432 may have no server: the pool is built all the same
    [stats] = [s for s in django_postgrespool.pool_stats(alias) if not s["retired"]]
    assert stats["port"] == "(default)"


def test_statistics_example_shows_real_keys_and_types() -> None:
    from django_postgrespool.pool import PoolStats

    block = literal_block_after(page("guide/statistics"), "(abridged here)::")
    shown = ast.literal_eval(block.split("\n", 2)[2].strip())
    [example] = shown
    hints = get_type_hints(PoolStats)
    assert set(example) <= set(hints)
    for key, value in example.items():
        expected = hints[key]
        allowed = getattr(expected, "__args__", None) or (expected,)
        assert isinstance(value, tuple(t for t in allowed if isinstance(t, type))), key


def test_stats_reference_histogram_buckets_are_the_pools() -> None:
    text = one_line(page("reference/stats"))
    assert "(1 ms to 10 s, the buckets OpenTelemetry advises)" in text
    assert pool_module.TIME_BUCKETS[0] == 0.001 and pool_module.TIME_BUCKETS[-1] == 10
    observability = one_line(page("observability"))
    bounds = re.search(r"database durations: ([\d, ]+) ms, ([\d, ]+) s\.", observability)
    ms = [float(b) / 1000 for b in bounds.group(1).split(", ")]
    s = [float(b) for b in bounds.group(2).split(", ")]
    assert tuple(ms + s) == pool_module.TIME_BUCKETS


# -- operations and logging ----------------------------------------------------


def test_operations_numbers_are_the_pools_constants() -> None:
    text = one_line(page("guide/operations"))
    spread = re.search(r"shortened by a random amount up to (\d+) %", text)
    assert float(spread.group(1)) / 100 == pool_module._RECYCLE_SPREAD
    backoff = re.search(r"\(([\d.]+) s, doubling up to ([\d.]+) s\)", text)
    assert float(backoff.group(1)) == pool_module._BACKOFF_FIRST
    assert float(backoff.group(2)) == pool_module._BACKOFF_MAX


def test_statistics_says_how_often_a_wait_is_logged() -> None:
    text = one_line(page("guide/statistics"))
    every = re.search(r"at most every (\d+) s", text)
    assert every is not None
    assert float(every.group(1)) == pool_module.WAIT_WARNING_INTERVAL


def test_prewarm_returns_the_open_connections_per_alias(pooled_alias) -> None:
    alias, _ = pooled_alias("docs_prewarm", pool_options={"pool_size": 2, "max_overflow": 0})
    assert django_postgrespool.prewarm(alias) == {alias: 2}
    [stats] = django_postgrespool.pool_stats(alias)
    assert (stats["size"], stats["idle"]) == (2, 2)


# -- system checks ----------------------------------------------------------------


def _check_ids_by_tag() -> dict[str, set[bool]]:
    """Return, per check id, whether each check that can emit it is tagged database."""
    tree = ast.parse((SRC / "checks.py").read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def is_database(fn: ast.FunctionDef) -> bool | None:
        for deco in fn.decorator_list:
            if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "_check":
                return any(ast.unparse(a) == "checks.Tags.database" for a in deco.args)
        return None  # not a check: a helper

    def calls(fn: ast.FunctionDef) -> set[str]:
        return {
            c.func.id
            for c in ast.walk(fn)
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in functions
        }

    def checks_reaching(name: str, seen: frozenset[str] = frozenset()) -> set[bool]:
        tag = is_database(functions[name])
        if tag is not None:
            return {tag}
        out: set[bool] = set()
        for caller, fn in functions.items():
            if name in calls(fn) and caller not in seen:
                out |= checks_reaching(caller, seen | {name})
        return out

    ids: dict[str, set[bool]] = {}
    for name, fn in functions.items():
        for node in ast.walk(fn):
            if isinstance(node, ast.keyword) and node.arg == "id":
                ids.setdefault(ast.literal_eval(node.value), set()).update(checks_reaching(name))
    return ids


def test_checks_reference_marks_database_checks() -> None:
    """An entry starts with (*database*) exactly when only a database-tagged check emits it."""
    reference = entries(page("reference/checks"))
    ids = _check_ids_by_tag()
    assert set(ids) == {k for k in reference if k.startswith("postgrespool.")}
    marked = {k for k, body in reference.items() if body.startswith("(*database*)")}
    assert marked == {k for k, tags in ids.items() if tags == {True}}
    # E001: without a query (POSTGRESPOOL_MAX_CONNECTIONS), and (*database*) against the server.
    assert ids["postgrespool.E001"] == {True, False}
    assert "(*database*)" in reference["postgrespool.E001"]


def test_checks_reference_lists_the_settings_the_checks_read() -> None:
    source = (SRC / "checks.py").read_text()
    read = set(re.findall(r'getattr\(settings, "(POSTGRESPOOL_\w+)"', source))
    text = page("reference/checks").split("Settings the checks read", 1)[1].split("The checks")[0]
    assert set(entries(text)) == read


def test_every_setting_the_code_reads_is_documented_and_back() -> None:
    code = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    read = set(re.findall(r'getattr\(\s*settings,\s*"([A-Z_]+)"', code))
    assert {"DATABASE_POOL_ARGS", "POSTGRESPOOL_METRICS"} <= read
    docs = "\n".join(every_page().values())
    for name in read:
        assert f"``{name}" in docs, name
    documented = set(re.findall(r"``(POSTGRESPOOL_\w+)", docs))
    assert documented <= read


def test_e001_against_the_server_uses_the_limit_the_reference_describes(pooled_alias) -> None:
    """reference/checks: the server's max_connections minus the reserved slots, unless the
    role is a superuser."""
    from django.core import checks

    alias, _ = pooled_alias("docs_budget")
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('max_connections')::int,"
            " current_setting('superuser_reserved_connections')::int,"
            " coalesce(current_setting('reserved_connections', true)::int, 0),"
            " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
        )
        max_connections, superuser_reserved, reserved, superuser = cursor.fetchone()
    connections[alias].close()
    expected = max_connections if superuser else max_connections - superuser_reserved - reserved
    with override_settings(POSTGRESPOOL_WORKERS=max_connections):
        messages = checks.run_checks(databases=[alias], tags=["postgrespool"])
    [e001] = [m for m in messages if m.id == "postgrespool.E001" and repr(alias) in m.msg]
    assert f"more than the {expected} it accepts (max_connections={max_connections}" in e001.msg
    text = one_line(page("reference/checks"))
    assert "unless the role is a superuser" in text


@pytest.mark.parametrize("app", [True, False])
def test_checks_of_a_pooled_alias_that_is_not_default(tmp_path, app: bool) -> None:
    # README and install: with the app, manage.py check checks every pooled
    # alias; without it, only once the backend is loaded (here: never, as the
    # default alias is not pooled and nothing queries the other).
    (tmp_path / "docs_noapp_settings.py").write_text(
        textwrap.dedent(
            """
            import os
            APP = ["django_postgrespool"] if os.environ["DOCS_APP"] else []
            SECRET_KEY = "docs"
            INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth"] + APP
            DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
            DATABASES = {
                "default": {"ENGINE": "django.db.backends.postgresql", "NAME": "x",
                            "HOST": "127.0.0.1", "PORT": "1"},
                "reports": {"ENGINE": "django_postgrespool", "NAME": "x",
                            "HOST": "127.0.0.1", "PORT": "1", "CONN_MAX_AGE": None},
            }
            """
        )
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "docs_noapp_settings",
        "PYTHONPATH": str(tmp_path),
        "DOCS_APP": "1" if app else "",
    }
    done = subprocess.run(
        [sys.executable, "-m", "django", "check"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ("postgrespool.W002" in done.stdout + done.stderr) is app


# -- metrics -----------------------------------------------------------------------


def test_observability_table_is_the_instruments() -> None:
    from django_postgrespool import metrics
    from django_postgrespool.metrics import otel

    text = page("observability")
    rows = re.findall(r"\* - ``(db\.[\w.]+)``\n\s+- ([\w -]+)\n\s+- (\S+)\n", text)
    kinds = {name: ("up-down counter", unit) for name, unit, _ in metrics.GAUGES}
    kinds |= {name: ("counter", unit) for name, unit, _ in metrics.COUNTERS}
    kinds |= {name: ("histogram", "s") for name, _, _ in metrics.HISTOGRAMS}
    assert {name: (kind, unit) for name, kind, unit in rows} == kinds
    assert f"``{otel.POOL_NAME}``" in text
    assert f"``{otel.STATE}``" in text
    assert f"``{otel.POOL_NAME}``" in README


def test_prometheus_sample_is_what_a_scrape_shows(pooled_alias) -> None:
    pytest.importorskip("prometheus_client")
    from django_postgrespool.metrics.prometheus import PoolCollector
    from prometheus_client import CollectorRegistry, generate_latest

    alias, _ = pooled_alias("docs_prom")
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
    connections[alias].close()
    registry = CollectorRegistry()
    registry.register(PoolCollector())
    scraped = generate_latest(registry).decode()

    def shape(line: str) -> tuple[str, str]:
        name, labels = re.match(r"(\w+)\{([^}]*)\}", line).groups()
        return name, labels

    got = {shape(line) for line in scraped.splitlines() if line and not line.startswith("#")}
    sample = literal_block_after(page("observability"), "in Prometheus' spelling::")
    lines = [line for line in sample.splitlines() if line != "..."]
    assert len(lines) >= 10
    for line in lines:
        name, labels = shape(line.replace('pool_name="default"', f'pool_name="{alias}"'))
        assert (name, labels) in got, line


def test_idle_connections_never_exceed_the_exported_idle_max(pooled_alias) -> None:
    from django_postgrespool import metrics

    alias, _ = pooled_alias(
        "docs_idle_max", pool_options={"pool_size": 1, "max_overflow": 2, "max_idle": 60}
    )
    wrappers = [connections.create_connection(alias) for _ in range(3)]
    try:
        for wrapper in wrappers:
            wrapper.ensure_connection()
    finally:
        for wrapper in wrappers:
            wrapper.close()
    values = {
        (p.name, p.state): p.value for p in metrics.points(django_postgrespool.pool_stats(alias))
    }
    assert values[("db.client.connection.count", "idle")] == 3  # max_idle keeps them open
    assert (
        values[("db.client.connection.count", "idle")]
        <= values[("db.client.connection.idle.max", None)]
    )


def test_metrics_interval_default_is_documented() -> None:
    from django_postgrespool.metrics import sampler

    text = one_line(page("observability"))
    every = re.search(r"``POSTGRESPOOL_METRICS_INTERVAL`` seconds \(default (\d+)\)", text)
    assert float(every.group(1)) == sampler.DEFAULT_INTERVAL


def test_extras_in_the_docs_are_the_packages_extras() -> None:
    """pip install commands name extras the backend declares, from a checkout until published."""
    pyproject = (ROOT / "packages" / "backend" / "pyproject.toml").read_text()
    declared = set(
        re.findall(r"^([\w-]+) = \[", pyproject.split("optional-dependencies]", 1)[1], re.M)
    )
    for where, text in every_page().items():
        for extra in re.findall(r"pip install \"[^\"\[]+\[([\w-]+)\]\"", text):
            assert extra in declared, (where, extra)
        # The name on the index is an unrelated old release until this one is published.
        assert 'pip install "django-postgrespool[' not in text, where


# -- database URLs -------------------------------------------------------------------


def test_dburl_signatures_are_the_functions() -> None:
    import dj_database_url
    import django_postgrespool_dburl as dburl

    text = page("guide/dburl")
    for name in ("config", "parse"):
        documented = re.search(rf"^``{name}\((.*)\)``$", text, re.M).group(1)
        shown = []
        for parameter in inspect.signature(getattr(dburl, name)).parameters.values():
            if parameter.kind is parameter.VAR_KEYWORD:
                shown.append(f"**{parameter.name}")
            elif parameter.default is parameter.empty:
                shown.append(parameter.name)
            else:
                shown.append(f"{parameter.name}={parameter.default!r}")
        assert documented == ", ".join(shown), name
    # "The keywords before **pool_options are dj-database-url's own, in the same order."
    ours = list(inspect.signature(dburl.config).parameters)[:-1]
    assert ours == list(inspect.signature(dj_database_url.config).parameters)


def test_dburl_example_gives_what_the_guide_says(monkeypatch) -> None:
    import django_postgrespool_dburl as dburl

    text = page("guide/dburl")
    url = re.search(r"DATABASE_URL='([^']+)'", text).group(1)
    call = re.search(r"dburl\.config\(([^)]*)\)", text).group(1)
    kwargs = {k: ast.literal_eval(v) for k, v in re.findall(r"(\w+)=([^,]+)", call)}
    gives = one_line(text.split("gives ", 1)[1].split("\n\n", 1)[0])
    monkeypatch.setenv("DATABASE_URL", url)
    entry = dburl.config(**kwargs)
    assert f"``ENGINE = {entry['ENGINE']!r}``" in gives
    pool = ast.literal_eval(re.search(r"``POOL_OPTIONS = (\{.*?\})``", gives).group(1))
    options = ast.literal_eval(re.search(r"``OPTIONS = (\{.*?\})``", gives).group(1))
    assert entry["POOL_OPTIONS"] == pool and entry["OPTIONS"] == options
    # README's example too: the same helper, the URL in a comment.
    readme_url = re.search(r"# DATABASE_URL=(\S+)", README).group(1)
    monkeypatch.setenv("DATABASE_URL", readme_url)
    entry = dburl.config(recycle=300)
    assert entry["POOL_OPTIONS"] == {"pool_size": 5, "max_overflow": 10, "recycle": 300.0}
    assert entry["OPTIONS"] == {"sslmode": "require"}


def test_dburl_error_example_is_the_message(monkeypatch) -> None:
    import django_postgrespool_dburl as dburl

    block = literal_block_after(page("guide/dburl"), "password masked::")
    name, shown = one_line(block).split(": ", 1)
    assert name == "django.core.exceptions.ImproperlyConfigured"
    url = re.search(r"'(postgres://[^']+)'", shown).group(1).replace("********", "secret")
    monkeypatch.setenv("DATABASE_URL", url)
    with pytest.raises(ImproperlyConfigured) as raised:
        dburl.config()
    assert type(raised.value) is ImproperlyConfigured
    assert str(raised.value) == shown


def test_dburl_schemes_table_is_schemes() -> None:
    import django_postgrespool_dburl as dburl

    documented = {}
    for row in table_rows(page("guide/dburl"), "Schemes"):
        (engine,) = re.findall(r"``([\w.]+)``", row[-1])
        for scheme in re.findall(r"``([\w+]+)``", row[0]):
            documented[scheme] = engine
    assert documented == dict(dburl.SCHEMES)


def test_dburl_url_forms_parse_as_documented() -> None:
    import django_postgrespool_dburl as dburl

    text = one_line(page("guide/dburl").split("URL forms", 1)[1])
    several = re.search(
        r"``(postgres://[^`]+)`` gives ``HOST='([^']+)'``, ``PORT='([^']+)'``", text
    )
    entry = dburl.parse(several.group(1))
    assert (entry["HOST"], entry["PORT"]) == (several.group(2), several.group(3))
    socket = re.search(r"the host, ``(postgres://[^`]+)``", text).group(1)
    assert dburl.parse(socket)["HOST"] == "/var/run/postgresql"
    ipv6 = re.search(r"IPv6: ``(postgres://[^`]+)``", text).group(1)
    assert dburl.parse(ipv6)["HOST"] == "2001:db8::7"
    cut = re.search(r"\(``(postgres://app:2024\?Summer=1@db/shop)``", text).group(1)
    with pytest.raises(dburl.DatabaseURLError) as raised:
        dburl.parse(cut)
    assert "2024" not in str(raised.value) and "********" in str(raised.value)


def test_dburl_keeps_the_query_text_as_the_guide_says() -> None:
    import django_postgrespool_dburl as dburl

    text = one_line(page("guide/dburl"))
    examples = re.findall(r"``(\w+)=(\w+)`` → ``([^`]+)``", text)
    assert len(examples) >= 4
    query = "&".join(f"{k}={v}" for k, v, _ in examples)
    options = dburl.parse(f"postgres://app:pw@db/shop?{query}")["OPTIONS"]
    for key, _, shown in examples:
        if key == "currentSchema":
            assert options["options"] == ast.literal_eval(shown)
        else:
            assert options[key] == ast.literal_eval(shown), key


# -- paths, names and counts the pages cite --------------------------------------------


def test_every_dotted_name_in_the_docs_resolves() -> None:
    import importlib

    found: dict[str, str] = {}
    for where, text in every_page().items():
        for name in re.findall(
            r"(?<![/\w-])(django_postgrespool(?:_dburl|_south)?(?:\.[A-Za-z_]\w*)+)", text
        ):
            found.setdefault(name, where)
    assert len(found) > 15
    for name, where in found.items():
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj: Any = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), (where, name)
                obj = getattr(obj, attr)
            break
        else:
            pytest.fail(f"{where}: {name} does not import")


def test_every_repository_path_in_the_docs_exists() -> None:
    pattern = r"``((?:bench|tests|examples|packages|docs|\.ci|django_postgrespool)/[\w./-]*)``"
    seen = 0
    for where, text in every_page().items():
        for path in re.findall(pattern, text):
            if path.startswith("django_postgrespool/"):
                path = f"packages/backend/src/{path}"
            if path.startswith("docs/_build"):  # what make docs makes: not in a clone
                continue
            assert (ROOT / path).exists(), (where, path)
            seen += 1
    assert seen > 40


def test_conformance_table_counts_the_known_differences() -> None:
    toml = (ROOT / "tests" / "conformance" / "differences.toml").read_text()
    per_lane: dict[str, int] = {}
    tests = set()
    for block in toml.split("[[difference]]")[1:]:
        tests.add(re.search(r'^test = "([^"]+)"', block, re.M).group(1))
        for lane in re.findall(
            r'"(dj\d+-\w+)"', re.search(r"^lanes = \[(.*)\]", block, re.M).group(1)
        ):
            per_lane[lane] = per_lane.get(lane, 0) + 1
    text = page("evidence/conformance")
    rows = re.findall(r"^(dj\d+-\w+)\s+\d+ / \d+ / \d+\s+(\d+)", text, re.M)
    assert len(rows) == 6
    for lane, count in rows:
        assert per_lane.get(lane, 0) == int(count), lane
    summary = re.search(r"All (\d+) remaining differences \((\d+) distinct tests\)", text)
    assert int(summary.group(1)) == sum(per_lane.values())
    assert int(summary.group(2)) == len(tests)


def test_contributing_names_the_system_packages_the_script_installs() -> None:
    script = (ROOT / "tests" / "support" / "system-deps.sh").read_text()
    text = one_line(page("contributing"))
    for tool, name in (
        ("pgbouncer", "PgBouncer"),
        ("wrk", "wrk"),
        ("chromium", "Chromium"),
        ("postgis", "PostGIS"),
    ):
        assert tool in script
        assert name in text.split("make system-deps", 1)[1][:400], name


def test_contributing_names_every_folder_make_test_runs() -> None:
    """The test folders `make test` collects (not only reliability or dist) are listed."""
    text = one_line(page("contributing").split("What ``make test`` runs", 1)[1])
    listed = set(re.findall(r"``tests/(\w+)``", text.split("It does **not**", 1)[0]))
    folders = {p.name for p in (ROOT / "tests").iterdir() if (p / "__init__.py").exists()}
    only_marked = set()
    for folder in folders:
        modules = list((ROOT / "tests" / folder).glob("test_*.py"))
        if modules and all(
            re.search(r"pytestmark = pytest\.mark\.(reliability|dist)", m.read_text())
            or "@pytest.mark.dist" in m.read_text()
            for m in modules
        ):
            only_marked.add(folder)
    expected = {f for f in folders if list((ROOT / "tests" / f).glob("test_*.py"))} - only_marked
    assert expected <= listed, expected - listed


def test_pgpool_json_shape_is_what_operations_says(pooled_alias) -> None:
    from django.core.management import call_command

    alias, _ = pooled_alias("docs_pgpool")
    out = io.StringIO()
    call_command("pgpool", "--database", alias, "--json", stdout=out)
    text = one_line(page("guide/operations"))
    keys = re.search(r"a JSON list of ``\{([^}]+)\}``", text).group(1)
    [entry] = json.loads(out.getvalue())
    assert set(entry) == set(re.findall(r'"(\w+)"', keys))
    assert "max_connections" in entry["server"] and "sessions_on_database" in entry["server"]


def test_every_pool_option_value_written_in_the_docs_is_valid() -> None:
    """``name=value`` of a pool option anywhere in the pages is a value the rules accept."""
    seen = 0
    for where, text in every_page().items():
        for literal in re.findall(r"``([^`\n]*=[^`\n]*)``", text):
            for name, raw in re.findall(r"(?:^|, )(\w+)=([^,\s]+)", literal):
                if name not in django_postgrespool.POOL_OPTION_NAMES:
                    continue
                try:
                    value = ast.literal_eval(raw.strip())
                except (ValueError, SyntaxError):
                    value = raw.strip()
                normalize_pool_options({name: value}, source=where)
                seen += 1
    assert seen > 20


def test_every_check_id_the_pages_mention_exists() -> None:
    ids = set(_check_ids_by_tag())
    for where, text in every_page().items():
        for short in re.findall(r"postgrespool\.([EW]\d{3})", text):
            assert f"postgrespool.{short}" in ids, (where, short)
        for short in re.findall(r"(?<![.\w])``([EW]\d{3})``", text):  # "checks W002, W003"
            assert f"postgrespool.{short}" in ids, (where, short)


def test_conformance_page_names_the_apps_the_runner_runs() -> None:
    tree = ast.parse((ROOT / "tests" / "conformance" / "run.py").read_text())
    [apps] = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "APPS" for t in node.targets)
    ]
    text = one_line(page("evidence/conformance"))
    labels = re.search(r"--parallel=2`` on ``([\w ]+)``", text).group(1).split()
    assert labels == apps


def test_south_install_command_is_what_the_legacy_lane_installs() -> None:
    tree = ast.parse((ROOT / "tests" / "legacy" / "run.py").read_text())
    [requirements] = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "REQUIREMENTS" for t in node.targets)
    ]
    command = literal_block_after(page("guide/south"), "legacy module needs")
    for requirement in re.findall(r'"([^"]+)"', command):
        assert requirement in requirements, requirement


def test_toolbar_sources_are_the_checkout_sources() -> None:
    """observability names every source the panel shows (checkout_info()'s sources)."""
    pytest.importorskip("debug_toolbar")
    from django_postgrespool.toolbar import SOURCES

    text = one_line(page("observability").split("The debug toolbar panel", 1)[1])
    described = re.search(r"where the connection came from \((.+?)\); then", text).group(1)
    assert described.count(",") + 1 == len(SOURCES)
    lending = one_line(page("guide/lending"))
    listed = re.search(r"``source`` \((.+?)\)", lending).group(1)
    assert set(re.findall(r"``'(\w+)'``", listed)) == set(SOURCES)

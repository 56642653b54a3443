"""``manage.py pgpool``: a table per pooled alias, or JSON; never the password."""

from __future__ import annotations

import json
import re

from django_postgrespool._rules import DOCS_URL

from tests.example.helpers import ExampleDatabase, manage
from tests.support.pgcluster import PASSWORD


def test_pgpool_prints_a_table_per_alias(example_db: ExampleDatabase) -> None:
    result = manage(example_db.url, "pgpool")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    headings = re.findall(r"^Pool of alias '(\w+)': postgres@127\.0\.0\.1:\d+/(\w+) \(process \d+\)$", out, re.MULTILINE)
    assert headings == [("default", example_db.name), ("reports", example_db.name)]
    tables = out.split("\n\n")
    assert len(tables) == 2
    default = dict(re.findall(r"^  (\w[\w ]*?)\s{2,}(\S+)$", tables[0], re.MULTILINE))
    assert default["pool_size"] == "5" and default["max_overflow"] == "10"
    assert default["recycle"] == "300" and default["timeout"] == "30"
    assert (default["size"], default["idle"], default["checked_out"]) == ("1", "1", "0")
    assert (default["checkouts"], default["opened"], default["waits"]) == ("1", "1", "0")
    assert default["server max_connections"] == "300"
    assert int(default["server sessions on database"]) >= 1
    reports = dict(re.findall(r"^  (\w[\w ]*?)\s{2,}(\S+)$", tables[1], re.MULTILINE))
    assert (reports["pool_size"], reports["max_overflow"]) == ("2", "1")
    assert PASSWORD not in result.stdout + result.stderr


def test_pgpool_json_lists_pool_and_server_figures(example_db: ExampleDatabase) -> None:
    result = manage(example_db.url, "pgpool", "--json", "--database", "reports")
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)
    assert entry["alias"] == "reports"
    [pool] = entry["pools"]
    assert pool["database"] == example_db.name
    assert {k: pool[k] for k in ("pool_size", "max_overflow", "size", "idle", "checked_out", "checkouts")} == {
        "pool_size": 2, "max_overflow": 1, "size": 1, "idle": 1, "checked_out": 0, "checkouts": 1,
    }
    assert entry["server"]["max_connections"] == 300
    assert PASSWORD not in result.stdout


def test_pgpool_refuses_an_alias_that_is_not_pooled(example_db: ExampleDatabase) -> None:
    result = manage(example_db.url, "pgpool", "--database", "nope")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "CommandError: 'nope' is not a pooled alias; pooled aliases: 'default', 'reports' "
        "(ENGINE 'django_postgrespool')."
    )


def test_pgpool_reports_an_unreachable_server_without_the_password(example_db: ExampleDatabase) -> None:
    url = re.sub(r":\d+/", ":1/", example_db.url)
    result = manage(url, "pgpool", "--database", "default")
    assert result.returncode == 1
    # the pool's warning (logged), then the command's error
    assert "Cannot connect to database alias 'default' at 127.0.0.1:1 (OperationalError: " in (
        result.stderr
    )
    assert (
        "\nCommandError: Could not check out a connection of alias 'default': OperationalError: "
        in result.stderr
    )
    assert PASSWORD not in result.stderr + result.stdout


def test_check_database_passes_on_the_example(example_db: ExampleDatabase) -> None:
    result = manage(example_db.url, "check", "--database", "default", WEB_CONCURRENCY="2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "System check identified no issues (0 silenced)."


def test_check_fails_when_two_workers_exceed_a_limit_of_twenty(example_db: ExampleDatabase) -> None:
    result = manage(example_db.url, "check", WEB_CONCURRENCY="2", POSTGRESPOOL_MAX_CONNECTIONS="20")
    assert result.returncode == 1
    server = re.search(r"@(127\.0\.0\.1:\d+)/", example_db.url).group(1)  # type: ignore[union-attr]
    assert (
        f"?: (postgrespool.E001) The pools of aliases 'default', 'reports' may open "
        f"2 × (15 + 3) = 36 connections to {server} (workers: WEB_CONCURRENCY), more than the "
        f"20 it accepts (POSTGRESPOOL_MAX_CONNECTIONS).\n"
        f"\tHINT: Lower pool_size + max_overflow so that workers × (pool_size + max_overflow) "
        f"stays within 20, run fewer workers, or raise the server's limit. "
        f"See {DOCS_URL}guide/sizing.html"
    ) in result.stderr
    assert PASSWORD not in result.stderr + result.stdout

"""Django's own test suite against ENGINE 'django_postgrespool', compared with the stock engine.

    python3 tests/conformance/run.py                 # one lane: Django 5.2 + psycopg 3
    python3 tests/conformance/run.py --all           # the CI set (Django 5.2 and 6.1, both drivers)
    python3 tests/conformance/run.py --lane dj42-psycopg2 --apps basic backends
    python3 tests/conformance/run.py --write-differences   # rewrite differences.toml from this run

For each lane, the Django release's sdist is fetched with pip (cached under
``.cache/conformance``; no Django code is committed), its ``tests/runtests.py``
runs the apps below twice on a throwaway PostgreSQL server, once with
``django.db.backends.postgresql`` ("stock") and once with
``django_postgrespool`` ("pooled"), and every test whose outcome (pass, fail,
skip) differs is a difference. Known differences, each with a reason, are
listed in ``differences.toml``; the run fails on any other one, and reports the
entries that no longer occur. Each lane has its own virtualenv,
``.venv/conformance-<django>-<driver>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import lanes  # noqa: E402
from tests.support.pgcluster import Cluster  # noqa: E402

CACHE = ROOT / ".cache" / "conformance"
DIFFERENCES = HERE / "differences.toml"

APPS = [
    "backends",
    "transactions",
    "basic",
    "select_for_update",
    "transaction_hooks",
    "delete_regress",
    "get_or_create",
    "postgres_tests",
    "test_runner",
]
ENGINES = {"stock": "django.db.backends.postgresql", "pooled": "django_postgrespool"}
DEFAULT_LANES = ["dj52-psycopg"]
CI_LANES = ["dj42-psycopg2", "dj42-psycopg", "dj52-psycopg", "dj52-psycopg2", "dj61-psycopg", "dj61-psycopg2"]
# What the suite needs beyond Django itself (tests/requirements/postgres.txt,
# and tblib so that --parallel can carry tracebacks back from its workers).
EXTRA = {"psycopg": ["psycopg-pool>=3.2.0"], "psycopg2": []}
TEST_REQUIREMENTS = ["tblib>=1.5.0"]
# The outcomes that are compared; "absent": the test did not run at all.
CATEGORY = {
    "ok": "pass",
    "expected-failure": "pass",
    "fail": "fail",
    "error": "fail",
    "unexpected-success": "fail",
    "skip": "skip",
}
RUN_TIMEOUT = 20 * 60


def log(message: str) -> None:
    print(message, flush=True)


# -- Django's sources and the lane's virtualenv -----------------------------


# Python 3.12.1 does not call startTest() for a skipped test (CPython
# gh-113267, fixed in 3.12.2); Django's parallel runner counts startTest()
# calls to tell which test a worker's result belongs to, so from the first
# skip on every outcome would be pinned on the wrong test.
_PROBE = """
import unittest
class T(unittest.TestCase):
    @unittest.skip("probe")
    def test(self): pass
result = unittest.TestResult()
unittest.defaultTestLoader.loadTestsFromTestCase(T).run(result)
raise SystemExit(0 if result.testsRun == 1 else 1)
"""


def suite_python(django: str) -> str:
    """Return an interpreter for ``django`` whose unittest Django's parallel runner can trust."""
    wanted = lanes.PYTHON[django]
    major, minor = (int(x) for x in wanted.split("."))
    tried = []
    for version in [f"{major}.{m}" for m in range(minor, minor + 3)]:
        try:
            python = lanes.find_python(version)
        except SystemExit:
            continue
        if python in tried:
            continue
        tried.append(python)
        if subprocess.run([python, "-c", _PROBE], capture_output=True).returncode == 0:
            return python
        log(f"    skipping {python}: its unittest does not call startTest() for skipped tests")
    raise SystemExit(f"no usable Python >= {wanted} for Django {django} (tried: {', '.join(tried)})")


def fetch_sdist(django: str, python: str) -> Path:
    """Download Django ``django``.* 's sdist with pip (reused when offline); return it."""
    folder = CACHE / "sdist"
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.glob("django-*.tar.gz"))
    proc = subprocess.run(
        [python, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
         "--dest", str(folder), f"Django=={django}.*"],
        capture_output=True, text=True,
    )
    candidates = sorted(
        folder.glob(f"django-{django}.*.tar.gz"),
        key=lambda p: [int(x) if x.isdigit() else -1 for x in p.name[7:-7].split(".")],
    )
    if proc.returncode != 0:
        if not candidates:
            raise SystemExit(f"pip could not download Django=={django}.*:\n{proc.stderr}")
        log(f"    pip download failed; using the cached {candidates[-1].name}")
    elif set(folder.glob("django-*.tar.gz")) - before:
        log(f"    downloaded {candidates[-1].name}")
    return candidates[-1]


def extract_tests(sdist: Path) -> Path:
    """Unpack the sdist's ``tests/`` folder (once); return it."""
    name = sdist.name[: -len(".tar.gz")]
    target = CACHE / "src" / name
    tests = target / "tests"
    if (tests / "runtests.py").exists():
        return tests
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/tests/")]
        partial = CACHE / "src" / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        tar.extractall(partial, members=members, filter="data")
    (partial / top).rename(target)
    shutil.rmtree(partial, ignore_errors=True)
    return tests


def setup_venv(lane: str, sdist: Path, interpreter: str) -> Path:
    """Create or update ``.venv/conformance-<django>-<driver>``; return its python."""
    django, driver = lanes.parse(lane)
    venv = lanes.VENVS / f"conformance-{django}-{driver}"
    python = venv / "bin" / "python"
    reqs = [
        str(sdist),
        lanes.DRIVERS[driver],
        *EXTRA[driver],
        lanes.SQLALCHEMY[django],
        *TEST_REQUIREMENTS,
        "-e", str(ROOT / "packages" / "backend"),
    ]
    stamp = venv / ".requirements"
    digest = hashlib.sha1("\n".join([interpreter, *reqs]).encode()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    shutil.rmtree(venv, ignore_errors=True)  # this script's own venv; rebuilt from scratch
    if not python.exists():
        subprocess.run([lanes.uv(), "venv", "-q", "--python", interpreter, str(venv)], check=True)
    subprocess.run([lanes.uv(), "pip", "install", "-q", "--python", str(python), *reqs], check=True)
    stamp.write_text(digest)
    return python


# -- one run of the suite ---------------------------------------------------


@dataclass
class Run:
    lane: str
    engine: str
    outcomes: dict[str, str] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    returncode: int = 0
    log: Path | None = None
    broken: str = ""  # why the run produced no results

    def counts(self) -> dict[str, int]:
        counts = {"pass": 0, "fail": 0, "skip": 0}
        for outcome in self.outcomes.values():
            counts[CATEGORY[outcome]] += 1
        return counts


def run_suite(
    lane: str,
    engine: str,
    python: Path,
    tests: Path,
    cluster: Cluster,
    labels: list[str],
    parallel: int,
    tag: str = "",
) -> Run:
    """Run Django's ``runtests.py`` on ``labels`` with one engine; return the outcomes."""
    out = CACHE / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{lane}-{engine}{tag}"
    results, log_path = out / f"{stem}.json", out / f"{stem}.log"
    results.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE),
        "PYTHONDONTWRITEBYTECODE": "1",
        "CONFORMANCE_ENGINE": ENGINES[engine],
        "CONFORMANCE_HOST": cluster.host,
        "CONFORMANCE_PORT": str(cluster.port),
        "CONFORMANCE_USER": cluster.user,
        "CONFORMANCE_PASSWORD": cluster.password,
        "CONFORMANCE_RESULTS": str(results),
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    cmd = [
        str(python), "runtests.py", "--settings=pooled_conformance.settings",
        f"--parallel={parallel}", "--noinput", "--verbosity=2", *labels,
    ]
    started = time.monotonic()
    run = Run(lane, engine, log=log_path)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=tests, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            run.returncode = proc.wait(timeout=RUN_TIMEOUT)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                raise
            run.broken = f"timed out after {RUN_TIMEOUT}s"
    run.seconds = time.monotonic() - started
    if results.exists():
        data = json.loads(results.read_text())
        run.outcomes, run.details = data["outcomes"], data["details"]
    elif not run.broken:
        run.broken = f"runtests.py exited with {run.returncode} before reporting any result"
    return run


# -- comparing --------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    lane: str
    test: str
    stock: str
    pooled: str


def compare(stock: Run, pooled: Run) -> list[Difference]:
    """Return the tests whose pass/fail/skip category differs between the engines."""
    found = []
    for test in sorted(set(stock.outcomes) | set(pooled.outcomes)):
        a = CATEGORY.get(stock.outcomes.get(test, ""), "absent")
        b = CATEGORY.get(pooled.outcomes.get(test, ""), "absent")
        if a != b:
            found.append(Difference(stock.lane, test, a, b))
    return found


def _class_label(test: str) -> str:
    # "setUpClass (app.module.Class)" names the class it failed for.
    if test.endswith(")") and " (" in test:
        return test[test.index(" (") + 2 : -1]
    return test.rsplit(".", 1)[0]


def recheck(
    fresh: list[Difference], python: Path, tests: Path, cluster: Cluster
) -> set[Difference]:
    """Run the classes of ``fresh`` again, serially, on both engines; return those that vanish.

    A difference that shows in the full run only (a timing-dependent test, or
    one that depends on what ran before it in the same process) is reported
    apart instead of failing the run.
    """
    labels = sorted({_class_label(d.test) for d in fresh})
    if len(labels) > 20:  # that many is no accident; don't spend the time
        return set()
    lane = fresh[0].lane
    log(f"    re-running {len(labels)} class(es) of the {len(fresh)} new difference(s) on both engines")
    again = [
        run_suite(lane, engine, python, tests, cluster, labels, parallel=1, tag="-recheck")
        for engine in ENGINES
    ]
    if any(r.broken for r in again):
        return set()
    still = {(d.test, d.lane) for d in compare(*again)}
    return {d for d in fresh if (d.test, d.lane) not in still}


def load_known() -> dict[tuple[str, str], str]:
    """Return {(test, lane): reason} from differences.toml."""
    if not DIFFERENCES.exists():
        return {}
    data = tomllib.loads(DIFFERENCES.read_text())
    known = {}
    for entry in data.get("difference", []):
        for lane in entry["lanes"]:
            known[(entry["test"], lane)] = entry["reason"]
    return known


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def write_known(
    differences: list[Difference],
    known: dict[tuple[str, str], str],
    lanes_run: set[str],
) -> None:
    """Rewrite differences.toml: this run's differences, plus entries of lanes not run."""
    by_test: dict[str, dict[str, Difference | None]] = {}
    for d in differences:
        by_test.setdefault(d.test, {})[d.lane] = d
    for (test, lane) in known:
        if lane not in lanes_run:
            by_test.setdefault(test, {})[lane] = None
    lines = [
        "# Tests of Django's own suite whose outcome (pass / fail / skip) under ENGINE",
        "# 'django_postgrespool' differs from the stock 'django.db.backends.postgresql',",
        "# per lane. `make conformance` fails on a difference that is not listed here",
        "# and reports entries that no longer occur. The number of entries is the",
        "# figure to drive down. Regenerate: python3 tests/conformance/run.py --all",
        "# --write-differences (keeps the reasons; new entries need one).",
        "",
    ]
    for test in sorted(by_test):
        per_lane = by_test[test]
        groups: dict[tuple[str, str, str], list[str]] = {}
        for lane, d in per_lane.items():
            reason = known.get((test, lane), "TODO: explain")
            outcome = f"{d.stock} -> {d.pooled}" if d else ""
            groups.setdefault((reason, outcome, ""), []).append(lane)
        for (reason, outcome, _), group in groups.items():
            lines.append("[[difference]]")
            lines.append(f"test = {_toml_string(test)}")
            lines.append(f"lanes = [{', '.join(_toml_string(x) for x in sorted(group))}]")
            if outcome:
                lines.append(f"outcome = {_toml_string(outcome)}  # stock -> pooled")
            lines.append(f"reason = {_toml_string(reason)}")
            lines.append("")
    DIFFERENCES.write_text("\n".join(lines))


# -- the whole run ----------------------------------------------------------


def _first_line(detail: str) -> str:
    lines = [x for x in detail.strip().splitlines() if x.strip()]
    return lines[-1].strip()[:200] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help=f"run the CI set: {' '.join(CI_LANES)}")
    parser.add_argument("--lane", action="append", choices=lanes.ALL_LANES,
                        help=f"run this lane (repeatable; default {' '.join(DEFAULT_LANES)})")
    parser.add_argument("--apps", nargs="+", default=APPS, metavar="LABEL",
                        help="test labels to run (default: the conformance apps)")
    parser.add_argument("--parallel", type=int, default=2,
                        help="processes per run of runtests.py (default 2)")
    parser.add_argument("--pool-options", metavar="JSON",
                        help="DATABASE_POOL_ARGS for the pooled engine, e.g. '{\"pre_ping\": false}'")
    parser.add_argument("--no-recheck", action="store_true",
                        help="count every difference, without re-running the new ones' classes")
    parser.add_argument("--write-differences", action="store_true",
                        help="rewrite differences.toml from this run's differences")
    args = parser.parse_args(argv)
    chosen = args.lane or (CI_LANES if args.all else DEFAULT_LANES)
    partial_apps = sorted(args.apps) != sorted(APPS)

    if args.pool_options:
        json.loads(args.pool_options)  # fail now, not in every run
        os.environ["CONFORMANCE_POOL_OPTIONS"] = args.pool_options
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    known = load_known()
    started = time.monotonic()
    cluster = Cluster()
    log(f"==> PostgreSQL on {cluster.host}:{cluster.port}")
    cluster.start()
    runs: list[tuple[Run, Run, float]] = []
    differences: list[Difference] = []
    broken: list[str] = []
    sdists: dict[str, Path] = {}
    unconfirmed: list[Difference] = []
    try:
        for lane in chosen:
            django, driver = lanes.parse(lane)
            lane_started = time.monotonic()
            log(f"==> lane {lane}: Django {django}.* with {driver}")
            interpreter = suite_python(django)
            if django not in sdists:
                sdists[django] = fetch_sdist(django, interpreter)
            sdist = sdists[django]
            tests = extract_tests(sdist)
            python = setup_venv(lane, sdist, interpreter)
            log(f"    {sdist.name}, {python.parent.parent.relative_to(ROOT)} "
                f"({time.monotonic() - lane_started:.0f}s)")
            pair = []
            for engine in ENGINES:
                run = run_suite(lane, engine, python, tests, cluster, args.apps, args.parallel)
                c = run.counts()
                log(f"    {engine:6} {c['pass']:5} pass {c['fail']:4} fail {c['skip']:4} skip  "
                    f"{run.seconds:5.0f}s  (log: {run.log.relative_to(ROOT)})")
                if run.broken:
                    broken.append(f"{lane} {engine}: {run.broken} (see {run.log})")
                    log(f"    {engine}: {run.broken}")
                pair.append(run)
            stock, pooled = pair
            found = compare(stock, pooled) if not (stock.broken or pooled.broken) else []
            fresh = [d for d in found if (d.test, d.lane) not in known]
            if fresh and not args.no_recheck:
                lost = recheck(fresh, python, tests, cluster)
                unconfirmed += [d for d in fresh if d in lost]
                found = [d for d in found if d not in lost]
            differences += found
            runs.append((stock, pooled, time.monotonic() - lane_started))
            log(f"    {len(found)} difference(s); lane took {time.monotonic() - lane_started:.0f}s")
    finally:
        cluster.destroy()

    # -- report
    lanes_run = {stock.lane for stock, _, _ in runs}
    new = [d for d in differences if (d.test, d.lane) not in known]
    seen = {(d.test, d.lane) for d in differences}
    gone = sorted(k for k in known if k[1] in lanes_run and k not in seen)
    log("")
    log("==> Summary (pass / fail / skip; stock vs pooled)")
    for stock, pooled, seconds in runs:
        a, b = stock.counts(), pooled.counts()
        n = sum(1 for d in differences if d.lane == stock.lane)
        log(f"    {stock.lane:15} stock {a['pass']}/{a['fail']}/{a['skip']} ({stock.seconds:.0f}s)  "
            f"pooled {b['pass']}/{b['fail']}/{b['skip']} ({pooled.seconds:.0f}s)  "
            f"differences {n}  lane {seconds:.0f}s")
    log(f"    {len(differences)} difference(s) in all, {len(differences) - len(new)} of them known; "
        f"{time.monotonic() - started:.0f}s")
    details = {(r.lane, r.engine): r for s, p, _ in runs for r in (s, p)}
    for d in differences:
        mark = "known" if (d.test, d.lane) in known else "NEW"
        log(f"    [{mark}] {d.lane} {d.test}: stock {d.stock}, pooled {d.pooled}")
        if mark == "NEW":
            for engine, outcome in (("pooled", d.pooled), ("stock", d.stock)):
                detail = details[(d.lane, engine)].details.get(d.test)
                if outcome in {"fail", "skip"} and detail:
                    log(f"        {engine}: {_first_line(detail)}")
        else:
            log(f"        reason: {known[(d.test, d.lane)]}")
    for d in unconfirmed:
        log(f"    [unconfirmed] {d.lane} {d.test}: stock {d.stock}, pooled {d.pooled} in the full "
            f"run, the same on both engines when its class ran again alone (flaky or "
            f"order-dependent; not counted)")
    if gone and not partial_apps:
        log("==> Entries of differences.toml that no longer occur (remove them):")
        for test, lane in gone:
            log(f"    {lane} {test}")
    for problem in broken:
        log(f"==> BROKEN: {problem}")
    if args.write_differences:
        if partial_apps:
            log("==> --write-differences needs the full set of apps; differences.toml left alone")
        else:
            write_known(differences, known, lanes_run)
            log(f"==> wrote {DIFFERENCES.relative_to(ROOT)}")
            return 1 if broken else 0
    if new:
        log(f"==> FAILED: {len(new)} difference(s) not listed in {DIFFERENCES.relative_to(ROOT)}")
    return 1 if new or broken else 0


if __name__ == "__main__":
    sys.exit(main())

"""A ``DiscoverRunner`` that also writes each test's outcome to a JSON file.

Outcomes are taken from the result object rather than parsed from ``-v 2``
output: with ``--parallel`` the workers' events are replayed on the main
process's result, so this sees every test, and a docstring printed after a
test's name cannot confuse it.
"""

import json
import os
import time
import traceback
import unittest

from django.test.runner import DiscoverRunner

# Worst first: a test with a failing subtest and a passing body is a failure.
_RANK = {"error": 0, "fail": 1, "unexpected-success": 2, "skip": 3, "expected-failure": 4, "ok": 5}
_DETAIL_CHARS = 4000


def _test_id(test):
    # An _ErrorHolder (setUpClass/setUpModule failed) has only a description.
    return test.id() if hasattr(test, "id") else str(test)


class RecordingResult(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcomes = {}
        self.details = {}

    def _record(self, test, outcome, detail=None):
        test_id = _test_id(test)
        previous = self.outcomes.get(test_id)
        if previous is None or _RANK[outcome] < _RANK[previous]:
            self.outcomes[test_id] = outcome
            if detail:
                self.details[test_id] = detail[-_DETAIL_CHARS:]

    def _format(self, err):
        try:
            return "".join(traceback.format_exception(*err))
        except Exception:  # an error replayed from a worker without tblib
            return repr(err)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._record(test, "ok")

    def addError(self, test, err):
        super().addError(test, err)
        self._record(test, "error", self._format(err))

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._record(test, "fail", self._format(err))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._record(test, "skip", reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._record(test, "expected-failure")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._record(test, "unexpected-success")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._record(test, "fail" if failed else "error", self._format(err))


class RecordingRunner(DiscoverRunner):
    """Run Django's suite as usual; write the outcomes to ``$CONFORMANCE_RESULTS``."""

    def get_resultclass(self):
        # --debug-sql and --pdb are not used by the conformance run.
        return RecordingResult

    def run_suite(self, suite, **kwargs):
        started = time.monotonic()
        result = super().run_suite(suite, **kwargs)
        path = os.environ.get("CONFORMANCE_RESULTS")
        if path:
            with open(path, "w") as f:
                json.dump(
                    {
                        "seconds": round(time.monotonic() - started, 1),
                        "outcomes": result.outcomes,
                        "details": result.details,
                    },
                    f,
                    indent=0,
                    sort_keys=True,
                )
        return result

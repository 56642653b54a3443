"""Settings and test runner that Django's ``tests/runtests.py`` loads for the conformance run.

This folder (``tests/conformance``) is put on ``PYTHONPATH`` by ``run.py``; the
package's name is chosen not to clash with any of Django's test apps.
"""

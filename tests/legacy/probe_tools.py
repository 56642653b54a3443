"""What the legacy probes share (Python 2.7; imported by review_probe.py and watch_probe.py)."""
import os
import sys


def interrupt_at(marker):
    """Raise KeyboardInterrupt at the next line of _legacy.py that contains ``marker``."""
    from django_postgrespool import _legacy  # after the probe configured Django

    source = _legacy.__file__.rsplit(".", 1)[0] + ".py"
    with open(source) as f:
        lines = set(n for n, text in enumerate(f, 1) if marker in text)
    assert lines, marker
    suffix = os.path.join("django_postgrespool", "_legacy.py")

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno in lines:
            sys.settrace(None)
            raise KeyboardInterrupt("interrupted at %r" % marker)
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename.endswith(suffix) else None

    sys.settrace(calls)


def configure(host, port, database, application_name, pool_options):
    """Configure Django with one pooled alias, 'default' (before django.db is imported)."""
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        USE_TZ=True,
        TIME_ZONE="UTC",
        DATABASES={
            "default": {
                "ENGINE": "django_postgrespool",
                "NAME": database,
                "USER": "postgres",
                "PASSWORD": os.environ["LEGACY_DB_PASSWORD"],
                "HOST": host,
                "PORT": port,
                "OPTIONS": {"application_name": application_name},
                "POOL_OPTIONS": pool_options,
            }
        },
    )

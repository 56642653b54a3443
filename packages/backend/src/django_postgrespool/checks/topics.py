"""The list of check functions, (function, tags) each; modules add theirs here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ALL: list[tuple[Callable[..., list[Any]], tuple[str, ...]]] = []

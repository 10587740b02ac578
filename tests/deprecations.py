"""Early alarm for upstream renames: a FutureWarning or DeprecationWarning that transformers,
PEFT or hivemind raise on a call made by our packages fails the test that made it.

A rename announced one release ahead then turns CI red while the old name still works,
instead of reaching users as garbage one release later (transformers 5.24's `cache`).
Whose call it was is read off the stack at the moment of the warning: the first frame
outside the dependencies decides. So PEFT calling a deprecated transformers API from a test
is PEFT's business, while `swarm/models/base.py` passing `past_key_values` is ours.
The same holds for the deprecation notices transformers logs instead of warning.
"""

from __future__ import annotations

import logging
import sys
import sysconfig
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
OURS = tuple(str(ROOT / package) + "/" for package in ("swarm", "peer", "client"))
WATCHED = ("transformers", "peft", "hivemind")
CATEGORIES = (FutureWarning, DeprecationWarning)


STDLIB = sysconfig.get_paths()["stdlib"]


def _is_library(filename: str) -> bool:
    return "site-packages" in filename or filename.startswith((STDLIB, "<")) or filename == __file__


def _is_watched(filename: str) -> bool:
    parts = Path(filename).parts
    return "site-packages" in parts and any(name in parts for name in WATCHED)


def _our_caller() -> str | None:
    """`file:line` of our code whose call made a watched dependency warn just now, else None.

    Read off the stack: past the warnings/logging machinery, the warner must be a watched
    dependency; past it and every library frame under it (torch's Module.__call__, say), the
    first frame of project code decides."""
    frame = sys._getframe(1)
    while frame is not None and _is_library(frame.f_code.co_filename) and not _is_watched(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None or not _is_watched(frame.f_code.co_filename):
        return None
    while frame is not None and _is_library(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(OURS):
        return None
    return f"{Path(frame.f_code.co_filename).relative_to(ROOT)}:{frame.f_lineno}"


_innermost: list[list[str]] = []  # the collecting lists of the checks in force, innermost last


class _LoggedDeprecations(logging.Handler):
    def __init__(self, found: list[str]):
        super().__init__(logging.WARNING)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if _innermost[-1] is not self.found:  # a nested check (tests/test_deprecations.py) owns it
            return
        if "deprecat" in message.lower() and (caller := _our_caller()) is not None:
            self.found.append(f"{caller}: {record.name} logged: {message}")


@contextmanager
def deprecations_are_errors() -> Iterator[list[str]]:
    """Collects our calls that drew a deprecation from a watched dependency; the caller fails
    the test when the list is not empty. Other warnings pass through to pytest as usual."""
    found: list[str] = []
    _innermost.append(found)
    handler = _LoggedDeprecations(found)
    loggers = [logging.getLogger(name) for name in WATCHED]
    with warnings.catch_warnings():
        forward = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, CATEGORIES) and (caller := _our_caller()) is not None:
                found.append(f"{caller}: {category.__name__}: {message}")
                return
            forward(message, category, filename, lineno, file, line)

        for category in CATEGORIES:
            warnings.simplefilter("always", category)
        warnings.showwarning = showwarning
        for logger in loggers:
            logger.addHandler(handler)
        try:
            yield found
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            _innermost.pop()  # contexts nest, so the last one is ours

"""tests/deprecations.py catches what it claims: a watched dependency's deprecation on a call
from our packages, and nothing it does not own (frames are compiled with those files' names)."""

from __future__ import annotations

import logging
import warnings

import pytest

from tests.deprecations import ROOT, deprecations_are_errors

WARNER = "/venv/lib/python3.11/site-packages/transformers/utils/deprecation.py"


def caller_in(filename: str, warn):
    """A function that lives in `filename` and calls `warn` (a function living in WARNER)."""
    namespace = {"warn": warn}
    exec(compile("def call():\n    warn()\n", filename, "exec"), namespace)
    return namespace["call"]


def dependency_warning(how: str):
    namespace = {"warnings": warnings, "logging": logging}
    body = ('    warnings.warn("`past_key_values` is deprecated", FutureWarning, stacklevel=2)\n' if how == "warn"
            else '    logging.getLogger("transformers.foo").warning("`x` is deprecated, use `y`")\n')
    exec(compile("def warn():\n" + body, WARNER, "exec"), namespace)
    return namespace["warn"]


@pytest.mark.parametrize("how", ["warn", "log"])
def test_a_deprecation_on_our_call_is_caught(how):
    ours = caller_in(str(ROOT / "swarm" / "models" / "base.py"), dependency_warning(how))
    with deprecations_are_errors() as found:
        ours()
    assert len(found) == 1 and "swarm/models/base.py:2" in found[0], found


@pytest.mark.parametrize("how", ["warn", "log"])
def test_one_not_made_by_our_code_passes(how):
    theirs = caller_in("/venv/lib/python3.11/site-packages/peft/peft_model.py", dependency_warning(how))
    from_a_test = caller_in(str(ROOT / "tests" / "swarm" / "test_x.py"), theirs)
    with deprecations_are_errors() as found, warnings.catch_warnings(record=True):
        from_a_test()
    assert found == []

"""`swarm peer` argument handling: a bad span or model is one line on stderr and exit code 2."""

from __future__ import annotations

import pytest

from swarm import cli


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["peer", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_span_outside_the_model_names_its_block_count(capsys):
    code, out, err = run(capsys, "--blocks", "25:31")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "30 blocks" in err and "Traceback" not in err


def test_unknown_model_lists_the_known_ones(capsys):
    code, _, err = run(capsys, "--model", "no-such-model", "--blocks", "0:1")
    assert code == 2
    assert "unknown model 'no-such-model'" in err and "smollm2-135m-instruct" in err


@pytest.mark.parametrize("argv, says", [
    (["--blocks", "7"], "is not START:END"),
    ([], "--blocks"),
    (["--blocks", "0:1", "--port", "70000"], "port must be in 0..65535"),
    (["--blocks", "0:1", "--session-timeout", "0"], "must be > 0"),
])
def test_malformed_arguments_exit_2_with_usage(capsys, argv, says):
    with pytest.raises(SystemExit) as exited:
        run(capsys, *argv)
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit) as exited:
        run(capsys, "--help")
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--blocks", "--initial-peers", "--public-host", "--cache-tokens", "--dtype", "--device"):
        assert flag in out

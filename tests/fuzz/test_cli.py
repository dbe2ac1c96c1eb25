"""`harness fuzz` command-line checking: values that would make a run do
nothing, or never stop, are refused with argparse's usage error."""

from __future__ import annotations

import pytest

from harness.fuzz.cli import parse_args


@pytest.mark.parametrize("argv, message", [
    (["--count", "-1"], "--count and --start must not be negative"),
    (["--time-budget", "-1"], "--time-budget must be a number of seconds, 0 or more"),
    (["--time-budget", "nan"], "--time-budget must be a number of seconds, 0 or more"),
    (["--shrink-seconds", "0"], "--shrink-seconds must be a positive number of seconds"),
    (["--case-timeout", "-5"], "--case-timeout must be a positive number of seconds"),
    (["--jobs", "-2"], "--jobs must not be negative"),
    (["--shrink-runs", "-1"], "--shrink-runs must not be negative"),
    (["--backends", "engine"], "--backends takes two backends"),
])
def test_bad_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_good_values_are_taken():
    args = parse_args(["--time-budget", "1.5", "--jobs", "0", "--backends", "cli,qemu"])
    assert (args.time_budget, args.jobs, args.tested, args.reference) == (1.5, 0, "cli", "qemu")

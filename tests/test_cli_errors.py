"""One error style for every command: bad input -> one line ``reasonknee3d <command>: error: ...``, exit 2.

The cases live in ``scripts/bad_input_table.py`` (which also writes ``docs/hardening.md``); here each one runs
in-process through ``cli.main`` with pytest's capture.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reasonknee3d import cli

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("bad_input_table", ROOT / "scripts" / "bad_input_table.py")
table = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bad_input_table", table)  # dataclasses look their module up by name
_spec.loader.exec_module(table)


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)


def _subcommands() -> set[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return set(sub.choices)


def test_every_command_has_a_bad_input_case():
    assert {c.command for c in table.CASES} == _subcommands()


@pytest.mark.parametrize("case", table.CASES, ids=lambda c: f"{c.command}: {c.what}")
def test_bad_input_is_one_error_line_and_exit_2(case, tmp_path, capsys):
    fixtures = table.make_fixtures(tmp_path / "fx")
    before = table.snapshot(fixtures)
    code = cli.main(case.resolved(fixtures))
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith(f"reasonknee3d {case.command}: error: "), err
    assert "Traceback" not in out + err
    assert table.snapshot(fixtures) == before  # nothing of the user's changed


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch):
    from reasonknee3d.data.release import ReleaseError
    argv = ["check-release", str(tmp_path / "missing")]
    with pytest.raises(ReleaseError, match="not a release root"):
        cli.main(["--debug", *argv])
    with pytest.raises(ReleaseError):
        cli.main([*argv, "--debug"])  # also after the command name
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ReleaseError):
        cli.main(argv)
    monkeypatch.delenv(cli.DEBUG_ENV)
    run = lambda *a: subprocess.run([sys.executable, "-m", "reasonknee3d", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=ROOT)
    plain, debug = run(*argv), run("--debug", *argv)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and len(plain.stderr.splitlines()) == 1
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ReleaseError" in debug.stderr


def test_unexpected_error_is_one_line_naming_it_with_exit_1(tmp_path, monkeypatch, capsys):
    import reasonknee3d.data.check_release as check

    def bug(*a, **k):
        raise RuntimeError("internal state went wrong")
    monkeypatch.setattr(check, "run_check_release", bug)
    assert cli.main(["check-release", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("reasonknee3d check-release: error: unexpected builtins.RuntimeError: internal state")
    assert "rerun with --debug for the traceback" in err


def test_keyboard_interrupt_is_one_line_exit_130(tmp_path, monkeypatch, capsys):
    import reasonknee3d.data.check_release as check

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(check, "run_check_release", interrupted)
    assert cli.main(["check-release", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "reasonknee3d check-release: interrupted\n"


def test_user_errors_and_bugs_are_told_apart():
    from reasonknee3d.boxes import validate_box
    from reasonknee3d.config import ConfigError
    with pytest.raises(ValueError) as package_check:
        validate_box([5, 1, 0, 1, 0, 1], (8, 8, 8))  # the package's own argument check
    with pytest.raises(ValueError) as library:
        np.zeros(3).reshape(2, 2)  # raised inside numpy: a bug of the caller
    assert cli.is_user_error(package_check.value)
    assert not cli.is_user_error(library.value)
    assert cli.is_user_error(ConfigError("x")) and cli.is_user_error(FileNotFoundError(2, "No such file", "p"))
    assert not cli.is_user_error(KeyError("k")) and not cli.is_user_error(TypeError("t"))


def test_os_errors_read_what_and_where():
    e = FileNotFoundError(2, "No such file or directory", "/data/x.jsonl")
    assert cli._describe(e) == "No such file or directory: /data/x.jsonl; check the path"
    assert cli._describe(ValueError("line one\n  line two\n")) == "line one | line two"


def test_usage_errors_are_one_line(capsys):
    assert cli.main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reasonknee3d: error: argument COMMAND: invalid choice") and err.count("\n") == 1
    assert cli.main(["score", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reasonknee3d score: error: the following arguments are required: --predictions")
    assert err.count("\n") == 1 and "(see reasonknee3d score --help)" in err


def test_validators_accept_valid_values():
    parse = cli.build_parser().parse_args
    a = parse(["infer", "--model", "m", "--volume", "v.nii.gz", "--question-id", "69", "--box", "0", "0", "1", "4",
               "2", "9", "--png", "o.PNG"])
    assert a.question_id == 69 and a.box == [0, 0, 1, 4, 2, 9] and a.png == Path("o.PNG")
    a = parse(["zeroshot", "--backend", "openai", "--model", "m", "--data", "d", "--out", "p.jsonl", "--limit", "0",
               "--timeout", "0.5", "--frames", "1", "--max-retries", "0"])
    assert (a.limit, a.timeout, a.frames, a.max_retries) == (0, 0.5, 1, 0)
    assert parse(["synth", "o", "--shape", "16", "32", "32"]).shape == [16, 32, 32]


def test_question_id_message_names_the_valid_range(capsys):
    assert cli.main(["infer", "--model", "m", "--volume", "v.nii.gz", "--question-id", "70"]) == 2
    assert "expected a question id in 1..69 (reasonknee3d questions lists them), got '70'" in capsys.readouterr().err


def _options(parser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_every_option_of_every_command_has_help_and_help_shows_defaults(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in _options(p)
               if not (a.help or "").strip()]
    assert missing == [] and all(a.help for a in _options(parser))
    assert cli.main(["synth", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 16)" in text and "(default: (160, 384, 384))" in text and "(default: None)" not in text
    assert cli.main(["predict", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "samples per generate call (default: 4)" in text and "(default: False)" not in text

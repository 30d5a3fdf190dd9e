"""A sub-command whose module fails to import is an error with its cause, never a missing command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deepspec import cli

BROKEN_MODULES = {
    # A stage module importing a deepspec module that does not exist (a bug or a broken install):
    # the old CLI dropped such a command without a word.
    "broken_internal": "import deepspec.no_such_module\n",
    # An optional dependency that is not installed.
    "missing_extra": "import deepspec_test_absent_package\n",
    # Any other failure at import time.
    "raises_at_import": "raise RuntimeError('cannot read the stage settings')\n",
}


@pytest.fixture
def broken_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for module, source in BROKEN_MODULES.items():
        (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    commands = {"recipe": cli.COMMANDS["recipe"], **{m.replace("_", "-"): m for m in BROKEN_MODULES}}
    monkeypatch.setattr(cli, "COMMANDS", commands)
    yield commands
    for module in BROKEN_MODULES:
        sys.modules.pop(module, None)


@pytest.mark.parametrize(
    ("command", "cause", "fix"),
    [
        ("broken-internal", "No module named 'deepspec.no_such_module'", "reinstall deepspec"),
        ("missing-extra", "No module named 'deepspec_test_absent_package'", "install the extra"),
        ("raises-at-import", "RuntimeError: cannot read the stage settings", "reinstall deepspec"),
    ],
)
def test_a_command_that_fails_to_import_reports_its_cause(
    broken_commands: dict[str, str], capsys: pytest.CaptureFixture[str], command: str, cause: str, fix: str
) -> None:
    # Options of the real command (and -h) still reach the error instead of an argument error.
    rc = cli.main([command, "-c", "recipe.yaml", "--set", "a=b", "-h"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"`deepspec {command}` cannot run: importing {broken_commands[command]} failed" in err
    assert cause in err
    assert fix in err


def test_help_lists_unavailable_commands_with_the_cause(
    broken_commands: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    assert (
        "broken-internal (unavailable: ModuleNotFoundError: No module named 'deepspec.no_such_module')" in out
    )
    assert "raises-at-import (unavailable: RuntimeError: cannot read the stage settings)" in out
    assert "recipe " in out  # the commands that import still work


def test_every_real_command_imports(capsys: pytest.CaptureFixture[str]) -> None:
    """In the development install no sub-command is unavailable."""
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "unavailable" not in out
    for name in cli.COMMANDS:
        assert name in out

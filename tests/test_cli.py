"""The CLI shell: help, version, exit codes."""

from __future__ import annotations

import subprocess
import sys

from sr1step import __version__
from sr1step.cli import run


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sr1step {__version__}"


def test_help_lists_commands(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("upscale", "distill", "eval", "weights", "bench"):
        assert command in out


def test_unknown_command_is_usage_error(capsys):
    assert run(["frobnicate"]) == 2
    assert "No such command" in capsys.readouterr().err


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "sr1step", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout

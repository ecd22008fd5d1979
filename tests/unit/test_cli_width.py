"""What the CLIs print does not depend on the terminal's width where a program reads it, and
help text fits a wide terminal without cutting anything."""

from __future__ import annotations

import importlib
import io
from collections.abc import Iterator
from typing import Any

import pytest
import typer.main
from rich.table import Table
from typer.testing import CliRunner

from core.console import PIPE_WIDTH, CliConsole, cli_console
from fieldline.cli import app

runner = CliRunner()

# Every module whose `console` prints what a command reports.
CLI_MODULES = [
    "broker.cli",
    "certs.cli",
    "edge_agent.cli",
    "fieldline.db_cli",
    "fieldline.ops_cli",
    "fieldline.up_cli",
    "ingest_worker.cli",
    "simulator.cli",
]


def _commands(command: Any, path: list[str]) -> Iterator[list[str]]:
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if not sub.hidden:
            yield from _commands(sub, [*path, name])


COMMANDS = list(_commands(typer.main.get_command(app), []))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _wide_table() -> Table:
    table = Table("id", "tenant", "role", "serial", "not after", "revoked")
    table.add_row("pump-station-12", "acme", "operator", "5c7a0d1e22ff", "2027-01-01", "")
    return table


@pytest.mark.parametrize("module", CLI_MODULES)
def test_every_cli_prints_through_the_width_independent_console(module: str) -> None:
    assert isinstance(importlib.import_module(module).console, CliConsole)


@pytest.mark.parametrize("columns", ["40", "200"])
def test_piped_output_is_neither_wrapped_nor_cut(
    columns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    out = io.StringIO()
    console = CliConsole(file=out)
    console.print(_wide_table())
    console.print("mosquitto_sub " + "--cafile /a/long/path " * 10)
    assert console.width == PIPE_WIDTH
    assert "pump-station-12" in out.getvalue()
    assert "…" not in out.getvalue()
    assert len(out.getvalue().splitlines()) == 6  # 5 table lines and one command line


def test_a_terminal_gets_output_fitted_to_its_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    out = _Terminal()
    console = CliConsole(file=out, color_system=None)
    console.print(_wide_table())
    assert console.width == 40
    assert max(len(line) for line in out.getvalue().splitlines()) <= 40
    assert cli_console(stderr=True).stderr


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(words) or "fieldline")
def test_help_names_every_option_uncut_on_a_wide_terminal(words: list[str]) -> None:
    # Help is for people: rich fits it to the terminal (below ~60 columns typer cuts long
    # option names), so tests that read it pin a wide one, as here.
    result = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    command: Any = typer.main.get_command(app)
    for word in words:
        command = command.commands[word]
    for param in command.params:
        for option in param.opts:
            if option.startswith("-") and not getattr(param, "hidden", False):
                assert option in result.output, f"{' '.join(words)}: {option}"

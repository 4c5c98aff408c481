"""`d2ora --help` reads cleanly: one complete sentence per command, no reST markup showing."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from d2ora.cli import app

# Wide enough that no summary wraps: a summary on two rows can then only be a line break in the
# docstring's first paragraph, which Typer's rich help keeps (it cut `compare` mid-sentence).
WIDE = {"COLUMNS": "300", "NO_COLOR": "1"}
PEER_FIRST_SENTENCE = "Run one process of a decentralized run: torchrun starts it, or each organisation its own."


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def command_rows(output: str) -> list[tuple[str, str]]:
    """``(name, summary)`` per row of the Commands panel; a continuation row has no name."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if "Commands" in line and line.lstrip().startswith("╭"))
    rows: list[tuple[str, str]] = []
    for line in lines[start + 1:]:
        if line.lstrip().startswith("╰"):
            break
        inner = line.strip().strip("│").rstrip()
        match = re.match(r"^ (\S+)\s{2,}(.*)$", inner)
        rows.append((match.group(1), match.group(2).strip()) if match else ("", inner.strip()))
    return rows


def commands() -> dict[tuple[str, ...], Any]:
    """Every command and group by its path under ``d2ora`` (the app itself is ``()``)."""
    found: dict[tuple[str, ...], Any] = {}

    # Duck-typed: Typer builds its commands on its own copy of click, not the click package.
    def walk(command: Any, path: tuple[str, ...]) -> None:
        found[path] = command
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = commands()
GROUPS = [path for path, command in COMMANDS.items() if hasattr(command, "commands")]


@pytest.mark.parametrize("group", GROUPS, ids=lambda p: " ".join(("d2ora", *p)))
def test_every_summary_is_one_full_sentence(group: tuple[str, ...]) -> None:
    rows = command_rows(help_text(*group))
    assert rows, "no Commands panel"
    for name, summary in rows:
        assert name, f"a summary runs onto a second row: {summary!r}"
        assert summary.endswith("."), f"{name}: {summary!r} does not end with a full stop"
        assert "``" not in summary and "`" not in summary, f"{name}: markup in {summary!r}"
    listed = [name for name, _ in rows]
    subcommands = [path[-1] for path, c in COMMANDS.items() if path[:-1] == group and len(path) == len(group) + 1 and not c.hidden]
    assert sorted(listed) == sorted(subcommands)


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(("d2ora", *p)))
def test_no_rest_markup_in_any_help(path: tuple[str, ...]) -> None:
    assert "``" not in help_text(*path)


def test_peer_help_has_its_whole_first_sentence() -> None:
    text = " ".join(help_text("peer").split())  # the terminal may wrap it anywhere
    assert PEER_FIRST_SENTENCE in text
    summaries = dict(command_rows(help_text()))
    assert summaries["peer"] == PEER_FIRST_SENTENCE


def test_log_output_to_a_pipe_arrives_line_by_line() -> None:
    # A peer's log piped to a file must show each round's line when it happens, not at exit.
    import subprocess
    import sys
    import threading

    program = ("import time\nfrom d2ora.commands.simulate import console_for_logs\n"
               "console_for_logs().print('round 1: own adapter accuracy 50.0%')\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        timer = threading.Timer(30, proc.kill)  # a buffered line would only come at exit
        timer.start()
        line = proc.stdout.readline()
        timer.cancel()
        assert line == "round 1: own adapter accuracy 50.0%\n"
        assert proc.poll() is None  # read while the process still runs
    finally:
        proc.kill()
        proc.communicate()

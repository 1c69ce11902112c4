"""The docs say what is true: performance figures are quoted from
bench/results/ (their one source), and every `gateway ...` command the
README and docs/ show is one the command line accepts."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

from gateway.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def results_text() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "bench" / "results").iterdir()) if p.is_file())


def test_performance_tables_are_quoted_from_the_results() -> None:
    results = results_text()
    rows = [line for line in (ROOT / "docs" / "performance.md").read_text().splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ")]
    assert len(rows) > 40
    assert [r for r in rows if r not in results] == []


def test_readme_performance_figures_are_in_the_results() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Performance"):]
    section = section[:section.index("\n## ", 1)]
    figures = re.findall(r"\d[\d,.]*(?: ms|%)", section)
    assert len(figures) >= 3
    results = results_text()
    assert [f for f in figures if f not in results] == []
    date = re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", section)
    assert date and f"Python 3.11.7, {date[0]}" in results, "the run quoted is the run in the file"


# ------------------------------------------------------------------ documented commands


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every `gateway ...` in a shell block or inline code
    of the README and docs/, placeholders filled, each optional [group]
    checked on its own."""
    known = _subcommands(build_parser()) | {"--config", "--version"}
    found: list[tuple[str, list[str]]] = []
    for path in DOCS:
        text = path.read_text()
        fragments = re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M) + re.findall(r"`([^`\n]+)`", text)
        for fragment in fragments:
            # In tables an alternative is written \|: one word, not a pipe.
            for line in fragment.replace("\\\n", " ").replace("\\|", ALT).splitlines():
                for m in re.finditer(r"(?<![\w.-])gateway(?=\s)", line):
                    rest = re.split(r"[|&;)`]", line[m.end():])[0]
                    optional = re.findall(r"\[([^\]]*)\]", rest)
                    required = re.sub(r"\[[^\]]*\]", " ", rest)
                    try:
                        words = shlex.split(required, comments=True)
                    except ValueError:
                        continue
                    if not words or words[0] not in known:
                        continue  # a user, a unit or a host named gateway
                    base = [fill(w) for w in words]
                    where = f"{path.name}: gateway {rest.strip()}"
                    found.append((where, base))
                    for group in optional:
                        found.append((f"{where} [{group}]",
                                      base + [fill(w) for w in shlex.split(group)]))
    return found


ALT = "\N{BROKEN BAR}"


def fill(word: str) -> str:
    """A value for a placeholder: NAME, N, ID, ISO, `model\\|key\\|...` (the first)."""
    word = word.split(ALT)[0]
    return "1" if re.fullmatch(r"[A-Z][A-Z_]*", word) else word


def test_every_documented_command_parses() -> None:
    commands = documented_commands()
    names = {argv[argv.index("--config") + 2] if argv[0] == "--config" else argv[0] for _, argv in commands}
    assert {"serve", "demo", "mock", "check-config", "workspaces", "keys", "usage"} <= names
    bad = []
    for where, argv in commands:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                build_parser().parse_args(argv)
        except SystemExit as e:
            if argv == ["--version"] and e.code == 0:
                continue
            bad.append(f"{where}: {err.getvalue().strip().splitlines()[-1:]}")
    assert bad == []

"""Rules the source keeps: a file is readable in one sitting, and its comments and
docstrings say why, leaving measurements, dates and history to benchmarks/RESULTS.md
and the issue tracker."""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
FILES = sorted(SRC.rglob("*.py"))
MAX_LINES = 450

# What a comment or docstring line must not cite.
CITATIONS = {
    "a date": re.compile(r"\b20\d\d-\d\d"),
    "an issue number": re.compile(r"\bissues?\s+#?\d+|(?<![\w&#])#\d+\b", re.IGNORECASE),
    "a RESULTS section": re.compile(
        r"RESULTS(?:\.md)?(?:#|,|:|\s*\(|\s*§|\s+(?:section|table|row|under)\b)"
        r"|\bsection\b[^.]*\bRESULTS\b",
        re.IGNORECASE,
    ),
}


def _name(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


def _prose(source: str) -> list[tuple[int, str]]:
    """(line number, text) of every comment and docstring line of `source`."""
    lines = [
        (token.start[0], token.string)
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring is not None:
                first = node.body[0].lineno
                lines += [(first + i, text) for i, text in enumerate(docstring.splitlines())]
    return sorted(lines)


def citations(source: str) -> list[str]:
    """`line: what it cites: text` for each comment or docstring line citing something
    listed in `CITATIONS`."""
    return [
        f"{number}: {what}: {text.strip()}"
        for number, text in _prose(source)
        for what, pattern in CITATIONS.items()
        if pattern.search(text)
    ]


def test_the_rules_catch_what_they_name():
    flagged = citations(
        '"""Measured 2026-11-28 (benchmarks/RESULTS.md, GPU section)."""\n'
        "x = 1  # slower as a graph (issue 6)\n"
        "y = 2  # see #21\n"
        "z = 3  # RESULTS: Winograd\n"
    )
    assert [line.split(": ")[1] for line in flagged] == [
        "a date",
        "a RESULTS section",
        "an issue number",
        "an issue number",
        "a RESULTS section",
    ]
    fine = '"""XLA pays off for large models; see benchmarks/RESULTS.md."""\nw = "#21"  # str\n'
    assert citations(fine) == []


@pytest.mark.parametrize("path", FILES, ids=_name)
def test_file_fits_in_one_sitting(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{_name(path)} has {lines} lines; split it by job"


@pytest.mark.parametrize("path", FILES, ids=_name)
def test_comments_say_why_without_measurement_logs(path):
    found = citations(path.read_text(encoding="utf-8"))
    assert not found, f"{_name(path)}:\n" + "\n".join(found)

"""ruff (configured in pyproject.toml) finds nothing to fix or reformat in the project."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PATHS = ["src", "tests", "benchmarks", "examples", "tools"]


def _ruff(*args) -> subprocess.CompletedProcess:
    ruff = shutil.which("ruff") or pytest.fail("ruff is not installed; it is in the test extra")
    return subprocess.run(
        [ruff, *args, *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_ruff_check_is_clean():
    result = _ruff("check", "--no-cache")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_ruff_format_is_clean():
    result = _ruff("format", "--check", "--no-cache")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_ruff_reports_a_finding(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    result = subprocess.run(
        [shutil.which("ruff"), "check", "--no-cache", "--isolated", "--select", "F", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "F401" in result.stdout, sys.executable

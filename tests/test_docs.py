"""Docstring examples run, and the docs folder's code and links are sound."""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import keras_sd

DOCS = Path(__file__).parents[1] / "docs"
MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(keras_sd.__path__, "keras_sd.")
    if not name.endswith("__main__")
)


@pytest.mark.parametrize("name", ["keras_sd", *MODULES])
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def _markdown_files():
    return sorted(DOCS.rglob("*.md")) + [DOCS.parent / "README.md"]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_markdown_python_blocks_compile_and_links_resolve(path):
    text = path.read_text(encoding="utf-8")
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        compile(block, str(path), "exec")
    for target in re.findall(r"\]\(([^)#\s]+)\)", text):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


@pytest.mark.parametrize("name", keras_sd.__all__)
def test_public_api_has_docstring_with_example(name):
    obj = getattr(keras_sd, name)
    doc = obj.__doc__ or ""
    assert "Example" in doc or ">>>" in doc, f"keras_sd.{name} has no example in its docstring"

"""Docstring examples run, and the docs folder's code and links are sound."""

import doctest
import importlib
import inspect
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
        if "://" in target or target.startswith("../images/generated/"):
            continue  # generated images exist only in the built site (tests/test_docs_site.py)
        assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


def _public_names():
    """`module.name` of every class and function a package or module exports in `__all__`;
    constants cannot carry a docstring of their own, so they are left to their module's."""
    names = []
    for module_name in ["keras_sd", *MODULES]:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isroutine(obj):
                names.append(f"{module_name}.{name}")
    return names


def test_public_names_are_found():
    names = _public_names()
    assert "keras_sd.StableDiffusion" in names and "keras_sd.schedulers.DDIMScheduler" in names
    assert not any(name.endswith(".COMPILE_CACHE_VARIABLE") for name in names)


@pytest.mark.parametrize("name", _public_names())
def test_public_api_has_docstring_with_example(name):
    module_name, attribute = name.rsplit(".", 1)
    obj = getattr(importlib.import_module(module_name), attribute)
    # The object's own docstring: a class without one would show its base class's.
    doc = obj.__doc__ if not inspect.isclass(obj) else vars(obj).get("__doc__")
    assert ">>>" in (doc or ""), f"{name} has no runnable example in its docstring"

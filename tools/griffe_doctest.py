"""A griffe extension (mkdocs.yml): render docstring examples as code.

keras-sd docstrings put `>>>` lines flush under `Example:` (doctest reads them that
way), which Google-style parsing leaves as plain markdown, where `>>>` becomes a quote
and `x[0][1]` a link. Each run of example lines and their outputs is fenced as `pycon`.
"""

from __future__ import annotations

import griffe


def fence_examples(text: str) -> str:
    """`text` with every doctest block (a `>>>` line up to a blank line) fenced."""
    out, block = [], []
    for line in text.splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith(">>>") or (block and stripped):
            block.append(stripped)
            continue
        if block:
            out += ["```pycon", *block, "```"]
            block = []
        out.append(line)
    return "\n".join(out[:-1])


class DoctestBlocks(griffe.Extension):
    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_examples(obj.docstring.value)

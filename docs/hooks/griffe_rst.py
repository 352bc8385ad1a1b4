"""Griffe extension (mkdocs.yml, mkdocstrings ``extensions``): nt_dist's docstrings are Google
style with a few reStructuredText habits; render those as Markdown instead of printing them raw.

- roles: ``:class:`~nt_dist.errors.UserError``` -> a code span (``UserError`` where the target
  starts with ``~``, as Sphinx shows it);
- a paragraph ending in ``::`` (a literal block follows) ends in ``:``; the indented block after it
  is already a Markdown code block.

``double backticks`` need nothing: Markdown reads them as a code span.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?[a-z]+:`(~?)([^`]+)`")


def to_markdown(text: str) -> str:
    text = ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)
    return re.sub(r"(\S)::$", r"\1:", text, flags=re.MULTILINE)


class RstToMarkdown(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)

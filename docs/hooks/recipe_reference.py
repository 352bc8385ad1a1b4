"""MkDocs hook: the recipe reference page, generated from ``nt_dist/config.py`` at build time.

Nothing of the page is written by hand, so it cannot drift from the code: for every section of
``nt_dist.config.Recipe`` (in order) it lists each key with its type, default, bounds (from
``Field(ge=..., le=...)``), allowed values (from a ``Literal`` type) and the ``#`` comments the
source gives the key (comment lines right above it and the comment at the end of its line, read
with ``ast`` + ``tokenize``), under the section class's docstring.

The page is ``recipe-reference.md``, added to the site's files in ``on_files`` (it exists only in
the built site). ``tests/test_docs.py`` builds the site and checks every key is on the page.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import re
import textwrap
import tokenize
import typing
from typing import Any, Literal

PAGE = "recipe-reference.md"

BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


def render() -> str:
    """The whole page, as Markdown."""
    import nt_dist.config as cfg

    out = [
        "# Recipe reference",
        "",
        "Generated from `nt_dist/config.py` when the site is built: every key of every section, its",
        "type, default and bounds as validated, and the comments the source gives it. Every key has a",
        "default; unknown keys are an error. Set any key in the recipe file or on the command line",
        "with `--set section.key=value` (the value is read as YAML and cast to the key's type).",
        "",
        _doc(cfg.Recipe),
        "",
    ]
    for section, cls in typing.get_type_hints(cfg.Recipe).items():
        out += [f"## `{section}`", "", _doc(cls), "", *_table(section, cls), ""]
    return "\n".join(out)


def _table(section: str, cls: type) -> list[str]:
    import nt_dist.config as cfg

    comments = _field_comments(cls)
    rows = ["| key | type | default | allowed | notes |", "|---|---|---|---|---|"]
    for name, info in cls.__pydantic_fields__.items():
        kind = info.annotation
        if typing.get_origin(kind) is Literal:
            values = typing.get_args(kind)
            shown_type, allowed = type(values[0]).__name__, ", ".join(f"`{v}`" for v in values)
        else:  # a name checked against a registry (objectives, data sets), or free
            registered = cfg.registered_values().get(f"{section}.{name}", ())
            shown_type, allowed = _type_name(kind), ", ".join(f"`{v}`" for v in registered)
        bounds = [f"{sign} {getattr(m, key)}" for key, sign in BOUNDS for m in info.metadata if hasattr(m, key)]
        allowed = ", ".join(filter(None, [allowed, *bounds]))
        default = json.dumps(info.get_default(call_default_factory=True), ensure_ascii=False)
        cells = [f"`{section}.{name}`", f"`{shown_type}`", f"`{default}`", allowed, comments.get(name, "")]
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return rows


def _cell(text: str) -> str:
    """Text for a table cell: outside code spans, ``|`` must not end the cell nor ``<key>`` read as HTML."""
    parts = text.split("`")
    parts[::2] = [part.replace("|", "\\|").replace("<", "&lt;") for part in parts[::2]]
    return "`".join(parts)


def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comments: the comment lines directly above it, then the one ending its line."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while line in comments and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            found[node.target.id] = " ".join(above + trailing)
    return found


def _type_name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else re.sub(r"\btyping\.", "", repr(kind))


def _doc(obj: Any) -> str:
    """A docstring as Markdown: reStructuredText roles (``:class:`~a.B` ``) become code spans."""
    text = inspect.getdoc(obj) or ""
    return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)

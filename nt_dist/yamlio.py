"""The one way nt_dist reads YAML: recipes, pipeline files, run folders' recorded recipes.

Hand-written because PyYAML's ``safe_load`` has no limits a file given on the command line
needs: it reads a FIFO or ``/dev/zero`` until it blocks or runs out of memory, it lets the
second of two equal keys silently win, and it expands aliases without bound, so ten levels of
nine aliases ("billion laughs", 700 bytes) become 10⁹ values as soon as anything walks the tree.

The rules, each refused in one line naming the file (a :class:`~nt_dist.errors.UserError`):

* only a regular file is opened (checked with ``os.stat`` before opening, and again on the
  open descriptor), of at most :data:`MAX_BYTES`;
* UTF-8 text, one YAML document;
* **aliases add at most** :data:`MAX_ALIAS_VALUES` **values**: counted on the composed node
  graph (where an alias is one shared node, nothing expanded), before anything is constructed;
  an alias inside its own anchor (an endless value) is refused. Aliases stay allowed because
  ``yaml.safe_dump`` writes them for any object a script puts in two places (``&id001``);
* **no key twice** in one mapping: the message gives the dotted key and both line numbers
  (keys a merge ``<<: *base`` brings in may be overridden, as YAML means them to be).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nt_dist.errors import UserError

MAX_BYTES = 1 << 20  # 1 MiB: the largest recipe shipped is a few KiB
MAX_ALIAS_VALUES = 10_000  # values aliases may add beyond those written out
_MERGE_TAG = "tag:yaml.org,2002:merge"
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class AliasLimit(yaml.YAMLError):
    """Aliases that expand too far, or into themselves; ``line`` (1-based) is an alias's."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


class DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping; ``key`` is its dotted path, ``lines`` 1-based."""

    def __init__(self, key: str, first: int, second: int) -> None:
        lines = f"both on line {first}" if first == second else f"lines {first} and {second}"
        super().__init__(f"{key} is given twice ({lines})")
        self.key, self.lines = key, (first, second)


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [child for pair in node.value for child in pair]
    return list(node.value) if isinstance(node, SequenceNode) else []


class _Loader(yaml.SafeLoader):
    """SafeLoader that counts what aliases add before constructing, and refuses duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases: dict[int, tuple[str, int]] = {}  # id(anchored node) -> its first alias, line
        self._paths: dict[int, str] = {}  # id(mapping node) -> its dotted path ("" at the top)

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        alias = self.peek_event() if self.check_event(yaml.AliasEvent) else None
        node = super().compose_node(parent, index)
        if alias is not None:
            self._aliases.setdefault(id(node), (alias.anchor, alias.start_mark.line + 1))
        return node

    def construct_document(self, node: Node) -> Any:
        if self._aliases:
            self._check_expansion(node)
        todo: list[tuple[Node, str]] = [(node, "")]
        seen: set[int] = set()
        while todo:  # each node once: an aliased one keeps the path of its anchor
            current, path = todo.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            if isinstance(current, MappingNode):
                self._paths[id(current)] = path
                todo.extend((value, _join(path, key.value if isinstance(key, ScalarNode) else "?"))
                            for key, value in current.value)
            elif isinstance(current, SequenceNode):
                todo.extend((value, _join(path, str(i))) for i, value in enumerate(current.value))
        return super().construct_document(node)

    def _check_expansion(self, root: Node) -> None:
        """Values once every alias is expanded, counted without expanding (each node once)."""
        size: dict[int, int] = {}
        open_nodes: set[int] = set()  # on the path from the root: met again, it contains itself
        todo: list[tuple[Node, bool]] = [(root, False)]
        while todo:
            node, finished = todo.pop()
            if finished:
                size[id(node)] = 1 + sum(size[id(child)] for child in _children(node))
                open_nodes.discard(id(node))
            elif id(node) in open_nodes:
                anchor, line = self._aliases.get(id(node), ("?", node.start_mark.line + 1))
                raise AliasLimit(f"the YAML alias *{anchor} lies inside its own anchor &{anchor}", line)
            elif id(node) not in size:
                open_nodes.add(id(node))
                todo.append((node, True))
                todo.extend((child, False) for child in _children(node) if id(child) not in size)
        added = size[id(root)] - len(size)
        if added > MAX_ALIAS_VALUES:
            anchor, line = min(self._aliases.values(), key=lambda alias: alias[1])
            raise AliasLimit(f"YAML aliases (*{anchor}, ...) would add {added} values; at most "
                             f"{MAX_ALIAS_VALUES} may come from aliases", line)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # a non-scalar key is PyYAML's own error ("found unhashable key")
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKey(_join(self._paths.get(id(node), ""), str(key)), seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that raises :class:`AliasLimit` / :class:`DuplicateKey` (both
    ``yaml.YAMLError``) instead of expanding aliases without bound or letting a repeated key win."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_yaml(text: str, source: str) -> Any:
    """The YAML ``text`` as Python values; any refusal is a UserError naming ``source``."""
    try:
        return safe_load(text)
    except (AliasLimit, DuplicateKey) as exc:
        raise UserError(f"{source}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{source}: unreadable YAML{where}: {exc.problem or 'invalid YAML'}") from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (a NUL, an escape)
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise UserError(f"{source}: unreadable YAML: special character U+{char:04X} at character "
                        f"{exc.position + 1}") from None
    except yaml.YAMLError:
        raise UserError(f"{source}: unreadable YAML: invalid YAML") from None
    except RecursionError:
        raise UserError(f"{source}: unreadable YAML: nested too deeply") from None


def read_yaml_file(path: str | os.PathLike[str], what: str = "recipe") -> tuple[Any, str]:
    """The YAML tree of the file at ``path`` and its text. ``what`` names it in errors
    (``recipe``: "recipe file not found", "... a recipe is a YAML file")."""
    path = Path(path)
    noun = _noun(what)
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise UserError(f"{path}: is a folder, not a {noun}")
        _check_regular(path, info, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO swapped in since: no wait
        try:
            _check_regular(path, os.fstat(fd), what)
            with os.fdopen(fd, "rb", closefd=False) as handle:
                data = handle.read(MAX_BYTES + 1)  # a file growing past the limit since: read no further
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise UserError(f"{path}: {noun} not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"{path}: more than {MAX_BYTES} bytes; a {noun} is at most 1 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); a {what} is a YAML file") from None
    return parse_yaml(text, str(path)), text


def _check_regular(path: Path, info: os.stat_result, what: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "an unknown kind of file")
        raise UserError(f"{path}: not a regular file ({kind}); a {what} is a YAML file")
    if info.st_size > MAX_BYTES:
        raise UserError(f"{path}: {info.st_size} bytes; a {_noun(what)} is at most 1 MiB")


def _noun(what: str) -> str:
    """``recipe`` -> ``recipe file``; ``pipeline file`` stays as it is."""
    return what if what.endswith("file") else f"{what} file"

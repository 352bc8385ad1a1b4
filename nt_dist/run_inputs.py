"""What a run learned against: the bytes of its frozen network, recorded beside the run.

A student distilled from a teacher, or a nasty teacher trained against an adversary, is a
function of that model's weights, which the recipe names only by path. When a run starts,
``inputs.json`` in its folder records the sha256 of each frozen model file it reads
(``distill.teacher_checkpoint``, ``nasty.adversary_checkpoint``: whatever the objective's
:class:`~nt_dist.objectives.registry.FrozenRole` names). A folder whose recorded input no longer
matches the file at that path holds the results of another model: :mod:`nt_dist.rundir` calls
it *stale* and refuses to resume or report it (``run.stale: refuse``, one line) or moves it
aside and starts over (``run.stale: replace``, what pipeline stages use).

Hashing reads the file once per process and (path, size, mtime, inode): a ResNet-18 export
(45 MB) takes about 0.1 s on a 2-core CPU. The data set's files are not hashed here: a changed
data set is the user's to name (``data.root``), and its MLflow input digest records it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nt_dist.fileio import atomic_write_text, file_sha256

if TYPE_CHECKING:
    from nt_dist.config import Recipe

INPUTS_FILE = "inputs.json"


def current(recipe: Recipe) -> dict[str, dict[str, str]]:
    """``{recipe key: {path, sha256}}`` of the frozen model files the recipe reads now. A file
    that does not exist yet is left out (the frozen-network loader reports it in one line)."""
    from nt_dist.checkpoint import resolve_model_file
    from nt_dist.errors import UserError
    from nt_dist.objectives import objective_for

    role = objective_for(recipe).frozen
    if role is None or not role.checkpoint(recipe):
        return {}
    try:
        path = resolve_model_file(role.checkpoint(recipe), role.checkpoint_key)
    except UserError:
        return {}
    return {role.checkpoint_key: {"path": str(path.resolve()), "sha256": file_sha256(path)}}


def recorded(folder: Path) -> dict[str, dict[str, str]] | None:
    """What ``folder``'s run recorded when it started; None for a run from before this record
    (or an unreadable one: then nothing can be said, and nothing is refused)."""
    try:
        tree = json.loads((folder / INPUTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return tree if isinstance(tree, dict) else None


def changes(before: dict[str, Any] | None, now: dict[str, dict[str, str]]) -> list[str]:
    """One phrase per frozen model whose bytes differ from what the run was trained against."""
    if before is None:
        return []
    found = []
    for key, entry in now.items():
        old = before.get(key)
        if isinstance(old, dict) and old.get("sha256") and old.get("sha256") != entry["sha256"]:
            found.append(f"{key} {entry['path']} changed since it was trained "
                         f"(sha256 {str(old['sha256'])[:12]} then, {entry['sha256'][:12]} now)")
    return found


def record(folder: Path, now: dict[str, dict[str, str]]) -> None:
    atomic_write_text(folder / INPUTS_FILE, json.dumps(now, indent=1, sort_keys=True) + "\n")

"""One folder, one run: a run folder knows its recipe, and only one process trains in it.

``run.output_dir`` holds ``resolved_recipe.yaml`` from the moment a run starts. The same
command again resumes the run (or, once it finished, says so and where its results are); a
recipe that differs in a key that shapes the result is refused in one line naming the keys,
so runs are never silently mixed. ``run.resume: never`` moves the old folder aside (renamed
``<folder>.old-<time>``, never deleted) and starts over.

A run is also a function of the frozen network it learns against (a student's teacher, a
nasty teacher's adversary), which a recipe names only by path: ``inputs.json`` records that
file's sha256 when the run starts (:mod:`nt_dist.run_inputs`). If the file has changed since,
the folder is *stale*: ``run.stale: refuse`` (the default) ends in one line naming the file
and both digests; ``run.stale: replace`` (what pipeline stages use) moves it aside and trains
again, so a retrained teacher never leaves students of the old one standing.

Keys a resumed run may change (they do not alter what was already trained, and the resumed
run uses their new values): ``run.name``, ``run.output_dir`` (a moved folder), ``run.resume``,
``run.stale``, ``run.progress``, ``run.max_steps``, ``run.checkpoint_every_steps``, ``run.keep_last``,
``data.num_workers``, ``data.eval_batch_size``, every ``tracking.*`` key, and ``run.epochs``
to extend (or shorten, down to the epochs already trained) a run whose ``optim.schedule`` is
``constant`` or ``multistep`` — a cosine schedule spans ``run.epochs``, so changing it would
bend the curve already trained.

A lock (``fcntl.flock`` on ``.nt-dist.lock``) is held by the main process for the run's life;
the kernel releases it when the process dies, so a killed run never leaves the folder locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nt_dist import run_inputs
from nt_dist.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    checkpoint_dirs,
    parse_state,
    remove_stale_temporaries,
)
from nt_dist.config import Recipe, flatten, recipe_from_dict, recipe_to_dict
from nt_dist.errors import UserError, warn
from nt_dist.fileio import atomic_write_text
from nt_dist.preflight import check_output_dir
from nt_dist.yamlio import read_yaml_file

RECIPE_FILE = "resolved_recipe.yaml"
RESULTS_FILE = "metrics.json"
LOG_FILE = "metrics.jsonl"
LOCK_FILE = ".nt-dist.lock"
MUTABLE = frozenset({"run.name", "run.description", "run.output_dir", "run.resume", "run.stale", "run.progress",
                     "run.max_steps", "run.checkpoint_every_steps", "run.keep_last", "data.num_workers", "data.eval_batch_size",
                     "data.cache_dir"})
EXTENSIBLE_SCHEDULES = ("constant", "multistep")


@dataclass(frozen=True)
class FolderState:
    """What ``run.output_dir`` holds for this recipe: ``fresh`` (nothing to continue),
    ``replace`` (files to move aside first: ``resume: never``, a run of another recipe that
    died before its first checkpoint, or a stale run under ``run.stale: replace``: one whose
    frozen network changed since it started, see :mod:`nt_dist.run_inputs`), ``resume``
    (checkpoints of the same run) or ``finished`` (``results`` is its metrics.json)."""

    kind: str
    results: dict[str, Any] | None = None
    stale: str = ""  # ``replace`` because a frozen network changed: which, and how


def folder_state(recipe: Recipe, source: str) -> FolderState:
    """Read-only: what the folder holds, or a UserError when it belongs to another recipe."""
    folder = Path(recipe.run.output_dir)
    if not folder.is_dir():
        return FolderState("fresh")
    if recipe.run.resume == "never":
        return FolderState("replace" if _holds_files(folder) else "fresh")
    checkpoints = checkpoint_dirs(folder)
    has_work = bool(checkpoints) or (folder / RESULTS_FILE).is_file() or (folder / MODEL_FILE).is_file()
    old = _recorded_recipe(folder)
    if old is None:
        if has_work:
            raise UserError(f"run.output_dir: {folder} holds checkpoints or results but no readable {RECIPE_FILE}, "
                            f"so its recipe is unknown; {_WAYS_OUT}")
        return FolderState("replace" if _holds_files(folder) else "fresh")
    differ = differing_keys(old, recipe)
    if differ:
        if not has_work:  # a run that died before its first checkpoint: nothing worth keeping in place
            return FolderState("replace")
        raise UserError(f"run.output_dir: {folder} holds a run of another recipe ({_describe(differ)}); {_WAYS_OUT}")
    stale = run_inputs.changes(run_inputs.recorded(folder), run_inputs.current(recipe)) if has_work else []
    if stale:
        if recipe.run.stale == "replace":
            return FolderState("replace", stale="; ".join(stale))
        raise UserError(f"run.output_dir: {folder} is stale: {'; '.join(stale)}, so resuming or keeping it would "
                        f"mix two models; run.stale=replace (or run.resume=never) moves it aside and starts over")
    results = _read_results(folder)
    trained = _epochs_trained(checkpoints, results, old)
    if trained is not None and recipe.run.epochs < trained:
        raise UserError(f"{source}: run.epochs: {recipe.run.epochs}, but {folder} has already trained {trained} "
                        f"epochs; {_WAYS_OUT}")
    if results is not None:
        target = (results.get("epochs", old.run.epochs), results.get("max_steps", old.run.max_steps))
        if target == (recipe.run.epochs, recipe.run.max_steps):
            return FolderState("finished", results)
        if not checkpoints:
            raise UserError(f"run.output_dir: {folder} finished {target[0]} epochs and keeps no checkpoint to "
                            f"continue from; {_WAYS_OUT}")
    return FolderState("resume" if checkpoints else "fresh")


_WAYS_OUT = "use another run.output_dir, or run.resume=never to move the old run aside and start over"


def differing_keys(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for each key that may not change on resume."""
    before, after = flatten(recipe_to_dict(old)), flatten(recipe_to_dict(new))
    extensible = old.optim.schedule in EXTENSIBLE_SCHEDULES and new.optim.schedule in EXTENSIBLE_SCHEDULES
    differ = []
    for key in sorted(before.keys() | after.keys()):
        if key in MUTABLE or key.startswith("tracking.") or (key == "run.epochs" and extensible):
            continue
        if before.get(key) != after.get(key):
            differ.append((key, before.get(key), after.get(key)))
    return differ


def _describe(differ: list[tuple[str, Any, Any]]) -> str:
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    shown = [f"{key}: {short(a)} -> {short(b)}" for key, a, b in differ[:4]]
    if any(key == "run.epochs" for key, _, _ in differ):
        shown.append("run.epochs changes only with a constant or multistep optim.schedule")
    more = f", and {len(differ) - 4} more" if len(differ) > 4 else ""
    return ", ".join(shown) + more


def _recorded_recipe(folder: Path) -> Recipe | None:
    path = folder / RECIPE_FILE
    try:
        tree, _ = read_yaml_file(path, "recipe")
        return recipe_from_dict(tree, source=str(path)) if isinstance(tree, dict) else None
    except UserError:  # unreadable, not a file, not YAML, not a valid recipe
        return None


def _read_results(folder: Path) -> dict[str, Any] | None:
    try:
        results = json.loads((folder / RESULTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and isinstance(results.get("final"), dict) else None


def _epochs_trained(checkpoints: list[Path], results: dict[str, Any] | None, old: Recipe) -> int | None:
    """Whole epochs behind the newest checkpoint (or the finished run), if that can be read."""
    for directory in checkpoints[:1]:
        try:
            return parse_state(json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))).epoch
        except (OSError, ValueError, TypeError):
            return None
    if results is not None:
        return int(results.get("epochs", old.run.epochs))
    return None


# ----------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.nt-dist.lock`` that records the holder's pid."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.created = False  # the folder did not exist before this lock
        self._fd: int | None = None

    def acquire(self) -> None:
        self.created = not self.folder.exists()
        _make_folder(self.folder)
        path = self.folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"run.output_dir: {self.folder}: cannot write here ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"run.output_dir: {self.folder} is in use by another nt-dist run (pid {holder}); "
                            "wait for it to end, or use another run.output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def abandon(self) -> None:
        """Release, and remove the folder if this lock created it (a run that failed before its
        first step leaves nothing behind)."""
        if self.created and self._fd is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.release()


def _make_folder(folder: Path) -> None:
    check_output_dir(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"run.output_dir: {folder}: cannot create it ({exc.strerror})") from None


def claim(recipe: Recipe, source: str) -> tuple[RunLock, FolderState]:
    """Lock the run folder for this process and make it ready (main process only): check the
    recipe again under the lock, move an old run aside (``replace``), clear temporary files of
    dead writers, and record the recipe. Returns the held lock and the folder's state."""
    folder = Path(recipe.run.output_dir)
    lock = RunLock(folder)
    lock.acquire()
    try:
        state = folder_state(recipe, source)
        if state.kind == "finished":
            raise UserError(f"run.output_dir: {folder} was finished by another process meanwhile")
        if state.kind == "replace":
            moved = move_aside(folder)
            why = f" (stale: {state.stale})" if state.stale else ""
            warn(f"the previous run in {folder} was moved to {moved}{why}")
            lock.release()
            lock = RunLock(folder)
            lock.acquire()
        remove_stale_temporaries(folder)
        atomic_write_text(folder / RECIPE_FILE, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        if state.kind != "resume" or run_inputs.recorded(folder) is None:  # what this run learns against
            run_inputs.record(folder, run_inputs.current(recipe))
    except BaseException:
        lock.release()
        raise
    return lock, state


def _holds_files(folder: Path) -> bool:
    return any(path.name != LOCK_FILE for path in folder.iterdir())


def move_aside(folder: Path) -> Path:
    """Rename ``folder`` to ``<folder>.old-<YYYYmmdd-HHMMSS>`` (a counter added if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
    os.replace(folder, target)
    folder.mkdir()
    return target


def trim_log(folder: Path, global_step: int, mid_epoch: bool = False) -> None:
    """Drop the ``metrics.jsonl`` records of steps after ``global_step``: a run resumed from a
    checkpoint logs those epochs again, and the log keeps one line per epoch. ``mid_epoch``:
    the checkpoint is inside an epoch (a ``run.max_steps`` stop logged that partial epoch at
    ``global_step``), so its record goes too; the resumed run logs the whole epoch."""
    path = folder / LOG_FILE
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            step = 0
        if isinstance(step, int) and (step > global_step or (mid_epoch and step == global_step)):
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))


"""Checkpoints: atomic training state (accelerate), model-only export, safe loading.

Layout of a run folder (``run.output_dir``)::

    resolved_recipe.yaml     the recipe as validated, every default filled in
    model.safetensors        model-only export: weights + metadata (architecture, classes, run id)
    metrics.json             final evaluation (written last: its presence means "complete")
    metrics.jsonl            one JSON line per logged event (ffcv-imagenet style)
    checkpoints/step_000001234/   accelerate state + trainer_state.json, renamed into place (any other
                             folder there is not ours: skipped, named in a warning)
    logit_cache.safetensors  the frozen network's cached logits (nasty/distill.cache_logits), keyed
                             by what they depend on; saved with epoch-end and preemption checkpoints

Nothing here unpickles arbitrary objects: models are safetensors; accelerate loads optimizer,
scheduler and RNG states with ``torch.load(weights_only=True)``; our own counters are JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nt_dist.errors import UserError, warn
from nt_dist.fileio import apply_umask, atomic_save_tensors, atomic_write_text, fsync_dir

MODEL_FILE = "model.safetensors"
CACHE_FILE = "logit_cache.safetensors"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
FORMAT = "nt_dist.model/1"


@dataclass
class TrainState:
    """Counters that, with the accelerate state, make a run resumable at any step boundary.

    The ``epoch_*`` fields let an epoch resumed mid-way log what the uninterrupted run logs:
    the means of its per-step metrics over all its steps, and the learning rate of its first
    step. A state file written before they existed reads with their defaults, so a mid-epoch
    checkpoint of it makes that epoch :attr:`partial_epoch`.
    """

    epoch: int = 0  # epoch in progress (0-based)
    step_in_epoch: int = 0  # optimizer steps already taken in ``epoch``
    global_step: int = 0
    mlflow_run_id: str = ""
    # per-step metric sums over the epoch's steps so far (float32 values, mean over ranks)
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_steps: int = 0  # steps behind epoch_sums: fewer than step_in_epoch when some were not summed
    epoch_lr: float | None = None  # learning rate of the epoch's first step; None before it

    @property
    def partial_epoch(self) -> bool:
        """Steps of this epoch were trained but not summed (resumed from an older checkpoint)."""
        return self.epoch_steps < self.step_in_epoch

    def lr_of_epoch(self, current: float) -> float:
        """The learning rate to log for the epoch: that of its first step, recorded now (``current``)
        if this epoch has none yet (its start, or a resume from an older checkpoint)."""
        if self.epoch_lr is None:
            self.epoch_lr = current
        return self.epoch_lr

    def next_epoch(self) -> None:
        """The epoch is done: the next one starts with nothing summed."""
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.epoch_sums, self.epoch_steps, self.epoch_lr = {}, 0, None


class EpochTally:
    """The running sums of an epoch's per-step metrics, kept as device tensors (no host sync
    per step) and seeded from the checkpointed state, so a resumed epoch sums on from where the
    interrupted one was: float32 values restored exactly, the same additions in the same order."""

    def __init__(self, state: TrainState, device: torch.device) -> None:
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in state.epoch_sums.items()}
        self.steps = state.epoch_steps

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v.float() if k in self.sums else v.float()
        self.steps += 1

    def means(self, accelerator: Any, state: TrainState) -> dict[str, float]:
        """``train_<metric>``: the epoch's means over the steps summed, averaged over ranks (a
        collective); ``resumed: True`` when steps of the epoch are missing from the sums."""
        means: dict[str, float] = {
            f"train_{k}": float(accelerator.reduce((v / max(1, self.steps)).reshape(1), reduction="mean").item())
            for k, v in self.sums.items()}
        if self.steps < state.step_in_epoch:
            means["resumed"] = True
        return means

    def store(self, accelerator: Any, state: TrainState) -> None:
        """Copy the sums into ``state`` for a checkpoint (a collective: ranks differ, the state
        file is one, so it keeps their mean; the epoch's mean over ranks is unchanged)."""
        state.epoch_sums = {k: float(accelerator.reduce(v.reshape(1), reduction="mean").item())
                            for k, v in self.sums.items()}  # the same order on every rank: the objective's
        state.epoch_steps = self.steps


# ----------------------------------------------------------------------------- model export


def export_model(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Model-only export as safetensors (loadable without pickle), written atomically; fp32."""
    # floating-point weights are stored as fp32 whatever the training precision (a DeepSpeed
    # bf16 engine hands out bf16 weights): exact, and what every consumer expects
    tensors = {k: (v.float() if v.is_floating_point() else v).detach().to("cpu").contiguous()
               for k, v in state_dict.items()}
    atomic_save_tensors(tensors, path, {"format": FORMAT, **{k: str(v) for k, v in metadata.items()}})


def resolve_model_file(path: str, key: str) -> Path:
    """``path`` is a ``model.safetensors`` file or the run folder holding one."""
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / MODEL_FILE
    if not candidate.is_file():
        raise UserError(f"{key}: {candidate} not found (expected a model.safetensors written by nt-dist, "
                        "or the run folder holding it)")
    return candidate


def read_model_file(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an exported model. Pickles are refused unless they hold only
    tensors (``torch.load(weights_only=True)``), so no file can run code on load."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as safetensors_error:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure here is "not a model file"
            if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                raise UserError(f"{key}: {path}: refusing to unpickle: the file holds objects that "
                                "would run code on load; export it as safetensors") from None
            raise UserError(f"{key}: {path}: not a readable model file ({safetensors_error})") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise UserError(f"{key}: {path}: not a state dict of tensors") from None
        return obj, {}


def read_model_metadata(path: Path, key: str) -> dict[str, str]:
    """The metadata of an exported model without reading its tensors (a safetensors header);
    any other file goes through :func:`read_model_file` and its checks."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return read_model_file(path, key)[1]


def load_frozen_model(
    architecture: str,
    checkpoint: str,
    num_classes: int,
    key: str,
    create: Callable[..., torch.nn.Module],
    hint: str = "",
) -> tuple[torch.nn.Module, dict[str, str]]:
    """Build the frozen adversary/teacher named in a recipe and load its exported weights.

    ``architecture`` empty means the one recorded in the file. A mismatch in architecture or
    class count is a one-line error naming ``key`` (e.g. ``nasty.adversary_checkpoint``);
    ``hint`` ends the error of a file that records no architecture (where a recipe can name
    it, the recipe's key: ``"; name it in the recipe (nasty.adversary)"``).
    """
    path = resolve_model_file(checkpoint, key)
    tensors, meta = read_model_file(path, key)
    recorded = meta.get("architecture", "")
    name = architecture or recorded
    if not name:
        raise UserError(f"{key}: {path} records no architecture (nt-dist train's exports do){hint}")
    if architecture and recorded and architecture != recorded:
        raise UserError(f"{key}: {path} holds a {recorded!r} but the recipe asks for {architecture!r}")
    if meta.get("num_classes") and not str(meta["num_classes"]).isdigit():
        raise UserError(f"{key}: {path}: corrupt metadata: num_classes is {meta['num_classes']!r}, not a count")
    if meta.get("num_classes") and int(meta["num_classes"]) != num_classes:
        raise UserError(f"{key}: {path} has {meta['num_classes']} classes but the data set has {num_classes}")
    options = recorded_options(meta, path, key)  # the network the weights were trained as (model.blurpool, ...)
    model = create(name, num_classes, **options)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise UserError(f"{key}: {path} does not fit {name!r} with {num_classes} classes: "
                        f"{first[0].strip()}") from None
    model.eval().requires_grad_(False)
    return model, meta


def recorded_options(meta: dict[str, str], path: Path, key: str) -> dict[str, Any]:
    """The model options an export records (``model_options``: the recipe's ``model.blurpool``
    and ``model.timm_kwargs`` where they were set), as keyword arguments of
    :func:`nt_dist.models.build_model`."""
    text = meta.get("model_options", "")
    if not text:
        return {}
    from nt_dist.models import OPTIONS

    try:
        options = json.loads(text)
    except ValueError:
        options = None
    if not isinstance(options, dict) or set(options) - set(OPTIONS):
        raise UserError(f"{key}: {path}: corrupt metadata: model_options is {text!r}")
    return options


# ----------------------------------------------------------------------------- training state


CHECKPOINT_NAME = re.compile(r"step_([0-9]+)")  # ASCII digits: int() would also read "٣", "1_0" or " 5"
_NAMED: set[Path] = set()  # stray folders already warned about by this process


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first (temporary folders are never listed).

    Any other folder in ``checkpoints/`` (a backup copy ``step_5.bak``, a user's ``notes/``) is
    not ours to read or prune: it is skipped with a warning naming it, once per process (the
    folder is listed at every check and every checkpoint), and only on the launcher's rank 0."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
        elif path not in _NAMED:
            _NAMED.add(path)
            if os.environ.get("RANK", "0") == "0":  # as ranks.launched() reads it (ranks imports this module)
                warn(f"ignoring {path}: not a checkpoint folder (those are named step_<number>)")
    return [path for _, path in sorted(found, reverse=True)]


def save_training_state(accelerator: Any, output_dir: Path, state: TrainState, keep_last: int,
                        tmp_tag: str = "") -> Path:
    """Write the whole training state for ``state.global_step`` and rename it into place.

    Every process writes its part (RNG states; shards under DeepSpeed) into one temporary
    folder; after a barrier the main process writes the counters last, renames the folder to
    ``step_<n>`` (atomic on POSIX) and prunes all but the newest ``keep_last``. ``tmp_tag`` (the
    same on every rank, unique per run process: the main process's pid) keeps temporary names apart. A write that fails
    (no space left) removes its temporary folder and leaves the older checkpoints as they were.
    """
    root = output_dir / CHECKPOINTS
    final = root / f"step_{state.global_step:09d}"
    tmp = root / f"{TMP_PREFIX}step_{state.global_step:09d}{'-' + tmp_tag if tmp_tag else ''}"
    try:
        return _save_into(accelerator, output_dir, state, keep_last, root, tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


TMP_PREFIX = ".tmp-"


def remove_stale_temporaries(output_dir: Path) -> None:
    """Temporary checkpoint folders and files left by a process that died mid-write (call it only
    while holding the run folder's lock: then no live process owns them)."""
    for folder in (output_dir, output_dir / CHECKPOINTS):
        if folder.is_dir():
            for path in folder.iterdir():
                if not (path.name.startswith(".") and ".tmp" in path.name):  # TMP_PREFIX and atomic writes' names
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _save_into(accelerator: Any, output_dir: Path, state: TrainState, keep_last: int, root: Path, tmp: Path,
               final: Path) -> Path:
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        apply_umask(tmp)  # safetensors wrote the weights 0600
        atomic_write_text(tmp / STATE_FILE, json.dumps(asdict(state), indent=1))
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in checkpoint_dirs(output_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator: Any, directory: Path) -> TrainState:
    """Restore model, optimizer, scheduler and RNG states from ``directory``; return counters."""
    state_file = directory / STATE_FILE
    try:
        state = parse_state(json.loads(state_file.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise CorruptCheckpoint(f"{state_file}: unreadable ({exc})") from None
    rng = directory / f"random_states_{accelerator.process_index}.pkl"
    if not rng.is_file():
        raise CorruptCheckpoint(f"{rng}: missing")
    try:
        accelerator.load_state(str(directory))
    except Exception as exc:  # noqa: BLE001 - any failure means this checkpoint is unusable
        raise CorruptCheckpoint(f"{directory}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return state


_COUNTS = ("epoch", "step_in_epoch", "global_step", "epoch_steps")


def parse_state(counters: Any) -> TrainState:
    """``trainer_state.json`` as a TrainState; a field of the wrong type or sign is a ValueError,
    an unknown field a TypeError. Fields it lacks take their defaults (older files)."""
    if not isinstance(counters, dict):
        raise ValueError(f"expected an object of counters, got {type(counters).__name__}")
    state = TrainState(**counters)
    for name in _COUNTS:
        value = getattr(state, name)
        if type(value) is not int or value < 0:
            raise ValueError(f"{name} is {value!r}, expected a count")
    if type(state.mlflow_run_id) is not str:
        raise ValueError(f"mlflow_run_id is {state.mlflow_run_id!r}, expected a string")
    if not isinstance(state.epoch_sums, dict) or not all(
            isinstance(k, str) and _is_number(v) for k, v in state.epoch_sums.items()):
        raise ValueError(f"epoch_sums is {state.epoch_sums!r}, expected an object of numbers")
    if state.epoch_steps > state.step_in_epoch:
        raise ValueError(f"epoch_steps is {state.epoch_steps}, more than the {state.step_in_epoch} steps taken")
    if state.epoch_lr is not None and not (_is_number(state.epoch_lr) and state.epoch_lr >= 0):
        raise ValueError(f"epoch_lr is {state.epoch_lr!r}, expected a learning rate")
    state.epoch_sums = {k: float(v) for k, v in state.epoch_sums.items()}
    state.epoch_lr = None if state.epoch_lr is None else float(state.epoch_lr)
    return state


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class CorruptCheckpoint(Exception):
    """A checkpoint folder that cannot be restored (truncated, edited, from another model)."""


def resume(accelerator: Any, output_dir: Path, resume_from: str) -> tuple[TrainState, Path] | None:
    """Restore the run per ``run.resume``: ``auto`` takes the newest checkpoint that loads
    (falling back to older ones with a warning), ``never`` none, anything else that folder.
    Returns the counters and the folder they came from."""
    if resume_from == "never":
        return None
    if resume_from != "auto":
        directory = Path(resume_from)
        if not (directory / STATE_FILE).is_file():
            raise UserError(f"run.resume: {directory} is not a checkpoint folder (no {STATE_FILE})")
        try:
            return load_training_state(accelerator, directory), directory
        except CorruptCheckpoint as exc:
            raise UserError(f"run.resume: {exc}") from None
    for directory in checkpoint_dirs(output_dir):
        try:
            return load_training_state(accelerator, directory), directory
        except CorruptCheckpoint as exc:
            warn(f"skipping unusable checkpoint: {exc}; trying an older one")
    return None

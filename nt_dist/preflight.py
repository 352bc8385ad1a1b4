"""Checks that need more than the schema, run before anything is trained.

``nt-dist check`` and ``nt-dist train`` both call :func:`validate`, so a recipe that ``check``
calls valid is not rejected by ``train`` for any reason short of reading the data and the
frozen networks' files: every network the recipe names exists and takes ``data.image_size``
(a forward pass on the meta device: shapes only, no memory, milliseconds), the run folder can
be written, and the tracking store can work.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nt_dist.config import Recipe
from nt_dist.errors import UserError


def validate(recipe: Recipe, source: str, *, frozen_files: bool = False) -> None:
    """``frozen_files``: the frozen network's model file must exist too (training: checked before
    any data is read; ``nt-dist check`` leaves it out, so a chain can be checked before it runs)."""
    check_networks(recipe, source)
    if frozen_files:
        check_frozen_file(recipe, source)
    check_output_dir(Path(recipe.run.output_dir))
    if recipe.tracking.enabled:
        check_tracking_uri(recipe)


def check_networks(recipe: Recipe, source: str) -> None:
    from nt_dist.data.resolution import eval_size
    from nt_dist.models import build_model, recipe_options
    from nt_dist.objectives import objective_for

    named = [("model.name", recipe.model.name)]
    frozen = objective_for(recipe).frozen
    if frozen is not None and frozen.architecture(recipe):
        named.append((frozen.architecture_key, frozen.architecture(recipe)))
    data = recipe.data
    # every resolution the network will see: the training one, the ramp's first (data.min_res), evaluation's
    sizes = sorted({data.image_size, data.min_res or data.image_size, eval_size(data)})
    for key, name in named:
        # the recipe's options go to its own network; a frozen one is built with those its file records
        options = recipe_options(recipe.model) if key == "model.name" else {}
        try:  # an unknown name or a refused option: build_model's one line, naming the recipe key
            with torch.device("meta"):
                model = build_model(name, recipe.model.num_classes or 10, f"{source}: {key}", **options)
        except NotImplementedError:  # a model that cannot be built on the meta device: checked at run time
            continue
        for size in sizes:
            try:
                with torch.no_grad():
                    model.eval()(torch.empty(2, 3, size, size, device="meta"))
            except NotImplementedError:
                break
            except (RuntimeError, ValueError) as exc:
                which = {data.image_size: "data.image_size", data.min_res: "data.min_res"}.get(size, "data.eval_image_size")
                raise UserError(f"{source}: {which}: {size} px does not fit {key} {name!r} "
                                f"({str(exc).splitlines()[0]})") from None


def check_frozen_file(recipe: Recipe, source: str) -> None:
    """The network the objective learns against (the nasty teacher's adversary, a student's
    teacher) must have been trained before this run starts: say so before any data is decoded."""
    from nt_dist.checkpoint import MODEL_FILE
    from nt_dist.objectives import objective_for

    frozen = objective_for(recipe).frozen
    if frozen is None or not frozen.checkpoint(recipe):
        return  # "required when run.role is ..." is said where the objective builds its step
    path = Path(frozen.checkpoint(recipe))
    model = path / MODEL_FILE if path.is_dir() or not path.suffix else path
    if not model.is_file():
        raise UserError(f"{source}: {frozen.checkpoint_key}: {model} not found: train the {frozen.kind} first "
                        f"(a run with run.output_dir={path}), or run the whole chain as a pipeline "
                        "(nt-dist pipeline, docs/pipelines.md)")


def nearest_existing(path: Path) -> Path:
    """``path`` itself, or the closest of its parents that exists (what a mkdir -p would write in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(folder: Path) -> None:
    check_folder(folder, "run.output_dir")


def check_folder(folder: Path, key: str) -> None:
    """The folder, or its nearest existing parent, must be a writable folder."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise UserError(f"{key}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f" (its parent {existing} is read-only)"
        raise UserError(f"{key}: {folder}: not writable{where}")


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database


def check_sqlite_file(db: Path, key: str) -> None:
    """A store file that is not SQLite (random bytes, another program's file) must be named here:
    MLflow reports it only as a store that never answers (training warns "not answering", retries
    until the end and waits at exit; ``nt-dist report`` prints SQLAlchemy's traceback). An empty
    file is a new database to SQLite, and a missing one is created."""
    try:
        with db.open("rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
    except OSError:  # missing, or unreadable: created by MLflow, or named by the access check
        return
    if head and head != SQLITE_HEADER:
        raise UserError(f"{key}: {db}: not an SQLite database (move it aside, and MLflow creates a new "
                        "store there)")


def check_tracking_uri(recipe: Recipe) -> None:
    """A store MLflow can open: a SQLite file in a writable folder, or a server address."""
    from nt_dist.tracking import tracking_uri

    uri = tracking_uri(recipe.tracking)
    key = "tracking.uri" if recipe.tracking.uri else ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
                                                       else "tracking.uri (default)")
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri == "sqlite:///":
            raise UserError(f"{key}: {uri}: expected sqlite:///PATH/TO/FILE.db")
        db = Path(uri.removeprefix("sqlite:///"))
        if db.exists() and (db.is_dir() or not os.access(db, os.R_OK | os.W_OK)):
            raise UserError(f"{key}: {db}: not a writable SQLite file")
        check_sqlite_file(db, key)
        target = nearest_existing(db.parent)
        # SQLite writes a journal beside the file, and mlartifacts/ goes there too
        if not target.is_dir() or not os.access(target, os.W_OK | os.X_OK):
            raise UserError(f"{key}: {uri}: the folder {target} is not writable; set tracking.uri to "
                            "a writable sqlite:///PATH, or tracking.enabled=false")
    elif scheme in ("http", "https", "databricks", "postgresql", "mysql", "mssql"):
        return
    elif scheme == "file" or not scheme or len(scheme) == 1:  # a path, or file:// (a Windows drive has one letter)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise UserError(f"{key}: {uri}: MLflow 3 refuses its file store (maintenance mode); use "
                            "sqlite:///PATH.db or a server address")
    else:
        raise UserError(f"{key}: {uri}: unsupported tracking store; expected sqlite:///PATH.db or "
                        "http(s)://HOST:PORT")

"""How a run reads in the MLflow UI: a short name, the role as a word, the frozen network it
learned from, the rounded score, and paths relative to the run folder.

The runs table gives the run name a column of about 32 characters beside the tag columns, so a
name says what tells the runs of one experiment apart and no more: seed, role, network, the
teacher it learned from, an attack other than KD, a defence, a sweep's values. nt_dist's
CIFAR-stem networks (``cifar_resnet18``, ...) go without their ``cifar_`` prefix there; the
``architecture``, ``teacher`` and ``adversary`` tags name them in full::

    s0 normal resnet18                 a normal teacher (run.role: teacher)
    s0 nasty resnet18                  a nasty teacher
    s0 baseline shufflenetv2           a student trained alone
    s0 shufflenetv2 ← nasty resnet18   a student, distilled from a nasty teacher
    s0 mlp dafl ← normal cnn+noise     an attack other than KD, through a defence
    s0 KD τ=4 α=0.9 ← nasty resnet18   a pipeline's student column that is not a network's name

A name the user chose is kept: ``tracking.run_name``, or a ``run.name`` of their own (a recipe's).
``run.name`` left at its default, or set by ``nt-dist pipeline`` (``<pipeline>/seed0/...``),
is nt_dist's own and gives way to the short name; the folder and the console keep ``run.name``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROLE_WORDS = {"teacher": "normal"}  # run.role -> its word in names and the role tag, beside "nasty"
DEFAULT_RUN_NAME = "run"  # RunConfig.name's default: no name of the user's
CHECKPOINT = "_checkpoint"  # lineage tags <kind>_checkpoint, <kind>_run_name, ... (kind: teacher, adversary)
# the compare page's default plot takes the first three params that differ, in code-point order, and
# the first metric the runs share: capitals sort before the recipe's keys, and test_top1 goes first
SUMMARY_PARAMS = ("Network", "Role", "Teacher")


def role_word(role: str) -> str:
    return ROLE_WORDS.get(role, role)


def short_network(name: str) -> str:
    return name.removeprefix("cifar_")


def frozen_kinds(tags: Mapping[str, str]) -> list[str]:
    """The frozen networks a run learned from (``teacher``, ``adversary``), by their lineage tags."""
    return [key.removesuffix(CHECKPOINT) for key in tags if key.endswith(CHECKPOINT)]


def frozen_network(tags: Mapping[str, str], kind: str) -> tuple[str, str]:
    """(role word, network) of the frozen network ``kind``: its role from its model file's
    metadata ("" when the file records none), its network from the lineage tags."""
    from nt_dist.checkpoint import read_model_metadata, resolve_model_file
    from nt_dist.errors import UserError

    try:
        path = resolve_model_file(tags[f"{kind}{CHECKPOINT}"], kind)
        role = read_model_metadata(path, kind).get("role", "")
    except (UserError, OSError):
        role = ""
    return role_word(role), tags.get(f"{kind}_architecture", "")


def label(role: str, network: str) -> str:
    return " ".join(part for part in (role, network) if part)


def chosen_by_user(given: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> bool:
    """``given`` (``tracking.run_name`` or ``run.name``) is the user's: set apart from run.name, or
    a run.name that is neither the default nor the one ``nt-dist pipeline`` made for a stage."""
    run_name = str(params.get("run.name", given))
    if given != run_name:
        return True
    managed = "stage" in tags and run_name.startswith(f"{tags.get('table', '')}/")
    return run_name != DEFAULT_RUN_NAME and not managed


def short_name(params: Mapping[str, Any], tags: Mapping[str, str], teacher: tuple[str, str] = ("", "")) -> str:
    """The run name of the module's table, from the params, the tags and the (role word,
    network) of the teacher it learned from (:func:`frozen_network`; none: not a student)."""
    seed, role = params.get("run.seed", 0), str(params.get("run.role", ""))
    network = short_network(tags.get("architecture", ""))
    if any(teacher):  # a student, by its teacher
        attack, defence = tags.get("attack", ""), tags.get("defence", "")
        student = f"{network}{f' {attack}' if attack not in ('', 'kd') else ''}"
        column = tags.get("column", "") if "stage" in tags else ""  # a pipeline's student column
        if column and column.lower() not in (network.lower(), tags.get("architecture", "").lower()):
            student = column  # what tells the columns apart (an audit's "KD τ=4 α=0.9", "DAFL")
        name = (f"s{seed} {student} ← {label(teacher[0], short_network(teacher[1]))}"
                f"{f'+{defence}' if defence not in ('', 'none') else ''}")
    else:
        name = f"s{seed} {role_word(role)} {network}"
    sweep = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in tags.items() if key.startswith("sweep.")]
    return " ".join([name, *sweep])


def present(given: str, params: Mapping[str, Any], tags: Mapping[str, str],
            run_dir: Path) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The run's MLflow name, tags and params as the UI shows them: the role tag as a word
    (``normal``, never ``teacher``), a tag per frozen network (``teacher: nasty cifar_cnn``), the
    seed, checkpoint paths relative to ``run_dir`` (in the description too), the short name
    unless the user chose one, and :data:`SUMMARY_PARAMS`."""
    tags = dict(tags)
    if "role" in tags:
        tags["role"] = role_word(tags["role"])
    tags.setdefault("seed", str(params.get("run.seed", 0)))
    folder = Path(run_dir).resolve()
    note = tags.get("mlflow.note.content", "")
    frozen = {kind: frozen_network(tags, kind) for kind in frozen_kinds(tags)}
    for kind, (role, network) in frozen.items():
        tags[kind] = label(role, network)
        absolute = tags[f"{kind}{CHECKPOINT}"]
        relative = os.path.relpath(Path(absolute).resolve(), folder)
        tags[f"{kind}{CHECKPOINT}"] = relative
        note = note.replace(f"`{absolute}`", f"`{relative}`")
    if note:
        tags["mlflow.note.content"] = note
    name = given if chosen_by_user(given, params, tags) else short_name(params, tags, frozen.get("teacher", ("", "")))
    tags["mlflow.runName"] = name
    summary = {"Network": tags.get("architecture", ""), "Role": tags.get("role", ""),
               "Teacher": tags.get("teacher", "-")}
    return name, tags, {**summary, **params}


def mlflow_metrics(metrics: Mapping[str, float], kinds: list[str]) -> dict[str, float]:
    """What MLflow is sent of an epoch's metrics: ``test_top1`` first (the first metric a run logs
    is the compare page's default axis), and the KL named after what it is measured against
    (``train_kl_adversary`` of a nasty teacher, ``train_kl_teacher`` of a student): the same key
    is the same quantity in every run. ``metrics.jsonl`` keeps the training loop's keys."""
    renamed = {f"train_kl_{kinds[0]}" if key == "train_kl" and len(kinds) == 1 else key: float(value)
               for key, value in metrics.items()}
    return dict(sorted(renamed.items(), key=lambda item: item[0] != "test_top1"))


def top1_tag(metrics: Mapping[str, float]) -> dict[str, str]:
    """``top1``: test_top1 with two decimals, a column the runs table shows whole (a metric column
    shows ``95.8333…``)."""
    return {"top1": f"{float(metrics['test_top1']):.2f}"} if "test_top1" in metrics else {}


def lineage_names(client: Any, tags: dict[str, str]) -> None:
    """Each ``<kind>_run_name`` as MLflow names that run now (its short name), in the tags and the
    description's links; a run this store does not hold keeps the name its model file recorded."""
    for kind in frozen_kinds(tags):
        run_id, recorded = tags.get(f"{kind}_run_id", ""), tags.get(f"{kind}_run_name", "")
        if not run_id:
            continue
        try:
            name = client.get_run(run_id).info.run_name
        except Exception:  # noqa: BLE001 - another store's run, a server refusing: the recorded name stands
            continue
        if name and name != recorded:
            tags[f"{kind}_run_name"] = name
            if "mlflow.note.content" in tags:
                tags["mlflow.note.content"] = tags["mlflow.note.content"].replace(f"[{recorded}](", f"[{name}](")

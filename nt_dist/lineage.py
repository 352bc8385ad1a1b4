"""What a run is, by name, as MLflow shows it: the params its objective uses, its tags (role,
data set, architecture, the runs it learned from, the source commit) and its description (the
recipe's header comment, then a link to each run it learned from). :mod:`nt_dist.tracking`
delivers them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nt_dist import __version__
from nt_dist.config import Recipe, flatten, recipe_to_dict
from nt_dist.objectives import frozen_roles, objective_for

NOT_PARAMS = frozenset({"run.description"})  # the run's description (mlflow.note.content)


def run_params(recipe: Recipe) -> dict[str, Any]:
    """The flattened recipe sections the run's objective uses (its ``param_sections``): a
    teacher logs no ``nasty.*`` or ``distill.*``, a baseline student no ``distill.*`` (their
    defaults were never used); the rest stays in resolved_recipe.yaml."""
    tree = recipe_to_dict(recipe)
    used = flatten({section: tree[section] for section in objective_for(recipe).param_sections(recipe)})
    return {key: value for key, value in used.items() if key not in NOT_PARAMS}


def run_tags(recipe: Recipe, lineage: dict[str, str], source: str = "") -> dict[str, str]:
    """What a run is, by name: role, data set, architecture, the runs it was trained from,
    where its code came from, and its description (the recipe's header comment and lineage)."""
    tags = {"role": recipe.run.role, "dataset": recipe.data.name, "architecture": recipe.model.name,
            "nt_dist_version": __version__, "mlflow.runName": recipe.tracking.run_name or recipe.run.name,
            "mlflow.source.type": "LOCAL", "mlflow.source.name": source or "nt_dist",
            **source_tags(), **lineage, **recipe.tracking.tags}
    try:
        import getpass

        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        pass
    note = description(recipe, lineage)
    if note:
        tags["mlflow.note.content"] = note
    return tags


def description(recipe: Recipe, lineage: dict[str, str]) -> str:
    """``run.description`` (by default the recipe file's header comment), then one line per
    frozen network the run learned from, linking its run in the MLflow UI."""
    lines = [recipe.run.description] if recipe.run.description else []
    for kind, verb in ((role.kind, role.verb) for role in frozen_roles()):
        if f"{kind}_checkpoint" not in lineage:
            continue
        name = lineage.get(f"{kind}_run_name") or lineage.get(f"{kind}_run_id") or "an untracked run"
        experiment, run_id = lineage.get(f"{kind}_experiment", ""), lineage.get(f"{kind}_run_id", "")
        link = (f"[{name}](#/experiments/{lineage[f'{kind}_experiment_id']}/runs/{run_id})"
                if run_id and lineage.get(f"{kind}_experiment_id") else name)
        where = f" in experiment {experiment}" if experiment else ""
        lines.append(f"{verb}: {link}{where} ({lineage.get(f'{kind}_architecture', '?')}, "
                     f"`{lineage[f'{kind}_checkpoint']}`)")
    return "\n\n".join(lines)


def source_tags() -> dict[str, str]:
    """The git commit of the nt_dist code, when it runs from a checkout (``pip install -e``);
    ``source_git_dirty`` when tracked files differ from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return {}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    tags = {"mlflow.source.git.commit": commit}
    if dirty:
        tags["source_git_dirty"] = "true"
    return tags

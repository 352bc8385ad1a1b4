"""The recipe rules that span sections (one section's own bounds live on its dataclass in
:mod:`nt_dist.config`): schedules against ``run.epochs``, the data set and loader against what
:mod:`nt_dist.data.specs` declares, the resolution schedule, and each role's or attack's own
rules (``objective.check``). Called by :func:`nt_dist.config.recipe_from_dict` on every recipe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nt_dist.data.specs import DATASETS, LOADERS, full_resolution_problem, loaders_with, unknown_dataset
from nt_dist.errors import UserError

if TYPE_CHECKING:
    from nt_dist.config import Recipe


def check_recipe(recipe: Recipe, source: str) -> None:
    """The rules that span sections; a broken one is a one-line UserError naming ``source`` and the key."""
    from nt_dist.objectives import frozen_roles, objective_for

    objective_for(recipe).check(recipe, source)  # the role's or the attack's own rules
    if recipe.optim.schedule == "multistep" and not recipe.optim.milestones:
        raise UserError(f"{source}: optim.milestones: required when optim.schedule is multistep")
    if any(m <= 0 or m > recipe.run.epochs for m in recipe.optim.milestones):
        raise UserError(f"{source}: optim.milestones: each must lie in 1..run.epochs ({recipe.run.epochs})")
    if recipe.optim.warmup_epochs > recipe.run.epochs:
        raise UserError(f"{source}: optim.warmup_epochs: {recipe.optim.warmup_epochs} exceeds run.epochs "
                        f"({recipe.run.epochs})")
    # the data rules: what each data set and loader declares in nt_dist.data.specs
    if recipe.data.name not in DATASETS:
        raise UserError(f"{source}: {unknown_dataset(recipe.data.name)}")
    dataset, loader = DATASETS[recipe.data.name], LOADERS[recipe.data.loader]
    if recipe.data.augment_views and not loader.augment_views:
        raise UserError(f"{source}: data.augment_views: needs data.loader: {loaders_with('augment_views')} "
                        f"({loader.name} draws augmentations from {loader.rng})")
    for section in (role.section for role in frozen_roles() if role.cache_logits(recipe)):
        if not loader.logit_cache:
            raise UserError(f"{source}: {section}.cache_logits: needs data.loader: {loaders_with('logit_cache')}")
        if not recipe.data.augment_views and recipe.data.augment != "none":
            raise UserError(f"{source}: {section}.cache_logits: needs data.augment_views > 0 (or "
                            "data.augment: none); with a fresh augmentation every epoch no image repeats")
    if dataset.full_resolution and loader.name == "device" and recipe.data.augment == "rrc_flip":
        raise UserError(f"{source}: data.loader: device: {full_resolution_problem(recipe.data.name, recipe.data.image_size)}; "
                        f"use data.loader: ffcv (write the .beton files with: nt-dist data write-ffcv --dataset "
                        f"{recipe.data.name} --preset imagenet) or torch")
    if dataset.needs_root and loader.reads_root and not recipe.data.root:
        raise UserError(f"{source}: data.root: required for data set {recipe.data.name!r}")
    _check_resolution(recipe, source)


def _check_resolution(recipe: Recipe, source: str) -> None:
    """Progressive resizing (``data.min_res``) as ffcv-imagenet schedules it: random-resized crops,
    a ramp inside the run, and no frozen-logit cache (its logits would be of another resolution)."""
    from nt_dist.objectives import frozen_roles

    data = recipe.data
    if not data.min_res:
        return
    if data.min_res > data.image_size:
        raise UserError(f"{source}: data.min_res: {data.min_res} exceeds data.image_size ({data.image_size}), "
                        "the resolution the ramp ends at")
    if data.augment != "rrc_flip":
        raise UserError(f"{source}: data.min_res: progressive resizing needs data.augment: rrc_flip "
                        f"(got {data.augment!r})")
    if data.end_ramp < data.start_ramp:
        raise UserError(f"{source}: data.end_ramp: {data.end_ramp} is before data.start_ramp ({data.start_ramp})")
    if data.start_ramp >= recipe.run.epochs:
        raise UserError(f"{source}: data.start_ramp: {data.start_ramp} is not an epoch of this run "
                        f"(0..{recipe.run.epochs - 1}); the resolution would never grow")
    cached = [role.section for role in frozen_roles() if role.cache_logits(recipe)]
    if cached:
        raise UserError(f"{source}: {cached[0]}.cache_logits: not with progressive resizing (data.min_res): "
                        "the frozen network's logits change with the resolution")

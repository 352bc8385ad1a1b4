"""Networks by name: the Nasty-Teacher paper's CIFAR networks next to every timm backbone.

>>> from nt_dist.models import create_model
>>> teacher = create_model("cifar_resnet18", num_classes=10)   # ours (also in timm's registry)
>>> other = create_model("resnet18", num_classes=10)           # any timm name, random init

Our names (:func:`list_models`) are built by :mod:`nt_dist.models.cifar`; every other name goes to
``timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)``. A name that is
neither raises :class:`UnknownModelError` with a one-line message listing close matches.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

import timm
from torch import nn

from nt_dist.errors import UserError
from nt_dist.models.cifar import ENTRYPOINTS

if TYPE_CHECKING:
    from nt_dist.config import ModelConfig

__all__ = ["UnknownModelError", "build_model", "create_model", "list_models"]


class UnknownModelError(UserError, ValueError):
    """A model name that is neither one of ours nor one of timm's; the message is one line."""


def list_models() -> list[str]:
    """Our model names, in the order of the paper's tables; each is also registered in timm."""
    return list(ENTRYPOINTS)


def check_model_name(name: str) -> None:
    """Raise :class:`UnknownModelError` (with close matches) unless ``name`` is ours or timm's;
    nothing is built, so callers check a name before anything trains."""
    if name in ENTRYPOINTS or timm.is_model(name):
        return
    candidates = list(dict.fromkeys(list_models() + timm.list_models()))
    matches = difflib.get_close_matches(name, candidates, n=6)
    raise UnknownModelError(f"unknown model {name!r}; close matches: {', '.join(matches) if matches else '(none)'}")


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way classifier and random weights.

    ``kwargs`` go to our entrypoint (e.g. ``hidden=`` for ``mlp``) or to ``timm.create_model``
    (e.g. ``drop_rate=``). Nothing is downloaded: ``pretrained=True`` raises ``ValueError``.

    Raises:
        UnknownModelError: ``name`` is neither ours nor a timm model.
    """
    if name in ENTRYPOINTS:
        return ENTRYPOINTS[name](num_classes=num_classes, **kwargs)
    check_model_name(name)
    if kwargs.pop("pretrained", False):
        raise ValueError(
            f"pretrained weights cannot be downloaded here; build {name!r} with pretrained=False"
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


OPTIONS = ("blurpool", "timm_kwargs")  # build_model's keyword options: the recipe keys model.<option>


def recipe_options(cfg: ModelConfig) -> dict[str, Any]:
    """The :data:`OPTIONS` a recipe's ``model`` section sets (those not at their default), as
    keyword arguments of :func:`build_model`; what an export records as ``model_options``."""
    return {name: getattr(cfg, name) for name in OPTIONS if getattr(cfg, name)}


def build_recipe_model(cfg: ModelConfig, num_classes: int, source: str) -> nn.Module:
    """The network a recipe's ``model`` section names, with its options; errors name ``source``."""
    return build_model(cfg.name, num_classes, f"{source}: model.name", **recipe_options(cfg))


def model_options(blurpool: bool = False, timm_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments ``model.blurpool`` and ``model.timm_kwargs`` give
    :func:`create_model`: ``blurpool`` is timm's ``aa_layer=BlurPool2d`` (anti-aliased strided
    blocks where timm's model puts them; ffcv-imagenet's ``use_blurpool`` wraps every strided conv
    of 16+ input channels instead), ``timm_kwargs`` go as they are."""
    options = dict(timm_kwargs or {})
    if blurpool:
        from timm.layers import BlurPool2d

        options["aa_layer"] = BlurPool2d
    return options


def build_model(name: str, num_classes: int, key: str = "model.name", *, blurpool: bool = False,
                timm_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """:func:`create_model` with :func:`model_options`, its unknown-name error prefixed with the
    recipe ``key`` that named it; a model that refuses an option is one line naming the option."""
    options = model_options(blurpool, timm_kwargs)
    try:
        return create_model(name, num_classes=num_classes, **options)
    except UnknownModelError as exc:
        raise UserError(f"{key}: {exc}") from None
    except TypeError as exc:
        if not options:
            raise
        where = key.removesuffix("model.name") if key.endswith("model.name") else f"{key}: "  # the recipe file
        keys = " / ".join(k for k, on in (("model.blurpool", blurpool), ("model.timm_kwargs", bool(timm_kwargs))) if on)
        raise UserError(f"{where}{keys}: {name!r} does not take {', '.join(sorted(options))} ({exc})") from None

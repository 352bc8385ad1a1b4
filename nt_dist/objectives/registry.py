"""The objective registry: every role and attack, registered under the name a recipe uses.

An objective is what a run optimises. Roles are named by ``run.role`` (``teacher``,
``baseline``, ``nasty``); a student's objective is its attack, named by ``distill.method``
(``kd``, ``topk``, ``skeptical``, ``dafl``, ``deepinversion``). Each is one class in one file
of this package, registered with :func:`register`; everything that used to branch on a role or
a method reads the registry instead:

================================ ==========================================================
who                              what it reads
================================ ==========================================================
``config`` (recipe validation)   :func:`role_names`, :func:`attack_names`, :meth:`Objective.check`
``train`` (the loop)             :meth:`Objective.step`, :meth:`Objective.wrap_model`,
                                 :meth:`Objective.train_source`, :attr:`Objective.frozen`
``export``                       :meth:`Objective.export_state`
``frozen_network``               :attr:`Objective.frozen` (which section names the network)
``tracking``                     :meth:`Objective.param_sections`
``audit``                        :func:`attack_names` (``--attacks all``), :meth:`Objective.audit_columns`
================================ ==========================================================

Adding an attack is one new file: subclass :class:`Objective` (``role = "student"``,
``frozen = TEACHER``), decorate it with ``@register``, and import the module (built-ins are
imported by ``nt_dist/objectives/__init__.py``; a plugin imports its own module before use).
This module imports nothing of nt_dist but :mod:`nt_dist.errors`, so any module may read the
registry (``config`` does, lazily, when it validates a recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from nt_dist.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from nt_dist.config import Recipe

StepFn = Callable[..., "dict[str, Tensor]"]  # (model, images, labels, index=None, epoch=0) -> outputs

BASE_SECTIONS = ("run", "data", "model", "optim")  # every objective reads these


@dataclass(frozen=True)
class FrozenRole:
    """The frozen network an objective learns against, and the recipe section that names it:
    ``<section>.<kind>`` (architecture), ``<section>.<kind>_checkpoint``,
    ``<section>.<kind>_precision`` and ``<section>.cache_logits``."""

    kind: str  # adversary | teacher: also the prefix of its lineage tags (adversary_run_name, ...)
    section: str  # nasty | distill
    verb: str  # how a run's MLflow description introduces it
    released: bool  # reached through what it releases (defence.*), not its raw logits

    @property
    def checkpoint_key(self) -> str:
        return f"{self.section}.{self.kind}_checkpoint"

    @property
    def architecture_key(self) -> str:
        return f"{self.section}.{self.kind}"

    def checkpoint(self, recipe: Recipe) -> str:
        return getattr(getattr(recipe, self.section), f"{self.kind}_checkpoint")

    def architecture(self, recipe: Recipe) -> str:
        return getattr(getattr(recipe, self.section), self.kind)

    def precision(self, recipe: Recipe) -> str:
        return getattr(getattr(recipe, self.section), f"{self.kind}_precision")

    def cache_logits(self, recipe: Recipe) -> bool:
        return bool(getattr(recipe, self.section).cache_logits)


ADVERSARY = FrozenRole("adversary", "nasty", "Adversary (f_A)", released=False)
TEACHER = FrozenRole("teacher", "distill", "Distilled from", released=True)


class Objective:
    """A role or an attack. Subclasses set the class attributes and override what differs;
    the defaults describe a plain supervised run."""

    name: ClassVar[str] = ""  # run.role, or distill.method for a student's attack
    role: ClassVar[str] = ""  # the run.role it serves: teacher | baseline | nasty | student
    summary: ClassVar[str] = ""  # one line: CLI help, docs, error messages
    sections: ClassVar[tuple[str, ...]] = ()  # recipe sections it reads beyond BASE_SECTIONS
    frozen: ClassVar[FrozenRole | None] = None  # the frozen network it learns against
    data_free: ClassVar[bool] = False  # trains on synthetic images; the training split is never read

    def step(self, recipe: Recipe, frozen: Any, source: Any = None) -> StepFn:
        """The training step: ``(model, images, labels, index, epoch) -> {"loss", "logits", parts}``;
        ``frozen`` is the :class:`~nt_dist.frozen_network.FrozenNetwork` (None without one),
        ``source`` what :meth:`train_source` returned (None: the data set)."""
        raise NotImplementedError

    def check(self, recipe: Recipe, source: str) -> None:
        """Cross-section rules of this objective (called when a recipe is loaded): raise a one-line
        :class:`~nt_dist.errors.UserError` naming ``source`` and the key."""
        if self.frozen is not None and not self.frozen.checkpoint(recipe):
            raise UserError(f"{source}: {self.frozen.checkpoint_key}: required when run.role is {self.role}")

    def param_sections(self, recipe: Recipe) -> tuple[str, ...]:
        """The recipe sections logged as MLflow params (the rest stays in resolved_recipe.yaml)."""
        return BASE_SECTIONS + self.sections

    def tags(self, recipe: Recipe) -> dict[str, str]:
        """MLflow tags that say what this run is beyond its role (an attack's name, its defence)."""
        return {}

    def wrap_model(self, model: nn.Module, recipe: Recipe, num_classes: int, source: str) -> nn.Module:
        """The network being trained, built from the plain one (e.g. with an auxiliary head)."""
        return model

    def export_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """What ``model.safetensors`` holds: the plain network's state dict."""
        return state

    def train_source(self, recipe: Recipe, teacher: nn.Module, *, num_classes: int, device: torch.device,
                     rank: int, identity: str, student: nn.Module, main: bool) -> Any:
        """A data-free objective's synthetic training split (``teacher``: the frozen network as
        released, gradients flowing through it to the images); None: the data set's own."""
        return None

    def audit_columns(self, plan: Any) -> dict[str, dict[str, Any]]:
        """``nt-dist audit``'s columns for this attack: label -> the student's recipe overrides
        (``plan``: the audit's options, e.g. ``kd_taus``, ``top_k``). Roles have none."""
        return {}


_REGISTRY: dict[str, type[Objective]] = {}  # "role:<name>" or "attack:<name>" -> class
ObjectiveClass = TypeVar("ObjectiveClass", bound=type[Objective])


def _key(cls: type[Objective]) -> str:
    return f"attack:{cls.name}" if cls.role == "student" else f"role:{cls.name}"


def register(cls: ObjectiveClass) -> ObjectiveClass:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name or not cls.role:
        raise TypeError(f"{cls.__name__}: an objective needs a name and a role")
    if cls.role == "student" and cls.frozen is None:
        raise TypeError(f"{cls.__name__}: an attack learns from a teacher (frozen = TEACHER)")
    key = _key(cls)
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise TypeError(f"{cls.__name__}: {key.replace(':', ' ')} is already registered by "
                        f"{_REGISTRY[key].__module__}.{_REGISTRY[key].__name__}")
    _REGISTRY[key] = cls
    return cls


def unregister(cls: type[Objective]) -> None:
    """Remove ``cls`` (tests that register a throwaway objective)."""
    _REGISTRY.pop(_key(cls), None)


def attack_names() -> tuple[str, ...]:
    """``distill.method`` values, in registration order (the audit's column order)."""
    return tuple(k.split(":", 1)[1] for k in _REGISTRY if k.startswith("attack:"))


def data_free_names() -> tuple[str, ...]:
    return tuple(name for name in attack_names() if _REGISTRY[f"attack:{name}"].data_free)


def frozen_roles() -> tuple[FrozenRole, ...]:
    """Every frozen network a registered objective learns against (its lineage tags' prefixes)."""
    return tuple(dict.fromkeys(cls.frozen for cls in _REGISTRY.values() if cls.frozen is not None))


def role_names() -> tuple[str, ...]:
    """``run.role`` values: the registered roles, and ``student`` when an attack is registered."""
    roles = [k.split(":", 1)[1] for k in _REGISTRY if k.startswith("role:")]
    return tuple(roles + ["student"] * bool(attack_names()))


def describe() -> str:
    """The registered objectives, one line each, as the CLI's help lists them."""
    lines = ["objectives (run.role; a student's attack: distill.method):"]
    for key, cls in _REGISTRY.items():
        label = f"run.role: {cls.name}" if key.startswith("role:") else f"distill.method: {cls.name}"
        lines.append(f"  {label:<30} {cls.summary}")
    return "\n".join(lines)


def attack(name: str, key: str = "distill.method") -> Objective:
    """The attack registered as ``name``; an unknown name is one line listing the registered ones."""
    cls = _REGISTRY.get(f"attack:{name}")
    if cls is None:
        raise UserError(f"{key}: unknown attack {name!r}; expected one of: {', '.join(attack_names())}")
    return cls()


def objective_for(recipe: Recipe) -> Objective:
    """What ``recipe`` trains: its role's objective, or for a student its attack's."""
    role = recipe.run.role
    if role == "student":
        return attack(recipe.distill.method)
    cls = _REGISTRY.get(f"role:{role}")
    if cls is None:
        raise UserError(f"run.role: unknown role {role!r}; expected one of: {', '.join(role_names())}")
    return cls()

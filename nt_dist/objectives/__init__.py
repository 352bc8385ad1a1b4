"""Objectives: what a run optimises, one file per role or attack, found by name.

========================= ================ =========================================================
name                      recipe key       what the run does
========================= ================ =========================================================
teacher, baseline         ``run.role``     ``CE(f(x), y)`` (:mod:`.teacher`)
nasty                     ``run.role``     self-undermining KD against a frozen adversary (:mod:`.nasty`)
kd                        ``distill.method`` Hinton KD from a frozen teacher (:mod:`.kd`)
topk                      ``distill.method`` KD on the teacher's top-k classes (:mod:`.topk`)
skeptical                 ``distill.method`` the Skeptical Student, as its authors train it (:mod:`.skeptical`)
dafl                      ``distill.method`` data-free, a generator (:mod:`.dafl`)
deepinversion             ``distill.method`` data-free, images inverted from BN statistics (:mod:`.deepinversion`)
========================= ================ =========================================================

Every attack (``run.role: student``) works against any teacher checkpoint, on any data set,
through any teacher-side defence (:mod:`nt_dist.defences`). The registry and the
:class:`~.registry.Objective` interface are in :mod:`.registry`; importing this package
registers the built-ins, in the order above (the audit's column order).
"""

from nt_dist.objectives import teacher, nasty, kd, topk, skeptical, dafl, deepinversion  # noqa: F401, I001  (registers, in this order)
from nt_dist.objectives.registry import (
    ADVERSARY,
    BASE_SECTIONS,
    TEACHER,
    FrozenRole,
    Objective,
    StepFn,
    attack,
    attack_names,
    data_free_names,
    describe,
    frozen_roles,
    objective_for,
    register,
    role_names,
    unregister,
)

__all__ = ["ADVERSARY", "BASE_SECTIONS", "TEACHER", "FrozenRole", "Objective", "StepFn", "attack", "attack_names",
           "data_free_names", "describe", "frozen_roles", "objective_for", "register", "role_names", "unregister"]

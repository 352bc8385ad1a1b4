"""``nt-dist quickstart``: the paper's experiment in miniature, on the embedded digits.

Five ordinary recipe runs, in order, each reading the previous ones' exported models:

  teacher_normal    recipes/digits_teacher.yaml                     CE
  teacher_nasty     recipes/digits_nasty.yaml    (adversary = teacher_normal)
  student_baseline  recipes/digits_student.yaml  run.role=baseline  CE alone
  student_kd_normal recipes/digits_student.yaml  teacher = teacher_normal
  student_kd_nasty  recipes/digits_student.yaml  teacher = teacher_nasty

then prints the paper's table and writes ``OUT/results.json`` (name -> test top-1, percent).
Finished stages are not retrained (``resume: auto``); ``--fresh`` starts over.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from nt_dist.checkpoint import atomic_write_text
from nt_dist.config import load_recipe


def recipes_dir() -> Path:
    """``recipes/`` of the source checkout (editable install), else the copy a wheel installs
    under ``<prefix>/share/nt_dist/recipes``."""
    for candidate in (Path(__file__).resolve().parents[1] / "recipes",
                      Path(sys.prefix) / "share" / "nt_dist" / "recipes"):
        if (candidate / "digits_teacher.yaml").is_file():
            return candidate
    raise FileNotFoundError("recipes/digits_teacher.yaml not found beside nt_dist or under sys.prefix")


def stages(out: Path) -> list[tuple[str, str, list[str]]]:
    """(name, recipe file, overrides) for each of the five runs."""
    normal, nasty = out / "teacher_normal", out / "teacher_nasty"
    return [
        ("teacher_normal", "digits_teacher.yaml", []),
        ("teacher_nasty", "digits_nasty.yaml", [f"nasty.adversary_checkpoint={normal}"]),
        ("student_baseline", "digits_student.yaml", ["run.role=baseline"]),
        ("student_kd_normal", "digits_student.yaml", [f"distill.teacher_checkpoint={normal}"]),
        ("student_kd_nasty", "digits_student.yaml", [f"distill.teacher_checkpoint={nasty}"]),
    ]


def run_quickstart(out: Path, extra: list[str], fresh: bool = False) -> dict[str, float]:
    from nt_dist.train import train

    recipes = recipes_dir()
    results: dict[str, float] = {}
    started = time.perf_counter()
    for name, recipe_file, overrides in stages(out):
        overrides = [*overrides, f"run.name={name}", f"run.output_dir={out / name}", *extra]
        if fresh:
            overrides.append("run.resume=never")
        path = recipes / recipe_file
        recipe = load_recipe(path, overrides)
        print(f"== {name}: {path.name} {' '.join(overrides)}", flush=True)
        results[name] = round(train(recipe, source=str(path))["test_top1"], 2)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    print()
    print(table(results, load_recipe(recipes / "digits_teacher.yaml").model.name,
                load_recipe(recipes / "digits_student.yaml").model.name))
    print(verdict(results))
    print(f"\nresults: {out / 'results.json'}   ({time.perf_counter() - started:.0f} s)")
    return results


def table(results: dict[str, float], teacher_arch: str, student_arch: str) -> str:
    """The layout of the paper's Table 1: teacher accuracy, then each student's accuracy with
    its change against the student trained alone."""
    base = results["student_baseline"]
    rows = [
        f"| {'Teacher network':<26} | {'Teacher top-1':>13} | {'Student ' + student_arch + ' top-1':>22} |",
        f"|{'-' * 28}|{'-' * 15}|{'-' * 24}|",
        f"| {'Student baseline (CE)':<26} | {'-':>13} | {base:>22.2f} |",
    ]
    for kind in ("normal", "nasty"):
        teacher = results[f"teacher_{kind}"]
        student = results[f"student_kd_{kind}"]
        label = f"{teacher_arch} ({kind})"
        cell = f"{student:.2f} ({student - base:+.2f})"
        rows.append(f"| {label:<26} | {teacher:>13.2f} | {cell:>22} |")
    return "\n".join(rows)


def verdict(results: dict[str, float]) -> str:
    teacher_drop = results["teacher_normal"] - results["teacher_nasty"]
    student_gap = results["student_kd_normal"] - results["student_kd_nasty"]
    shown = teacher_drop <= 2.0 and student_gap >= 3.0
    return (f"nasty teacher: {-teacher_drop:+.2f} points vs the normal teacher (target: within 2); "
            f"its student: {-student_gap:+.2f} points vs the normal teacher's student (target: 3 below). "
            f"Effect shown: {'yes' if shown else 'NO'}")

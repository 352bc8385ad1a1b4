"""``nt-dist quickstart``: the paper's experiment in miniature, on the embedded digits.

The pipeline ``recipes/quickstart.yaml`` over three seeds; per seed five ordinary recipe runs,
each reading the previous ones' exported models:

  teacher_normal    recipes/digits_teacher.yaml                     CE
  teacher_nasty     recipes/digits_nasty.yaml    (adversary = teacher_normal)
  student_baseline  recipes/digits_student.yaml  run.role=baseline  CE alone
  student_kd_normal recipes/digits_student.yaml  teacher = teacher_normal
  student_kd_nasty  recipes/digits_student.yaml  teacher = teacher_nasty

then prints the paper's table as mean ± std over the seeds and writes ``OUT/results.json``
(the five names -> mean test top-1 in percent, and ``seeds``: the same per seed). Finished
stages are not retrained; ``--fresh`` starts over.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nt_dist.errors import RunError
from nt_dist.fileio import atomic_write_text

if TYPE_CHECKING:
    from nt_dist.report import Result

NAMES = ("teacher_normal", "teacher_nasty", "student_baseline", "student_kd_normal", "student_kd_nasty")
MAX_DROP = 2.0  # the nasty teacher keeps its accuracy within this many points (mean over seeds)
MIN_GAP = 3.0  # its student lands at least this far below the normal teacher's student (mean)


def recipes_dir() -> Path:
    """``recipes/`` of the source checkout (editable install), else the copy a wheel installs
    under ``<prefix>/share/nt_dist/recipes``."""
    for candidate in (Path(__file__).resolve().parents[1] / "recipes",
                      Path(sys.prefix) / "share" / "nt_dist" / "recipes"):
        if (candidate / "quickstart.yaml").is_file():
            return candidate
    raise FileNotFoundError("recipes/quickstart.yaml not found beside nt_dist or under sys.prefix")


def run_quickstart(out: Path, extra: list[str], fresh: bool = False, seeds: list[int] | None = None,
                   parallel: int = 1) -> dict[str, Any]:
    from nt_dist import pipeline, report

    started = time.perf_counter()
    spec = pipeline.load_pipeline(recipes_dir() / "quickstart.yaml")
    stages = pipeline.expand(spec, seeds=seeds, extra=[*extra, *(["run.resume=never"] if fresh else [])],
                             output_dir=str(out))
    outcomes = pipeline.run(spec, stages, parallel=parallel)
    print("\n" + pipeline.summary(outcomes))
    if pipeline.exit_code(outcomes):
        raise RunError(f"the quickstart pipeline did not finish (see above); run the same command again to "
                       f"resume it (output in {out})")
    results, _ = report.from_stages(stages)
    numbers = quickstart_numbers(results)
    atomic_write_text(out / "results.json", json.dumps(numbers, indent=1) + "\n")
    table = report.build_table(results, "Quickstart: digits, cifar_cnn teachers, MLP student")
    print()
    print(report.markdown(table))
    print(verdict(numbers))
    text, files = report.report(results, spec.name, "", out / "report")
    enabled, uri = report.tracking_of(spec, stages)
    where = ""
    if enabled:  # the table beside the runs: a run <name>/report with it as description and results_table.json
        run_id = report.log_to_mlflow([*files, out / "results.json"], spec.experiment, uri, spec.name, "", text)
        where = f"; MLflow run {spec.name}/report ({run_id}) in experiment {spec.experiment}"
    print(f"\nresults: {out / 'results.json'}, report {out / 'report'}{where}   "
          f"({time.perf_counter() - started:.0f} s)")
    return numbers


def verdict(numbers: dict[str, Any]) -> str:
    """The paper's effect, on the mean over seeds, with the worst seed named."""
    per_seed = numbers["seeds"].values()
    drop = numbers["teacher_normal"] - numbers["teacher_nasty"]
    gap = numbers["student_kd_normal"] - numbers["student_kd_nasty"]
    worst_drop = max(s["teacher_normal"] - s["teacher_nasty"] for s in per_seed)
    worst_gap = min(s["student_kd_normal"] - s["student_kd_nasty"] for s in per_seed)
    shown = drop <= MAX_DROP and gap >= MIN_GAP
    return (f"nasty teacher: {-drop:+.2f} points vs the normal teacher on the mean (target: within {MAX_DROP:g}; "
            f"worst seed {-worst_drop:+.2f}); its student: {-gap:+.2f} points vs the normal teacher's student "
            f"(target: {MIN_GAP:g} below; worst seed {-worst_gap:+.2f}). Effect shown: {'yes' if shown else 'NO'}")


def quickstart_numbers(results: list[Result]) -> dict[str, Any]:
    """The quickstart's five figures (means over seeds) and the same per seed."""
    def pick(rs: list[Result]) -> dict[str, float]:
        rows = {kind: {r.row for r in rs if r.kind == kind} for kind in ("teacher", "nasty")}

        def first(kind: str, row_kind: str = "") -> float:
            return next((r.top1 for r in rs if r.kind == kind and (not row_kind or r.row in rows[row_kind])),
                        float("nan"))

        return {"teacher_normal": first("teacher"), "teacher_nasty": first("nasty"),
                "student_baseline": first("baseline"), "student_kd_normal": first("student", "teacher"),
                "student_kd_nasty": first("student", "nasty")}

    seeds = sorted({r.seed for r in results})
    per_seed = {str(s): pick([r for r in results if r.seed == s]) for s in seeds}
    means = {k: round(statistics.fmean(v[k] for v in per_seed.values()), 2) for k in next(iter(per_seed.values()))}
    return {**means, "seeds": {s: {k: round(x, 2) for k, x in v.items()} for s, v in per_seed.items()}}

"""How the quickstart's digits settings were chosen: the five quickstart runs, over several
seeds, for a few named settings.

    # every setting, seeds 0-4 (~20 s per setting and seed on an idle 2-core CPU; shared runs once)
    NT_DIST_CACHE=/tmp/qsweep/cache python benchmarks/quickstart_sweep.py --out /tmp/qsweep
    python benchmarks/quickstart_sweep.py --settings t8_w05 --seeds 5 6 7 8 9 --out /tmp/qsweep
    python benchmarks/quickstart_sweep.py --list            # the settings and their overrides
    python benchmarks/quickstart_sweep.py --out /tmp/qsweep --table-only   # the table of what is done
    # the recipe files as they are, timed with MLflow logging as in `nt-dist quickstart`
    python benchmarks/quickstart_sweep.py --settings files --seeds 0 1 2 --out /tmp/qsweep-time \\
        --tracking sqlite:////tmp/qsweep-time/mlflow.db

Per seed, the five runs of ``nt-dist quickstart`` (nt_dist/quickstart.py), all with that
``run.seed``; PINNED (the recipes' values when the sweep was run) comes first, then the setting:

  teacher_normal    recipes/digits_teacher.yaml                      + setting["teacher"]
  teacher_nasty     recipes/digits_nasty.yaml   (adversary = teacher_normal)   + setting["nasty"]
  student_baseline  recipes/digits_student.yaml run.role=baseline    + setting["student"]
  student_kd_normal recipes/digits_student.yaml (teacher = teacher_normal)
                                                                     + setting["student"] + setting["kd"]
  student_kd_nasty  recipes/digits_student.yaml (teacher = teacher_nasty)  + the same

The setting ``files`` runs the recipe files as they are, with nothing pinned.

Every run's folder is named after its own overrides and those of the runs it reads from
(``OUT/runs/<stage>/<key>/seed<k>``), so a run two settings share (the normal teacher and the
baseline, usually; the nasty teacher when only the students change) is trained once per seed:
``train()`` finds the finished folder and returns its results. Each run's training seconds are
kept in its folder (``sweep_seconds.json``), so "s/seed" below is what the five runs of one seed
cost when trained from scratch, also when some were reused.

One JSON line per (setting, seed) is appended to ``OUT/results.jsonl``; at the end a Markdown
table: per seed the five top-1 accuracies (percent; 360 test images, 1 image = 0.28 points),
drop = teacher_normal - teacher_nasty, gap = student_kd_normal - student_kd_nasty, then
mean/min/max, the criteria, and the seconds per seed. The criteria (what the quickstart must
show on every machine):

  (a) mean drop <= 1.0   (b) mean gap >= 5.0   (c) every seed: drop <= 2.0 and gap >= 3.0

Timings are wall seconds on whatever machine runs this; on a shared 2-core CPU they vary
+-30 % with the load (the load average is printed with the table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nt_dist.config import load_recipe  # noqa: E402
from nt_dist.train import train  # noqa: E402

RECIPES = REPO / "recipes"
STAGES = ("teacher_normal", "teacher_nasty", "student_baseline", "student_kd_normal", "student_kd_nasty")
COMMON = ["run.progress=false", "tracking.enabled=false"]

# Every setting below is stated against these values, the recipes as they were when the sweep
# was run (ω = 0.08, τ_A = τ_s = 4, α = 0.9, 20 epochs everywhere): they are applied first, so
# the settings mean the same whatever the recipe files hold now. Per stage part as in SETTINGS.
PINNED: dict[str, list[str]] = {
    "teacher": ["run.epochs=20", "optim.lr=0.05", "data.augment=shift", "model.name=cifar_cnn"],
    "nasty": ["run.epochs=20", "optim.lr=0.05", "data.augment=shift", "model.name=cifar_cnn",
              "nasty.tau=4", "nasty.omega=0.08"],
    "student": ["run.epochs=20", "optim.lr=0.05", "data.augment=shift", "model.name=mlp",
                "distill.tau=4", "distill.alpha=0.9"],
}
FILES = "files"  # the setting that runs the recipe files as they are now, without PINNED

# name -> per-stage overrides: "teacher" (normal teacher), "nasty" (nasty teacher), "student"
# (all three students), "kd" (the two distilled students only). Missing keys: no overrides.
SETTINGS: dict[str, dict[str, list[str]]] = {
    FILES: {},  # whatever recipes/digits_*.yaml hold today (to check a choice once it is in them)
    "recipes": {},  # the recipes as they were: PINNED alone
    "w08_e15": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15"], "student": ["run.epochs=15"]},
    "w06_e15": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.omega=0.06"],
                "student": ["run.epochs=15"]},
    "w07_e15": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.omega=0.07"],
                "student": ["run.epochs=15"]},
    # a longer nasty teacher: more steps for CE to win back top-1 under the same ω
    "w08_n30": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=30"], "student": ["run.epochs=15"]},
    # a smaller ω, trained longer: the KL term keeps growing through training (its optimum is
    # unbounded), the CE it costs grows far less
    "w06_n30": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=30", "nasty.omega=0.06"],
                "student": ["run.epochs=15"]},
    "w06_n40": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=40", "nasty.omega=0.06"],
                "student": ["run.epochs=15"]},
    # other temperatures (τ_s = τ_A). τ²·KL is roughly independent of τ once τ is large, so ω
    # keeps its meaning: ω·τ² held at 1.28 (first two) is a 4x weaker (τ 8) / far too strong
    # (τ 2: the nasty teacher collapses to chance) adversary term
    "t8_w02": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=8", "nasty.omega=0.02"],
               "student": ["run.epochs=15"], "kd": ["distill.tau=8"]},
    "t2_w30": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=2", "nasty.omega=0.3"],
               "student": ["run.epochs=15"], "kd": ["distill.tau=2"]},
    "t8_w08": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=8", "nasty.omega=0.08"],
               "student": ["run.epochs=15"], "kd": ["distill.tau=8"]},
    "t8_w12": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=8", "nasty.omega=0.12"],
               "student": ["run.epochs=15"], "kd": ["distill.tau=8"]},
    "t8_w035": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=8", "nasty.omega=0.035"],
                "student": ["run.epochs=15"], "kd": ["distill.tau=8"]},
    "t8_w045": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=8", "nasty.omega=0.045"],
                "student": ["run.epochs=15"], "kd": ["distill.tau=8"]},
    "t8_w05": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=8", "nasty.omega=0.05"],
               "student": ["run.epochs=15"], "kd": ["distill.tau=8"]},
    "t12_w045": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=12", "nasty.omega=0.045"],
                 "student": ["run.epochs=15"], "kd": ["distill.tau=12"]},
    "t16_w045": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=16", "nasty.omega=0.045"],
                 "student": ["run.epochs=15"], "kd": ["distill.tau=16"]},
    "t8_w04_n20": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=20", "nasty.tau=8", "nasty.omega=0.04"],
                   "student": ["run.epochs=15"], "kd": ["distill.tau=8"]},
    "t8_w035_n20": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=20", "nasty.tau=8", "nasty.omega=0.035"],
                    "student": ["run.epochs=15"], "kd": ["distill.tau=8"]},
    "t8_w05_s20": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=8", "nasty.omega=0.05"],
                   "student": ["run.epochs=20"], "kd": ["distill.tau=8"]},
    "t8_w0475": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=8", "nasty.omega=0.0475"],
                 "student": ["run.epochs=15"], "kd": ["distill.tau=8"]},
    "t6_w05": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=6", "nasty.omega=0.05"],
               "student": ["run.epochs=15"], "kd": ["distill.tau=6"]},
    "t8_w05_lr1": {"teacher": ["run.epochs=15"],
                   "nasty": ["run.epochs=15", "nasty.tau=8", "nasty.omega=0.05", "optim.lr=0.1"],
                   "student": ["run.epochs=15"], "kd": ["distill.tau=8"]},
    "t8_w05_lr025": {"teacher": ["run.epochs=15"],
                     "nasty": ["run.epochs=15", "nasty.tau=8", "nasty.omega=0.05", "optim.lr=0.025"],
                     "student": ["run.epochs=15"], "kd": ["distill.tau=8"]},
    "t8_w07_lr025": {"teacher": ["run.epochs=15"],
                     "nasty": ["run.epochs=15", "nasty.tau=8", "nasty.omega=0.07", "optim.lr=0.025"],
                     "student": ["run.epochs=15"], "kd": ["distill.tau=8"]},
    "t8_w05_noaug": {"teacher": ["run.epochs=15", "data.augment=none"],
                     "nasty": ["run.epochs=15", "nasty.tau=8", "nasty.omega=0.05", "data.augment=none"],
                     "student": ["run.epochs=15", "data.augment=none"], "kd": ["distill.tau=8"]},
    "t12_w03": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=12", "nasty.omega=0.03"],
                "student": ["run.epochs=15"], "kd": ["distill.tau=12"]},
    "t16_w025": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.tau=16", "nasty.omega=0.025"],
                 "student": ["run.epochs=15"], "kd": ["distill.tau=16"]},
    # students that follow the teacher more closely: trained longer, or a CNN
    "w06_s30": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.omega=0.06"],
                "student": ["run.epochs=30"]},
    "w06_cnn": {"teacher": ["run.epochs=15"], "nasty": ["run.epochs=15", "nasty.omega=0.06"],
                "student": ["run.epochs=15", "model.name=cifar_cnn"]},
}


# ============================================================================ runs


def slug(overrides: list[str]) -> str:
    """A readable folder name for a list of overrides (plus a short hash: names stay unique)."""
    if not overrides:
        return "default"
    text = "_".join(o.replace("=", "-") for o in overrides)
    text = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return f"{text[:80]}_{hashlib.sha1(' '.join(overrides).encode()).hexdigest()[:8]}"


def plan(name: str) -> dict[str, tuple[str, list[str], list[str]]]:
    """stage -> (recipe file, overrides, key parts) for one setting. The key of a run is the
    setting's overrides of it plus those of the runs it reads from (PINNED is the same for all;
    the FILES setting is keyed apart)."""
    setting = SETTINGS[name]
    get = lambda part: list(setting.get(part, []))  # noqa: E731
    pin = (lambda part: []) if name == FILES else (lambda part: list(PINNED[part]))  # noqa: E731
    tag = [f"{FILES}:"] if name == FILES else []
    student = get("student")
    key = {"teacher_normal": [*tag, *get("teacher")],
           "teacher_nasty": [*tag, "A:", *get("teacher"), "N:", *get("nasty")],
           "student_baseline": [*tag, "run.role=baseline", *student],
           "student_kd_normal": [*tag, "T:", *get("teacher"), "S:", *student, *get("kd")],
           "student_kd_nasty": [*tag, "A:", *get("teacher"), "N:", *get("nasty"), "S:", *student, *get("kd")]}
    students = pin("student") + student
    return {
        "teacher_normal": ("digits_teacher.yaml", pin("teacher") + get("teacher"), key["teacher_normal"]),
        "teacher_nasty": ("digits_nasty.yaml", pin("nasty") + get("nasty"), key["teacher_nasty"]),
        "student_baseline": ("digits_student.yaml", ["run.role=baseline", *students], key["student_baseline"]),
        "student_kd_normal": ("digits_student.yaml", students + get("kd"), key["student_kd_normal"]),
        "student_kd_nasty": ("digits_student.yaml", students + get("kd"), key["student_kd_nasty"]),
    }


def run_stage(stage: str, recipe_file: str, overrides: list[str], folder: Path, seed: int,
              tracking: str = "") -> tuple[float, float]:
    """(test top-1, training seconds) of one run; a finished folder is reused, with the seconds
    it took when it was trained. ``tracking``: an MLflow URI to log to (as the quickstart does),
    "": no tracking."""
    common = [*COMMON, "tracking.enabled=true", f"tracking.uri={tracking}"] if tracking else COMMON
    overrides = [*overrides, *common, f"run.name={stage}", f"run.output_dir={folder}", f"run.seed={seed}"]
    recipe = load_recipe(RECIPES / recipe_file, overrides)
    started = time.perf_counter()
    top1 = train(recipe, source=str(RECIPES / recipe_file))["test_top1"]
    elapsed = time.perf_counter() - started
    seconds_file = folder / "sweep_seconds.json"
    if seconds_file.is_file():
        elapsed = json.loads(seconds_file.read_text())["seconds"]
    else:
        seconds_file.write_text(json.dumps({"seconds": elapsed}))
    return round(top1, 2), elapsed


def run_seed(out: Path, name: str, seed: int, tracking: str = "") -> dict:
    stages = plan(name)
    folders = {stage: out / "runs" / stage / slug(key) / f"seed{seed}" for stage, (_, _, key) in stages.items()}
    links = {"teacher_nasty": f"nasty.adversary_checkpoint={folders['teacher_normal']}",
             "student_kd_normal": f"distill.teacher_checkpoint={folders['teacher_normal']}",
             "student_kd_nasty": f"distill.teacher_checkpoint={folders['teacher_nasty']}"}
    top1, seconds = {}, {}
    started = time.perf_counter()
    for stage in STAGES:
        recipe_file, overrides, _ = stages[stage]
        extra = [links[stage]] if stage in links else []
        top1[stage], seconds[stage] = run_stage(stage, recipe_file, [*extra, *overrides], folders[stage], seed,
                                                   tracking)
    return {"setting": name, "seed": seed, "overrides": SETTINGS[name], "top1": top1,
            "drop": round(top1["teacher_normal"] - top1["teacher_nasty"], 2),
            "gap": round(top1["student_kd_normal"] - top1["student_kd_nasty"], 2),
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "seconds_total": round(sum(seconds.values()), 1),
            "wall_this_call": round(time.perf_counter() - started, 1),
            "loadavg": os.getloadavg()[0]}


# ============================================================================ table


def criteria(rows: list[dict]) -> dict[str, bool]:
    drops, gaps = [r["drop"] for r in rows], [r["gap"] for r in rows]
    return {"a": statistics.mean(drops) <= 1.0, "b": statistics.mean(gaps) >= 5.0,
            "c": all(d <= 2.0 for d in drops) and all(g >= 3.0 for g in gaps)}


def table(results: list[dict]) -> str:
    """Per setting: a row per seed, then mean/min/max and the verdict. The newest line of a
    (setting, seed) wins."""
    latest: dict[tuple[str, int], dict] = {}
    for r in results:
        latest[(r["setting"], r["seed"])] = r
    short = {"teacher_normal": "T normal", "teacher_nasty": "T nasty", "student_baseline": "S base",
             "student_kd_normal": "S<-normal", "student_kd_nasty": "S<-nasty"}
    head = ["setting", "seed", *short.values(), "drop", "gap", "s/seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    names = list(dict.fromkeys(name for name, _ in latest))
    for name in names:
        rows = sorted((r for (n, _), r in latest.items() if n == name), key=lambda r: r["seed"])
        for r in rows:
            cells = [name, str(r["seed"]), *(f"{r['top1'][s]:.2f}" for s in STAGES),
                     f"{r['drop']:.2f}", f"{r['gap']:.2f}", f"{r['seconds_total']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        for label, fn in (("mean", statistics.mean), ("min", min), ("max", max)):
            cells = [f"**{name}**" if label == "mean" else "", label,
                     *(f"{fn(r['top1'][s] for r in rows):.2f}" for s in STAGES),
                     f"{fn(r['drop'] for r in rows):.2f}", f"{fn(r['gap'] for r in rows):.2f}",
                     f"{fn(r['seconds_total'] for r in rows):.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        ok = criteria(rows)
        verdict = ", ".join(f"({k}) {'yes' if v else 'NO'}" for k, v in ok.items())
        lines.append(f"| | {len(rows)} seeds: {verdict}; all: {'**yes**' if all(ok.values()) else 'no'} |"
                     + " |" * (len(head) - 2))
    return "\n".join(lines)


def describe(names: list[str]) -> str:
    pinned = "; ".join(f"{part}: {' '.join(o)}" for part, o in PINNED.items())
    return f"every setting but `{FILES}` starts from: {pinned}\n" + "\n".join(f"- `{n}`: " + "; ".join(f"{part}: {' '.join(o)}" for part, o in SETTINGS[n].items())
                     if SETTINGS[n] else f"- `{n}`: no overrides" for n in names)


# ============================================================================ entry point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="NAME",
                        help=f"settings to run (default: all): {', '.join(SETTINGS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart_sweep"),
                        help="run folders and results.jsonl go here")
    parser.add_argument("--tracking", default="", metavar="URI",
                        help="log every run to this MLflow URI, as the quickstart does (timing with its "
                             "overhead; use a fresh --out: finished runs are reused), e.g. sqlite:///OUT/mlflow.db")
    parser.add_argument("--table-only", action="store_true", help="print the table of OUT/results.jsonl and stop")
    parser.add_argument("--list", action="store_true", help="list the settings and stop")
    args = parser.parse_args(argv)
    if args.list:
        print(describe(list(SETTINGS)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.jsonl"
    if not args.table_only:
        for name in args.settings:
            for seed in args.seeds:
                row = run_seed(args.out, name, seed, args.tracking)
                with log.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(f"## {name} seed {seed}: {row['top1']} drop {row['drop']:.2f} gap {row['gap']:.2f} "
                      f"({row['seconds_total']:.0f} s, load {row['loadavg']:.2f})", flush=True)
    results = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    if not args.table_only:
        results = [r for r in results if r["setting"] in args.settings]
    print()
    print(table(results))
    print()
    print(describe(list(dict.fromkeys(r["setting"] for r in results if r["setting"] in SETTINGS))))
    print(f"\nload average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``nt-dist``: the command line.

  nt-dist quickstart [--out DIR]            the paper's table in miniature on the embedded digits (3 seeds)
  nt-dist pipeline FILE.yaml [--seeds ...]  a grid of runs (a paper table) as a dependency graph
  nt-dist report FILE.yaml | --experiment E the paper-layout tables (mean ± std, the paper beside), plots
  nt-dist plot-logits NORMAL NASTY          temperature-softmax responses of two teachers, as PNG
  nt-dist train RECIPE [--set k=v ...]      train in this process (multi-process: accelerate launch
                                            -m nt_dist.train RECIPE)
  nt-dist check RECIPE [--set k=v ...]      validate a recipe and print it resolved; trains nothing
  nt-dist data write-ffcv --dataset ...     write .beton files for the FFCV loader
  nt-dist ui [--host H] [--port 5000]       the MLflow UI over the embedded store (default 127.0.0.1)

User mistakes end in one line on stderr (``nt-dist: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from nt_dist.errors import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_RUN_ERROR,
    EXIT_USER_ERROR,
    Preempted,
    RunError,
    UserError,
    error,
    say,
)


def _parser() -> argparse.ArgumentParser:
    from nt_dist import objectives  # the registered attacks, for --attacks' help

    parser = argparse.ArgumentParser(prog="nt-dist", description="Nasty-teacher training on accelerate.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # --version on one line
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    quick = sub.add_parser("quickstart", help="train normal/nasty teachers and three students on the embedded digits")
    quick.add_argument("--out", default="runs/quickstart", help="folder for the runs and results.json")
    quick.add_argument("--fresh", action="store_true", help="retrain stages that already finished")
    quick.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a field in every stage's recipe (e.g. run.epochs=5)")
    quick.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    quick.add_argument("--parallel", type=int, default=1, metavar="N", help="run N stages at once (subprocesses)")

    pipe = sub.add_parser("pipeline", help="run a pipeline file: teachers, nasty teachers, students, seeds, sweep")
    pipe.add_argument("file")
    pipe.add_argument("--seeds", type=int, nargs="+", default=None, help="instead of the file's seeds")
    pipe.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a field in every stage (after the file's own set)")
    pipe.add_argument("--out", default=None, help="instead of the file's output_dir")
    pipe.add_argument("--launcher", default=None, help="local, or an accelerate config (instead of the file's)")
    pipe.add_argument("--parallel", type=int, default=1, metavar="N", help="run N independent stages at once")
    pipe.add_argument("--submit", choices=["slurm"], default=None, help="hand every stage to sbatch, chained")
    pipe.add_argument("--sbatch-script", default=None, help="job script (default: cluster/slurm/train.sbatch)")
    pipe.add_argument("--dry-run", action="store_true", help="print the stages and their commands; run nothing")
    pipe.add_argument("--no-report", action="store_true", help="do not write the report at the end")

    rep = sub.add_parser("report", help="the paper-layout tables of a pipeline's runs, with plots")
    rep.add_argument("file", nargs="?", help="pipeline file (its stage folders are read)")
    rep.add_argument("--experiment", default=None, help="read the runs from this MLflow experiment instead")
    rep.add_argument("--table", default="", help="with --experiment: the pipeline name (tag `table`)")
    rep.add_argument("--paper", default=None, help="paper table key to show beside the cells")
    rep.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    rep.add_argument("--seeds", type=int, nargs="+", default=None)
    rep.add_argument("--out", default=None, help="folder for report.md, report.csv and the plots")
    rep.add_argument("--pipeline-out", default=None, help="the pipeline's output_dir, if it ran with --out")
    rep.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")

    audit = sub.add_parser("audit", help="attack a teacher and a reference with every stealer; a protection report")
    audit.add_argument("--teacher", required=True, help="the model under audit: run folder or model.safetensors")
    audit.add_argument("--reference", required=True, help="a normal teacher of the same architecture (folder or file)")
    audit.add_argument("--recipe", default=None, help="the student's recipe: data set, network, optimiser, attack "
                       "budgets (default: recipes/digits_attack.yaml)")
    audit.add_argument("--attacks", nargs="+", default=["all"], metavar="ATTACK",
                       help=f"{' '.join(objectives.attack_names())} (default: all)")
    audit.add_argument("--kd-tau", type=float, nargs="+", default=[4.0, 20.0], metavar="TAU", help="KD's τ_s grid")
    audit.add_argument("--kd-alpha", type=float, nargs="+", default=[0.5, 0.9], metavar="ALPHA", help="KD's α grid")
    audit.add_argument("--top-k", type=int, default=2, help="k of the top-k KD attack")
    audit.add_argument("--stingy-k", type=int, default=0,
                       help="logits the Stingy defence keeps (default: the authors' share of the classes, 0.2; 0.1 from 100)")
    audit.add_argument("--defences", nargs="+", default=["stingy", "noise"], metavar="DEFENCE",
                       help="served through the reference: stingy noise (or none)")
    audit.add_argument("--student", default="", help="the stolen student's network (default: the recipe's; "
                       "self: the audited teacher's)")
    audit.add_argument("--seeds", type=int, nargs="+", default=[0])
    audit.add_argument("--threshold", type=float, default=2.0, help="margin (points) that counts as protected")
    audit.add_argument("--out", default="runs/audit", help="folder for audit.yaml, the runs and report/")
    audit.add_argument("--name", default="audit", help="the pipeline's name (MLflow run names, tag `table`)")
    audit.add_argument("--experiment", default="", help="MLflow experiment (default: the name)")
    audit.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a key of every student recipe (repeatable)")
    audit.add_argument("--launcher", default=None, help="local, or an accelerate config")
    audit.add_argument("--parallel", type=int, default=1, metavar="N", help="run N independent stages at once")
    audit.add_argument("--dry-run", action="store_true", help="write audit.yaml and print the stages; run nothing")
    audit.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")

    logits = sub.add_parser("plot-logits", help="softmax(logits/τ) of a normal and a nasty teacher, as PNG")
    logits.add_argument("normal", help="run folder (or model.safetensors) of the normal teacher")
    logits.add_argument("nasty", help="run folder (or model.safetensors) of the nasty teacher")
    logits.add_argument("--out", default="logits.png")
    logits.add_argument("--tau", type=float, default=None,
                        help="softmax temperature (default: the nasty teacher's recorded τ_A, else 4)")
    logits.add_argument("--count", type=int, default=4, help="images")
    logits.add_argument("--seed", type=int, default=0, help="which images")
    logits.add_argument("--data-root", default="", help="data.root of the teachers' data set (not for digits)")

    for name, text in (("train", "train what a recipe describes, in this process"),
                       ("check", "validate a recipe and print it resolved (trains nothing)")):
        cmd = sub.add_parser(name, help=text, description=text, epilog=objectives.describe(),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_argument("recipe")
        cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    data = sub.add_parser("data", help="data set tools")
    data.add_argument("action", choices=["write-ffcv"])
    data.add_argument("rest", nargs=argparse.REMAINDER)

    ui = sub.add_parser("ui", help="MLflow UI over the embedded SQLite store")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; "
                    "an SSH tunnel to 127.0.0.1 is safer, see docs/tracking.md)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--db", default="mlflow.db", help="SQLite file written by runs in this folder")
    ui.add_argument("--jobs", action="store_true", help="also start MLflow's job runner (GenAI jobs; "
                    "~2 GB and 8 processes more)")
    return parser


def _version() -> str:
    """nt_dist's version and those of the stack it runs on (read from package metadata: no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    from nt_dist import __version__

    parts = []
    for name in ("torch", "accelerate", "timm", "mlflow", "deepspeed", "ffcv"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return f"nt-dist {__version__} ({', '.join(parts)})"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "quickstart":
            from nt_dist.quickstart import run_quickstart

            run_quickstart(Path(args.out), args.overrides, fresh=args.fresh, seeds=args.seeds,
                           parallel=args.parallel)
        elif args.command == "pipeline":
            return pipeline_command(args)
        elif args.command == "report":
            return report_command(args)
        elif args.command == "audit":
            return audit_command(args)
        elif args.command == "plot-logits":
            from nt_dist.plots import plot_logits

            path = plot_logits(Path(args.normal), Path(args.nasty), Path(args.out), tau=args.tau, count=args.count,
                               data_root=args.data_root, seed=args.seed)
            print(path)
        elif args.command == "train":
            from nt_dist.entry import main as train_main

            return train_main([args.recipe, *sum((["--set", o] for o in args.overrides), [])])
        elif args.command == "check":
            return check(args.recipe, args.overrides)
        elif args.command == "data":
            try:
                from nt_dist.data.ffcv_io import main as write_ffcv_main
            except ImportError as exc:
                raise UserError(f"nt-dist data write-ffcv needs ffcv ({exc}); install it with "
                                "make setup (as root) or pip install -e '.[ffcv]'") from None

            return write_ffcv_main(args.rest)
        elif args.command == "ui":
            return ui(args.host, args.port, Path(args.db), args.jobs)
    except UserError as exc:
        error(str(exc))
        return EXIT_USER_ERROR
    except RunError as exc:
        error(str(exc))
        return EXIT_RUN_ERROR
    except Preempted as exc:  # a stage trained in this process (pipeline, quickstart) was stopped
        where = getattr(exc, "where", "the running stage's folder")
        saved = f"checkpoint saved in {where}" if where else "no stage was running"
        say(f"nt-dist: {'interrupted' if exc.interrupted else 'preempted'}: {saved}; "
            "run the same command again to resume")
        return EXIT_INTERRUPTED if exc.interrupted else EXIT_PREEMPTED
    except KeyboardInterrupt:
        say("nt-dist: interrupted")
        return EXIT_INTERRUPTED
    return 0


def check(path: str, overrides: list[str]) -> int:
    """The validation ``train`` runs before it reads any data: schema, networks and image size,
    run folder, tracking store. A pipeline file: every stage's recipe with the overrides the
    pipeline gives it (and ``overrides`` after them), as ``nt-dist pipeline`` would run it."""
    from nt_dist.config import load_recipe, recipe_to_dict
    from nt_dist.preflight import validate
    from nt_dist.yamlio import read_yaml_file

    tree, _ = read_yaml_file(Path(path), "recipe")
    if isinstance(tree, dict) and "pipeline" in tree:
        return check_pipeline(path, overrides)
    recipe = load_recipe(path, overrides)
    validate(recipe, path)
    print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end="")
    say(f"# {path}: valid")
    return 0


def check_pipeline(path: str, overrides: list[str]) -> int:
    """``nt-dist check PIPELINE``: the plan, and every stage validated as ``check`` validates a recipe."""
    from nt_dist import pipeline
    from nt_dist.config import load_recipe
    from nt_dist.preflight import validate

    spec = pipeline.load_pipeline(path)
    stages = pipeline.expand(spec, extra=overrides)
    for stage in stages:
        try:
            validate(load_recipe(stage.recipe, stage.overrides), str(stage.recipe))
        except UserError as exc:  # the recipe's line, and which stage of which pipeline gave it
            raise UserError(f"{path}: stage {stage.name}: {exc}") from None
    print(pipeline.describe_plan(stages, spec.spec.launcher))
    say(f"# {path}: valid ({len(stages)} stages)")
    return 0


def pipeline_command(args: argparse.Namespace) -> int:
    from nt_dist import pipeline

    if args.parallel < 1:
        raise UserError(f"--parallel: {args.parallel}: expected 1 or more")
    spec = pipeline.load_pipeline(args.file)
    stages = pipeline.expand(spec, seeds=args.seeds, extra=args.overrides, output_dir=args.out)
    launcher = args.launcher or spec.spec.launcher
    if args.dry_run:
        print(pipeline.describe_plan(stages, launcher))
        return 0
    if args.submit == "slurm":
        script = Path(args.sbatch_script) if args.sbatch_script else None
        jobs = pipeline.submit_slurm(spec, stages, launcher=launcher, script=script)
        print(f"{len(jobs)} jobs submitted (squeue --me); when they are done: nt-dist report {args.file}")
        return 0
    outcomes = pipeline.run(spec, stages, launcher=launcher, parallel=args.parallel)
    print(pipeline.summary(outcomes))
    if not args.no_report and any(o.status in ("ran", "skipped") for o in outcomes):
        _report_stages(spec, stages, None, log=True)
    return pipeline.exit_code(outcomes)


def _report_stages(spec: Any, stages: list[Any], out: Path | None, log: bool, paper: str | None = None) -> None:
    from nt_dist import pipeline, report

    stale = [s for s in stages if pipeline.is_stale(s)]
    if stale:
        say(f"nt-dist report: {len(stale)} stage(s) left out, stale (trained against a model that changed "
            f"since), e.g. {stale[0].name}; nt-dist pipeline {spec.path} trains them again")
    results, missing = report.from_stages([s for s in stages if s not in stale])
    if not results:
        raise UserError(f"{spec.path}: no stage has finished yet (nt-dist pipeline {spec.path} runs them)")
    if missing:
        say(f"nt-dist report: {len(missing)} of {len(stages)} stages have no result yet, e.g. {missing[0]}")
    enabled, uri = report.tracking_of(spec, stages)
    _write_report(results, spec.name, spec.spec.paper if paper is None else paper,
                  out or pipeline.output_root(stages) / "report", spec.experiment, uri if log and enabled else "")


def _write_report(results: list[Any], name: str, paper: str, folder: Path, experiment: str, uri: str) -> None:
    """The report's files, its tables on stdout, and (``uri`` set) a run holding them in MLflow."""
    from nt_dist import report

    text, files = report.report(results, name, paper, folder)
    print("\n" + text)
    if uri:
        run_id = report.log_to_mlflow(files, experiment, uri, name, paper, text)
        say(f"nt-dist report: {folder} (MLflow run {run_id})")
    else:
        say(f"nt-dist report: {folder}")


def audit_command(args: argparse.Namespace) -> int:
    from nt_dist import audit
    from nt_dist.quickstart import recipes_dir

    if args.parallel < 1:
        raise UserError(f"--parallel: {args.parallel}: expected 1 or more")
    if args.top_k < 1:
        raise UserError(f"--top-k: {args.top_k}: expected 1 or more")
    if args.stingy_k < 0:
        raise UserError(f"--stingy-k: {args.stingy_k}: expected 0 (the authors' share of the classes) or more")
    recipe = Path(args.recipe) if args.recipe else recipes_dir() / "digits_attack.yaml"
    if not recipe.is_file():
        raise UserError(f"--recipe: {recipe}: recipe file not found")
    plan = audit.AuditPlan(teacher=args.teacher, reference=args.reference, recipe=recipe,
                           attacks=audit.parse_attacks(args.attacks), kd_taus=tuple(args.kd_tau),
                           kd_alphas=tuple(args.kd_alpha), top_k=args.top_k, stingy_k=args.stingy_k,
                           defences=audit.parse_defences(args.defences), student=args.student,
                           seeds=tuple(args.seeds), out=Path(args.out), name=args.name, experiment=args.experiment,
                           threshold=args.threshold, overrides=tuple(args.overrides))
    return audit.run_audit(plan, parallel=args.parallel, launcher=args.launcher, dry_run=args.dry_run,
                           log=not args.no_mlflow)


def report_command(args: argparse.Namespace) -> int:
    from nt_dist import pipeline, report

    if bool(args.file) == bool(args.experiment):
        raise UserError("report: pass a pipeline file or --experiment NAME (one of them)")
    if args.file:
        spec = pipeline.load_pipeline(args.file)
        stages = pipeline.expand(spec, seeds=args.seeds, output_dir=args.pipeline_out)
        _report_stages(spec, stages, Path(args.out) if args.out else None, not args.no_mlflow, args.paper)
        return 0
    from nt_dist.config import TrackingConfig
    from nt_dist.tracking import tracking_uri

    uri = args.tracking_uri or tracking_uri(TrackingConfig())
    results, name, paper = report.from_mlflow(args.experiment, uri, args.table)
    _write_report(results, name, paper if args.paper is None else args.paper, Path(args.out or f"report-{name}"),
                  args.experiment, "" if args.no_mlflow else uri)
    return 0


def ui(host: str, port: int, db: Path, jobs: bool = False) -> int:
    """``mlflow ui`` over a SQLite store: one worker, MLflow's job runner off (it starts 8
    processes), run from the store's folder (artifact locations are relative to it), in a process
    group of its own that ends with nt-dist ui (:mod:`nt_dist.tracking_ui`); the addresses are
    printed once it answers."""
    from nt_dist.tracking import DEFAULT_ARTIFACTS, runs_page
    from nt_dist.tracking_ui import serve, url_host

    if not db.is_file():
        raise UserError(f"{db}: no MLflow store here yet (run nt-dist quickstart or a recipe first, "
                        "or pass --db)")
    if not 0 < port < 65536:
        raise UserError(f"--port: {port}: expected 1..65535")
    folder = db.resolve().parent
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db.resolve()}",
               "--default-artifact-root", (folder / DEFAULT_ARTIFACTS).as_uri(),
               "--host", host, "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if jobs else "false"}
    shown = url_host(host)
    lines = [f"MLflow UI on http://{shown}:{port}  (Ctrl-C to stop)"]
    for experiment_id, name in _experiments(db):
        lines.append(f"  {name}: http://{shown}:{port}/{runs_page(experiment_id)}")
    return serve(lambda: subprocess.Popen(command, env=env, cwd=folder, start_new_session=True),
                 folder, host, port, lines)


def _experiments(db: Path) -> list[tuple[str, str]]:
    """(id, name) of the store's live experiments, read with sqlite3 (no MLflow import: the UI
    starts in seconds); [] for a store this cannot read."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True, timeout=5) as connection:
            rows = connection.execute("SELECT experiment_id, name FROM experiments WHERE lifecycle_stage = 'active' "
                                      "AND name != 'Default' ORDER BY experiment_id").fetchall()
        connection.close()
    except sqlite3.Error:
        return []
    return [(str(i), str(n)) for i, n in rows]


if __name__ == "__main__":
    sys.exit(main())

"""``nt-dist``: the command line.

  nt-dist quickstart [--out DIR]            the five-run demo on the embedded digits
  nt-dist train RECIPE [--set k=v ...]      train in this process (multi-process: accelerate launch
                                            -m nt_dist.train RECIPE)
  nt-dist check RECIPE [--set k=v ...]      validate a recipe and print it resolved; trains nothing
  nt-dist data write-ffcv --dataset ...     write .beton files for the FFCV loader
  nt-dist ui [--port 5000]                  the MLflow UI over the embedded store, on 127.0.0.1

User mistakes end in one line on stderr (``nt-dist: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from nt_dist.errors import EXIT_INTERRUPTED, EXIT_RUN_ERROR, EXIT_USER_ERROR, RunError, UserError, error, say


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nt-dist", description="Nasty-teacher training on accelerate.")
    sub = parser.add_subparsers(dest="command", required=True)

    quick = sub.add_parser("quickstart", help="train normal/nasty teachers and three students on the embedded digits")
    quick.add_argument("--out", default="runs/quickstart", help="folder for the five runs and results.json")
    quick.add_argument("--fresh", action="store_true", help="retrain stages that already finished")
    quick.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a field in all five recipes (e.g. run.epochs=5)")

    for name, text in (("train", "train what a recipe describes, in this process"),
                       ("check", "validate a recipe and print it resolved (trains nothing)")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("recipe")
        cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    data = sub.add_parser("data", help="data set tools")
    data.add_argument("action", choices=["write-ffcv"])
    data.add_argument("rest", nargs=argparse.REMAINDER)

    ui = sub.add_parser("ui", help="MLflow UI over the embedded SQLite store (127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--db", default="mlflow.db", help="SQLite file written by runs in this folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "quickstart":
            from nt_dist.quickstart import run_quickstart

            run_quickstart(Path(args.out), args.overrides, fresh=args.fresh)
        elif args.command == "train":
            from nt_dist.train import main as train_main

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
            return ui(args.port, Path(args.db))
    except UserError as exc:
        error(str(exc))
        return EXIT_USER_ERROR
    except RunError as exc:
        error(str(exc))
        return EXIT_RUN_ERROR
    except KeyboardInterrupt:
        say("nt-dist: interrupted")
        return EXIT_INTERRUPTED
    return 0


def check(path: str, overrides: list[str]) -> int:
    """The validation ``train`` runs before it reads any data: schema, networks and image size,
    run folder, tracking store."""
    from nt_dist.config import load_recipe, recipe_to_dict
    from nt_dist.preflight import validate

    recipe = load_recipe(path, overrides)
    validate(recipe, path)
    print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end="")
    say(f"# {path}: valid")
    return 0


def ui(port: int, db: Path) -> int:
    if not db.is_file():
        raise UserError(f"{db}: no MLflow store here yet (run nt-dist quickstart or a recipe first, "
                        "or pass --db)")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db.resolve()}",
               "--default-artifact-root", (Path.cwd() / "mlartifacts").as_uri(),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    print(f"MLflow UI on http://127.0.0.1:{port}  (Ctrl-C to stop)", file=sys.stderr)
    try:
        return subprocess.call(command, env=os.environ.copy())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

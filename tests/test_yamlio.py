"""One YAML reader for recipes, pipeline files and run folders: a key given twice, aliases that
expand too far, a file that is no file, a file too large, each refused in one line naming the
file; and the pipeline file's own rules (unknown keys, sweep values) and run.name's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nt_dist.config import load_recipe, recipe_from_dict
from nt_dist.errors import UserError
from nt_dist.pipeline import load_pipeline
from nt_dist.yamlio import MAX_ALIAS_VALUES, MAX_BYTES, parse_yaml, read_yaml_file

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
NT_DIST = str(Path(sys.executable).with_name("nt-dist"))


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(load, *args) -> str:
    with pytest.raises(UserError) as info:
        load(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def cli_error(tmp_path: Path, *args: str) -> tuple[str, float]:
    """The one error line of ``nt-dist check ...`` (exit code 2) and how long it took."""
    start = time.monotonic()
    proc = subprocess.run([NT_DIST, "check", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0], elapsed


def billion_laughs() -> str:
    """Ten levels of nine aliases each: 10^9 strings once expanded, 700 bytes as text."""
    names = "abcdefghij"
    lines = ["a: &a [" + ", ".join(['"x"'] * 9) + "]"]
    lines += [f"{names[i]}: &{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * 9) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- keys given twice


def test_a_key_given_twice_in_a_recipe_names_the_dotted_key_and_both_lines(tmp_path: Path):
    text = "# a header\nrun:\n  name: x\noptim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n"
    path = write(tmp_path, text)
    assert error_of(load_recipe, path) == f"{path}: optim.lr is given twice (lines 5 and 7)"
    path = write(tmp_path, "optim: {lr: 0.1}\nrun: {name: x}\noptim: {momentum: 0.5}\n")
    assert error_of(load_recipe, path) == f"{path}: optim is given twice (lines 1 and 3)"


def test_a_key_given_twice_in_an_override_is_refused_and_an_alias_there_stays_text(tmp_path: Path):
    path = write(tmp_path, "run: {name: x}\n")
    assert error_of(load_recipe, path, ["tracking.tags={a: 1, a: 2}"]) == \
        "--set 'tracking.tags={a: 1, a: 2}': a is given twice (both on line 1)"
    assert load_recipe(path, ["run.name=*x"]).run.name == "*x"  # not YAML (an alias of nothing): the text as typed


def test_a_teacher_label_given_twice_in_a_pipeline_file(tmp_path: Path):
    teacher, nasty = RECIPES / "digits_teacher.yaml", RECIPES / "digits_nasty.yaml"
    path = write(tmp_path, f"pipeline: t\nteachers:\n  CNN normal: {{recipe: {teacher}}}\n  CNN other: "
                           f"{{recipe: {teacher}}}\n  CNN normal: {{recipe: {nasty}}}\n", "pipe.yaml")
    assert error_of(load_pipeline, path) == f"{path}: teachers.CNN normal is given twice (lines 3 and 5)"


# ----------------------------------------------------------------------------- aliases


def test_an_alias_bomb_is_refused_in_one_line_at_once(tmp_path: Path):
    path = write(tmp_path, billion_laughs(), "bomb.yaml")
    line, elapsed = cli_error(tmp_path, str(path))
    assert line == (f"nt-dist: error: {path}: line 2: YAML aliases (*a, ...) would add 4412961486 values; at most "
                    f"{MAX_ALIAS_VALUES} may come from aliases")
    assert elapsed < 10  # the whole process, torch's import included: nothing was expanded


def test_aliases_within_the_limit_are_expanded_and_one_inside_itself_is_refused(tmp_path: Path):
    anchored = "a: &a [" + ", ".join(["1"] * 100) + "]\n"  # 101 values; each alias of it adds 101
    tree = parse_yaml(anchored + "b: [" + ", ".join(["*a"] * 99) + "]\n", "x.yaml")
    assert len(tree["b"]) == 99 and tree["b"][98] == [1] * 100
    assert error_of(parse_yaml, anchored + "b: [" + ", ".join(["*a"] * 100) + "]\n", "x.yaml") == \
        f"x.yaml: line 2: YAML aliases (*a, ...) would add 10100 values; at most {MAX_ALIAS_VALUES} may come from aliases"
    assert error_of(parse_yaml, "a: 1\nb: &b [1, {c: *b}]\n", "x.yaml") == \
        "x.yaml: line 2: the YAML alias *b lies inside its own anchor &b"
    # a merge key's values may be overridden: not a key given twice
    path = write(tmp_path, "base: &b {lr: 0.1, momentum: 0.5}\noptim:\n  <<: *b\n  lr: 0.2\n")
    assert read_yaml_file(path)[0]["optim"] == {"lr": 0.2, "momentum": 0.5}


def test_a_pipeline_file_written_by_yaml_safe_dump_with_a_shared_entry_loads(tmp_path: Path):
    entry = {"recipe": str(RECIPES / "digits_teacher.yaml")}
    path = write(tmp_path, yaml.safe_dump({"pipeline": "t", "teachers": {"A": entry, "B": entry}}), "pipe.yaml")
    assert "*id001" in path.read_text()  # PyYAML's own alias for the dict given twice
    assert list(load_pipeline(path).spec.teachers) == ["A", "B"]


# ----------------------------------------------------------------------------- files that are no recipe


@pytest.mark.parametrize("kind", ["FIFO", "character device"])
def test_a_path_that_is_no_regular_file_is_refused_without_reading(tmp_path: Path, kind: str):
    if kind == "FIFO":
        path = tmp_path / "recipe.yaml"
        os.mkfifo(path)  # nobody writes: an open() for reading would wait for ever
    else:
        path = Path("/dev/zero")  # read() never ends
    line, _ = cli_error(tmp_path, str(path))
    assert line == f"nt-dist: error: {path}: not a regular file (a {kind}); a recipe is a YAML file"


def test_a_file_over_one_mebibyte_is_refused(tmp_path: Path):
    path = write(tmp_path, "#" * MAX_BYTES + "\n")
    assert error_of(load_recipe, path) == f"{path}: {MAX_BYTES + 1} bytes; a recipe file is at most 1 MiB"
    write(tmp_path, "#" * (MAX_BYTES - 1) + "\n")
    assert load_recipe(path).run.name == "run"  # exactly 1 MiB is read


def test_characters_yaml_refuses_and_nesting_too_deep_are_one_line(tmp_path: Path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"run: {name: a\x00}\n")
    assert error_of(load_recipe, path) == f"{path}: unreadable YAML: special character U+0000 at character 14"
    path.write_text("[" * 5000)
    assert error_of(load_recipe, path) == f"{path}: unreadable YAML: nested too deeply"


@pytest.mark.parametrize("what, make, expected", [
    ("recipe", lambda p: None, "recipe file not found"),
    ("recipe", lambda p: p.mkdir(), "is a folder, not a recipe file"),
    ("pipeline file", lambda p: None, "pipeline file not found"),
    ("pipeline file", lambda p: p.mkdir(), "is a folder, not a pipeline file"),
    ("pipeline file", lambda p: p.write_bytes(b"pipeline: caf\xe9\n"), "not UTF-8 text (byte 13); a pipeline file is "
                                                                       "a YAML file"),
    ("pipeline file", lambda p: p.write_text("pipeline: [t\n"),
     "unreadable YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
])
def test_the_old_wordings_stay_and_name_the_kind_of_file(tmp_path: Path, what: str, make, expected: str):
    path = tmp_path / "file.yaml"
    make(path)
    assert error_of(read_yaml_file, path, what) == f"{path}: {expected}"


def test_the_text_comes_back_with_the_tree(tmp_path: Path):
    assert read_yaml_file(write(tmp_path, "# about\nrun: {name: x}\n")) == ({"run": {"name": "x"}},
                                                                          "# about\nrun: {name: x}\n")


# ----------------------------------------------------------------------------- pipeline files


def pipeline_file(tmp_path: Path, extra: str) -> Path:
    return write(tmp_path, f"pipeline: t\nteachers:\n  T: {{recipe: {RECIPES / 'digits_teacher.yaml'}}}\n{extra}",
                 "pipe.yaml")


@pytest.mark.parametrize("extra, expected", [
    ("colour: 1\n", "colour: unknown key; expected one of: pipeline, paper, experiment, output_dir, launcher, seeds, "
                    "set, teachers, nasty, defences, students, sweep, slurm"),
    (f"students:\n  S: {{recipe: {RECIPES / 'digits_student.yaml'}, recpie: x}}\n",
     "students.S.recpie: unknown key; expected one of: recipe, set, baseline, self, teachers"),
    ("sweep:\n  nasty.omega: {values: [1], colour: 2}\n",
     "sweep.nasty.omega.colour: unknown key; expected one of: values, stages"),
])
def test_an_unknown_key_in_a_pipeline_file_reads_like_the_recipes(tmp_path: Path, extra: str, expected: str):
    path = pipeline_file(tmp_path, extra)
    assert error_of(load_pipeline, path) == f"{path}: {expected}"


@pytest.mark.parametrize("sweep, expected", [
    ("distill.tau: [0.01, abc, {x: 1}]", "sweep.distill.tau: value 3 is a mapping; a sweep value is one number, "
                                         "text or true/false"),
    ("optim.milestones: {values: [[1, 2]]}", "sweep.optim.milestones: value 1 is a list; a sweep value is one "
                                             "number, text or true/false"),
    ("nasty.omega: [1, 2, -1]", "sweep.nasty.omega: values 1 and -1 would share the folder name '1'"),
    ("run.name: [A b, a-b]", "sweep.run.name: values 'A b' and 'a-b' would share the folder name 'a-b'"),
])
def test_sweep_values_are_single_values_with_distinct_folder_names(tmp_path: Path, sweep: str, expected: str):
    path = pipeline_file(tmp_path, f"sweep:\n  {sweep}\n")
    assert error_of(load_pipeline, path) == f"{path}: {expected}"


# ----------------------------------------------------------------------------- run.name


@pytest.mark.parametrize("escaped, code, position", [("ab\\ncd", "000A", 3), ("\\0", "0000", 1),
                                                     ("safe\\u202eexe.txt", "202E", 5)])
def test_a_run_name_with_a_control_character_is_refused(tmp_path: Path, escaped: str, code: str, position: int):
    path = write(tmp_path, f'run:\n  name: "{escaped}"\n')
    assert error_of(load_recipe, path) == (f"{path}: run.name: contains a control character (U+{code} at position "
                                           f"{position}); a run name is one line of printable text")


def test_a_run_name_of_printable_unicode_is_kept():
    assert recipe_from_dict({"run": {"name": "CNN – ω=0.1 ✓ 教師"}}).run.name == "CNN – ω=0.1 ✓ 教師"
    assert "U+2066" in error_of(recipe_from_dict, {"run": {"name": "a\u2066b"}})

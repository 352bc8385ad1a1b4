"""The built metadata lets the package install next to any recent torch.

The wheel is built the way a user's pip builds it (``pip wheel``, no dependencies, no network),
from a copy of the source tree so that no build/ or *.egg-info lands in the repository. torch and
torchvision must carry a lower bound and nothing that excludes newer releases: an exact pin would
make pip replace the torch a machine already has (a multi-GB download, or a refusal where no
registry is reachable)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "nt_dist", "recipes")
UNBOUNDED = {"torch", "torchvision"}


def _data_files() -> list[tuple[str, str]]:
    """(destination folder, source file) pairs of setup.cfg's [options.data_files]."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    if not config.has_section("options.data_files"):
        return []
    return [(dest, line.strip()) for dest, value in config["options.data_files"].items()
            for line in value.splitlines() if line.strip()]


def test_data_files_exist():
    files = [name for _, name in _data_files()]
    assert files, "setup.cfg lists no [options.data_files]"
    missing = [name for name in files if not (ROOT / name).is_file()]
    assert not missing, f"setup.cfg's data_files name files that do not exist: {missing}"
    outside = [name for name in files if Path(name).parts[0] not in SOURCES]
    assert not outside, f"test_packaging copies only {SOURCES}; also copy the folders of {outside}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("packaging")
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    dist = work / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", str(src), "-w", str(dist)],
        capture_output=True, text=True, timeout=300, cwd=work,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(dist.glob("nt_dist-*.whl"))
    assert len(wheels) == 1, f"expected one nt_dist wheel in {dist}: {list(dist.iterdir())}"
    return wheels[0]


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        assert len(names) == 1, names
        return zf.read(names[0]).decode()


def test_torch_and_torchvision_have_lower_bounds_only(wheel):
    requires = [Requirement(line.split(":", 1)[1].strip())
                for line in _metadata(wheel).splitlines() if line.startswith("Requires-Dist:")]
    core = {req.name.lower(): req for req in requires if req.marker is None}
    for name in sorted(UNBOUNDED):
        assert name in core, f"{name} missing from Requires-Dist: {[str(r) for r in requires]}"
    for req in requires:
        if req.name.lower() not in UNBOUNDED:
            continue
        operators = {spec.operator for spec in req.specifier}
        bad = operators & {"==", "===", "~=", "<", "<="}
        assert not bad, f"{req}: {sorted(bad)} would make pip replace an installed torch; state a lower bound only"
        assert ">=" in operators, f"{req}: needs a lower bound (>=) on the oldest version known to work"
    for spec in core["torch"].specifier:
        assert spec.contains("2.14.1"), f"torch {spec} excludes 2.14.1, the version the Makefile installs"
    for spec in core["torchvision"].specifier:
        assert spec.contains("0.29.1"), f"torchvision {spec} excludes 0.29.1, the version the Makefile installs"


def test_data_files_are_in_the_wheel(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    for dest, name in _data_files():
        inside = f".data/data/{dest}/{Path(name).name}"
        assert any(n.endswith(inside) for n in names), f"{name} not in {wheel.name} (as *{inside})"


def test_every_recipe_and_pipeline_file_is_installed():
    listed = {name for _, name in _data_files()}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")}
    assert on_disk <= listed, f"recipes missing from setup.cfg's data_files: {sorted(on_disk - listed)}"
    for dest, name in _data_files():
        assert dest == str(Path("share/nt_dist") / Path(name).parent), (dest, name)  # the tree is kept


def test_the_papers_tables_are_in_the_wheel(wheel):
    with zipfile.ZipFile(wheel) as zf:
        assert "nt_dist/paper_tables.yaml" in zf.namelist()

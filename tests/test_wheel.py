"""The package's shape: the library never imports the command layer, the entry points stay shims,
and the wheel holds medsynth alone with its configs (CI also installs it: .ci/wheel_check.sh)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medsynth"


def test_library_does_not_import_the_command_layer() -> None:
    """No module under medsynth/ imports `pipelines` (the shims import the library, never the reverse)."""
    importing = re.compile(r"^\s*(from\s+pipelines(\.|\s)|import\s+pipelines\b)", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if importing.search(p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("script", sorted((ROOT / "pipelines").glob("*.py")), ids=lambda p: p.name)
def test_entry_points_are_short_shims(script: Path) -> None:
    """Each pipelines/*.py is a short entry point that hands over to medsynth.cli."""
    text = script.read_text()
    assert len(text.splitlines()) <= 60
    assert "from medsynth.cli import hydra_entry" in text


def test_wheel_package_list_matches_the_source_tree() -> None:
    """pyproject.toml lists every package under medsynth/ (a new subpackage left out would be missing from the wheel)."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"medsynth.conf"}
    assert setuptools["package-dir"] == {"medsynth.conf": "conf"}


def test_wheel_holds_medsynth_and_its_configs(tmp_path: Path) -> None:
    """The built wheel has one top-level name, medsynth, with every YAML config under medsynth/conf."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("medsynth", "conf", "pipelines"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, source / file)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w",
         str(tmp_path / "dist")], capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("medsynth-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"medsynth"}
    configs = {f"medsynth/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= set(names)
    modules = {f"{p.relative_to(ROOT).as_posix()}" for p in PACKAGE.rglob("*.py")}
    assert modules <= set(names)

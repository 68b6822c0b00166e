"""The documentation site: the generated CLI reference covers every command, config group, option,
key and preset, and the API reference has a page for every package.

The site itself is built with ``mkdocs build --strict`` by ``make docs`` (and ``make test``); these
tests call the generator that build uses (docs/hooks.py) without needing mkdocs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from medsynth.cli import STAGES
from medsynth.config import config_dir

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "experiment"


def _load_hooks() -> Any:
    spec = importlib.util.spec_from_file_location("medsynth_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return _load_hooks().reference_pages()


def _options(group: str) -> list[Path]:
    return sorted((config_dir() / group).glob("*.yaml"))


def _groups() -> list[str]:
    return sorted(d.name for d in config_dir().iterdir() if d.is_dir() and any(d.glob("*.yaml")))


def test_every_stage_and_verify_has_a_section(pages: dict[str, str]) -> None:
    commands = pages["commands.md"]
    for stage in STAGES:
        assert f"{{#{stage}}}" in commands, stage
        assert f"medsynth {stage} [key=value ...]" in commands
    assert "{#verify}" in commands
    assert "[`medsynth.train`][medsynth.stages.train.train]" in commands
    assert "[`trainer`](config.md#trainer)" in commands  # what train reads, from medsynth.cli's dispatch


def test_every_group_option_and_key_is_listed_with_its_default(pages: dict[str, str]) -> None:
    config = pages["config.md"]
    groups = [g for g in _groups() if g != EXPERIMENT]
    assert groups
    for group in groups:
        assert f"{{#{group}}}" in config, group
        for file in _options(group):
            assert f"### `{group}={file.stem}` {{#{group}-{file.stem.replace('_', '-')}}}" in config
            body = yaml.safe_load(file.read_text()) or {}
            for key in body:
                if key != "defaults":
                    assert f"| `{group}.{key}" in config, f"{group}.{key} ({file.name})"
    trainer = yaml.safe_load((config_dir() / "trainer" / "default.yaml").read_text())
    assert f"| `trainer.max_steps` | `{trainer['max_steps']}` | an integer |" in config
    assert "| `data.image` | required (`???`) |" in config  # data=nifti must be given its image
    assert "| `name` | `medsynth` | a string |" in config  # the top level


def test_key_comments_and_links_come_from_conf(pages: dict[str, str]) -> None:
    config = pages["config.md"]
    assert "| `generate.steps` | `50` | an integer | sampler steps |" in config
    # a pipe in a comment stays inside its cell; docs/NAME.md mentions become links
    assert r"fp32 \| bf16 \| fp16 autocast" in config
    assert "[docs/own-data.md](../../own-data.md)" in config


def test_every_preset_has_a_section(pages: dict[str, str]) -> None:
    presets = pages["presets.md"]
    for file in _options(EXPERIMENT):
        assert f"{{#{file.stem.replace('_', '-')}}}" in presets, file.stem
    assert "[`data=demo_cohort`](config.md#data-demo-cohort)" in presets


def test_default_config_page_is_the_composed_config(pages: dict[str, str]) -> None:
    text = pages["default-config.md"]
    composed = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert set(composed) >= {g for g in _groups() if g != EXPERIMENT} | {"name", "seed", "device"}
    assert composed["name"] == "demo"  # the default preset applied


def test_api_reference_has_a_page_for_every_package(pages: dict[str, str]) -> None:
    tomllib = pytest.importorskip("tomllib")
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    api = ROOT / "docs" / "reference" / "api"
    directives = {line.split()[1] for page in api.glob("*.md") for line in page.read_text().splitlines()
                  if line.startswith("::: ")}
    missing = [p for p in packages if p != "medsynth.conf" and p not in directives]
    assert not missing, f"no API reference page renders {missing}: add one under docs/reference/api/ and to the nav"

    def nav_files(entries: Any) -> list[str]:
        if isinstance(entries, str):
            return [entries]
        if isinstance(entries, list):
            return [f for e in entries for f in nav_files(e)]
        if isinstance(entries, dict):
            return [f for v in entries.values() for f in nav_files(v)]
        return []

    nav = nav_files(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    for page in api.glob("*.md"):
        assert f"reference/api/{page.name}" in nav, page.name
    for page in pages:
        assert f"reference/cli/{page}" in nav, page

"""The command line: stages dispatch, and bad input ends with one clear message and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, phantom_overrides, write_phantom

ROOT = Path(__file__).resolve().parents[1]


def medsynth(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``medsynth`` as a user would, in ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MEDSYNTH_DEBUG", "HYDRA_FULL_ERROR")}
    return subprocess.run(
        [sys.executable, "-m", "medsynth.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_help_lists_stages(tmp_path: Path) -> None:
    result = medsynth("--help", cwd=tmp_path)
    assert result.returncode == 0
    for stage in ("preprocess", "train", "generate", "evaluate", "run"):
        assert stage in result.stdout


def test_unknown_stage(tmp_path: Path) -> None:
    result = medsynth("trian", cwd=tmp_path)
    assert result.returncode == 2 and "unknown stage 'trian'" in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [("experiment=no_such_preset", "Could not find 'experiment/no_such_preset'"), ("trainer.no_such_key=1", "trainer.no_such_key")],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, override: str, message: str) -> None:
    result = medsynth("train", override, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_inputs_are_named_and_nothing_written_is_corrupted(tmp_path: Path) -> None:
    """A missing file or a label map on another grid names the file; the earlier dataset stays intact."""
    image, label = write_phantom(tmp_path / "raw")
    common = [*TINY, f"paths.output={tmp_path / 'out'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    ok = medsynth("preprocess", *common, *phantom_overrides(image, label), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    manifest = tmp_path / "out" / "data" / "manifest.json"
    before = manifest.read_bytes()

    missing = medsynth("preprocess", *common, *phantom_overrides(image, tmp_path / "nope.nii.gz"), cwd=tmp_path)
    assert missing.returncode == 2
    assert "nope.nii.gz" in missing.stderr and "Traceback" not in missing.stderr

    _, other = write_phantom(tmp_path / "other", shape=(40, 44, 50))
    mismatch = medsynth("preprocess", *common, *phantom_overrides(image, other), cwd=tmp_path)
    assert mismatch.returncode == 2
    assert str(other) in mismatch.stderr and "shape" in mismatch.stderr and "Traceback" not in mismatch.stderr

    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file")
    junk = medsynth("preprocess", *common, *phantom_overrides(image, tmp_path / "junk.nii.gz"), cwd=tmp_path)
    assert junk.returncode == 2 and "junk.nii.gz" in junk.stderr and "Traceback" not in junk.stderr

    assert manifest.read_bytes() == before


def test_train_before_preprocess_says_what_to_do(tmp_path: Path) -> None:
    result = medsynth("train", *TINY, f"paths.output={tmp_path / 'empty'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "medsynth preprocess" in result.stderr and "Traceback" not in result.stderr

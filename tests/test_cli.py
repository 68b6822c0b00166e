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


def pipeline_script(stage: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python pipelines/<stage>.py`` as a user would, in ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MEDSYNTH_DEBUG", "HYDRA_FULL_ERROR")}
    return subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / f"{stage}.py"), *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=300,
    )


def test_help_lists_stages(tmp_path: Path) -> None:
    result = medsynth("--help", cwd=tmp_path)
    assert result.returncode == 0
    for stage in ("preprocess", "train", "generate", "evaluate", "run"):
        assert stage in result.stdout
    presets = next(line for line in result.stdout.splitlines() if line.startswith("presets (experiment=NAME): "))
    assert presets.split(": ", 1)[1].split(", ") == sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    assert "Docs: README.md and docs/" in result.stdout


def test_unknown_stage(tmp_path: Path) -> None:
    result = medsynth("trian", cwd=tmp_path)
    assert result.returncode == 2 and "unknown stage 'trian'" in result.stderr


# (overrides, what the one-line message must say: the key, and part of what it accepts)
CONFIG_MISTAKES = [
    (["experiment=no_such_preset"], ["experiment=no_such_preset", "brain2d_class_gpu", "demo"]),
    (["data=foo"], ["data=foo", "nnunet", "dicom"]),
    (["trainer.no_such_key=1"], ["trainer.no_such_key", "max_steps"]),
    (["data.intensity.no_such_key=1"], ["data.intensity.no_such_key", "lower"]),
    (["no_such_group.key=1"], ["no_such_group", "trainer"]),
    (["trainer.max_steps=many"], ["trainer.max_steps", "an integer"]),
    (["generate.steps=-5"], ["generate.steps", ">= 1"]),
    (["trainer.max_steps=0"], ["trainer.max_steps", ">= 1"]),
    (["generate.guidance_scale=-1.0"], ["generate.guidance_scale", ">= 0"]),
    (["model.conditioning=mask_and_class"], ["model.conditioning", "'joint'"]),
    (["scheduler=rflow", "generate.sampler=ddim"], ["generate.sampler", "rflow"]),
    (["device=gpu"], ["device", "cuda"]),
]


# every mistake through `medsynth`, a few kinds through the pipelines/ shim (each case is a process start)
CASES = [("medsynth", *case) for case in CONFIG_MISTAKES] + [("pipelines", *CONFIG_MISTAKES[i]) for i in (1, 2, 6, 10)]


@pytest.mark.parametrize(("entry", "overrides", "says"), CASES, ids=[f"{e}: {' '.join(o)}" for e, o, _ in CASES])
def test_config_mistake_is_one_line_before_any_work(tmp_path: Path, entry: str, overrides: list[str], says: list[str]) -> None:
    """A typo, a wrong type or a bad value: one line naming the key, exit status 2, nothing read or written."""
    work = tmp_path / "work"
    work.mkdir()
    args = [*TINY, f"paths.output={tmp_path / 'out'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}", *overrides]
    result = medsynth("train", *args, cwd=work) if entry == "medsynth" else pipeline_script("train", *args, cwd=work)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("medsynth train: error: "), result.stderr
    for text in says:
        assert text in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()
    assert list(work.iterdir()) == []


def test_hydra_flags_still_work(tmp_path: Path) -> None:
    """Hydra's own flags pass through: `--cfg job` prints the composed config with the overrides."""
    result = medsynth("train", "--cfg", "job", "trainer.max_steps=7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max_steps: 7" in result.stdout
    script = pipeline_script("generate", "--cfg", "job", "generate.num_samples=7", cwd=tmp_path)
    assert script.returncode == 0 and "num_samples: 7" in script.stdout


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


def test_the_log_holds_medsynth_not_library_chatter(tmp_path: Path) -> None:
    """A pipeline writing DICOM logs medsynth's own lines; highdicom's INFO records ("copy attributes of
    module ...", many per volume) stay out unless MEDSYNTH_LIBRARY_LOGS=1 asks for them."""
    image, label = write_phantom(tmp_path)
    args = ["run", *TINY, *phantom_overrides(image, label), "generate.formats=[nifti,dicom]", "generate.num_samples=2",
            "mlflow.tracking_uri=sqlite:///mlflow.db", "progress=false"]
    result = medsynth(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    assert any("[medsynth][INFO] - generate:" in line for line in lines)
    assert not [line for line in lines if "[highdicom" in line], "highdicom INFO records reached the log"
    # generate alone writes the DICOM series, from the model the run trained, into a folder of its own
    env_result = subprocess.run(
        [sys.executable, "-m", "medsynth.cli", "generate", *args[1:], f"paths.synthetic={tmp_path / 'verbose'}"], cwd=tmp_path,
        capture_output=True, text=True, timeout=300, env={**os.environ, "MEDSYNTH_LIBRARY_LOGS": "1"})
    assert env_result.returncode == 0, env_result.stderr[-3000:]
    assert any("[highdicom" in line for line in (env_result.stdout + env_result.stderr).splitlines())

"""Shared fixtures: compose the real configs with tiny overrides, and small NIfTI inputs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from medsynth.config import PipelineSettings, compose
from medsynth.io import save_nifti

# 8-channel network, 16x16 slices, 10 timesteps: every stage runs on a CPU in seconds. The data and
# conditioning are the one-brain, label-map-conditioned setting (experiment=demo_train_labels), which
# the tests build on; tests of the default demo (a cohort, joint generation) say so.
TINY = [
    "data=demo",
    "model.conditioning=mask",
    "generate.labels.source=train",
    "model.network.channels=[8,8]",
    "model.network.attention_levels=[false,true]",
    "model.network.num_head_channels=8",
    "model.network.norm_num_groups=8",
    "scheduler.num_train_timesteps=10",
    "data.size=[16,16]",
    "data.splits.block=2",
    "data.splits.gap=1",
    "trainer.max_steps=3",
    "trainer.batch_size=4",
    "trainer.warmup_steps=1",
    "trainer.grid.num=2",
    "trainer.grid.steps=2",
    "progress=false",
    "generate.steps=3",
    "generate.num_samples=5",
    "generate.batch_size=3",
    "evaluate.sheet_rows=3",
    "encoder.channels=[8,16]",
    "encoder.steps=3",
    "encoder.batch_size=8",
    "evaluate.segmenter.channels=[8,16]",
    "evaluate.segmenter.steps=3",
    "evaluate.segmenter.batch_size=4",
    "evaluate.membership.timesteps=[2,5]",
]
SETTING = TINY[:3]
"""The data and conditioning pins of :data:`TINY`; ``tiny_config`` leaves them out when a test picks a preset."""


NO_SKIPS = "MEDSYNTH_NO_SKIPS"
"""Set to 1 (``.ci/run`` does): a test that skips fails instead, so CI proves every real service started."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    _no_skip(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _no_skip(outcome.get_result())  # type: ignore[attr-defined]


def _no_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if os.environ.get(NO_SKIPS) == "1" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but {NO_SKIPS}=1 lets nothing skip: {report.longrepr}"


def compose_config(overrides: list[str] | None = None) -> PipelineSettings:
    """Compose ``conf/config.yaml`` with Hydra's compose API and check it into typed settings."""
    return compose(list(overrides or []))


def run_stage(stage: str, settings: PipelineSettings) -> object:
    """Call the library function of ``stage`` (preprocess, train, generate, evaluate, run) as the command line does."""
    from medsynth.cli import _call

    return _call(stage, settings)


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., PipelineSettings]:
    """Factory: the real config with tiny overrides, writing under ``tmp_path`` and tracking to a temporary MLflow store."""

    def make(*overrides: str) -> PipelineSettings:
        preset = any(o.startswith("experiment=") for o in overrides)
        return compose_config([
            *(o for o in TINY if not (preset and o in SETTING)),
            f"paths.output={tmp_path / 'out'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *overrides,
        ])

    return make


def write_phantom(folder: Path, *, shape: tuple[int, int, int] = (40, 44, 48), seed: int = 0) -> tuple[Path, Path]:
    """A small NIfTI image and 3-class label map (nested ellipsoids with texture) on a 2 mm grid."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[r < 0.9] = 1
    label[r < 0.6] = 2
    image = np.where(label == 2, 0.8, np.where(label == 1, 0.4, 0.0)) + 0.05 * rng.standard_normal(shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-40.0, -44.0, -48.0]
    image_path = save_nifti(folder / "phantom.nii.gz", image.astype(np.float32), affine)
    label_path = save_nifti(folder / "phantom_label.nii.gz", label, affine, dtype=np.uint8)
    return image_path, label_path


@pytest.fixture
def phantom(tmp_path: Path) -> tuple[Path, Path]:
    """Paths of a small phantom image and its label map under ``tmp_path/raw``."""
    return write_phantom(tmp_path / "raw")


def phantom_overrides(image: Path, label: Path) -> list[str]:
    """Overrides that point ``data=nifti`` at a phantom written by :func:`write_phantom`."""
    return [
        "data=nifti",
        f"data.image={image}",
        f"data.label={label}",
        "data.label_names=[background,outer,inner]",
        "data.spacing=[4.0,4.0,2.0]",
    ]


def write_volume_dataset(data_dir: Path, *, size: int = 16, cases: int = 6, seed: int = 0) -> None:
    """A preprocessed 3D dataset of phantom volumes (``size``^3, 3 labels, a ``level`` attribute) written directly."""
    from medsynth.data import Manifest, Record, write_record

    records = []
    for i in range(cases):
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
        r = np.sqrt(((grid - 0.1 * (i % 3)) ** 2).sum(0))
        label = (r < 0.9).astype(np.uint8) + (r < 0.5)
        image = (0.4 * label + 0.05 * np.random.default_rng(seed + i).standard_normal(label.shape)).clip(0, 1)
        split = "train" if i < cases - 2 else ("validation" if i == cases - 2 else "holdout")
        file, digest = write_record(data_dir, f"case{i}", image[None].astype(np.float32), label[None])
        records.append(Record(f"case{i}", f"case{i}", split, file, [size] * 3, [2.0] * 3, np.eye(4).tolist(), digest,
                              attributes={"level": str(1 + i % 2)}))
    Manifest(data_dir, 3, ["background", "outer", "inner"], records).write()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: a real small file system, to fill or to mount read-only: a fresh tmpfs of ``size``
    (e.g. ``"256k"``) under ``tmp_path``, unmounted after the test. Mounting needs root or
    CAP_SYS_ADMIN; where it is refused the test skips and says why."""
    mounted: list[Path] = []

    def make(size: str, *, read_only: bool = False) -> Path:
        folder = tmp_path / f"fs{len(mounted)}"
        folder.mkdir()
        try:
            options = ",".join([f"size={size}", "mode=0777", *(["ro"] if read_only else [])])
            subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True, capture_output=True,
                           text=True)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN, which CI has): {detail.strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)

"""Patient-level differentially private training (``trainer.privacy``): accounting, clipping,
training, resume, refusals, and the DP record in every output."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medsynth import ConfigError, MedsynthError
from medsynth.config import PipelineSettings
from medsynth.data import Manifest, Record, write_record
from medsynth.data.dataset import LabelledArrays
from medsynth.diffusion.generator import build_denoiser, build_scheduler
from medsynth.training import load_checkpoint, save_checkpoint
from medsynth.training.dp_sgd import (
    PatientBatch,
    _Forward,
    clip_and_sum,
    noised_inputs,
    patient_batches,
    patient_gradients,
    private_gradient,
)
from medsynth.training.loop import train as fit
from medsynth.training.privacy import (
    PatientAccountant,
    calibrate_noise,
    check_private_model,
    check_private_run,
    checkpoint_privacy,
    patient_groups,
    read_privacy,
)
from tests.conftest import run_stage

DP = ["trainer.privacy.enabled=true", "trainer.privacy.min_patients=4", "trainer.privacy.expected_batch_patients=3",
      "trainer.privacy.records_per_patient=2", "trainer.privacy.target_epsilon=50", "trainer.grid.num=0"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Per-patient gradients are many small operations: one thread avoids contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_patients(data_dir: Path, *, patients: int = 10, slices: int = 3, size: int = 16, seed: int = 0) -> None:
    """A 2D dataset of ``patients`` phantom patients with ``slices`` records each; two more for validation and holdout."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 2, indexing="ij"))
    records = []
    for i in range(patients + 2):
        split = "train" if i < patients else ("validation" if i == patients else "holdout")
        for k in range(slices):
            r = np.sqrt(((grid - 0.1 * ((i + k) % 3)) ** 2).sum(0))
            label = (r < 0.9).astype(np.uint8) + (r < 0.5)
            image = (0.4 * label + 0.05 * rng.standard_normal(label.shape)).clip(0, 1)
            file, digest = write_record(data_dir, f"p{i:02d}_{k}", image[None].astype(np.float32), label[None])
            records.append(Record(f"p{i:02d}_{k}", f"p{i:02d}", split, file, [size, size], [2.0, 2.0, 2.0],
                                  np.eye(4).tolist(), digest, slice_index=k))
    Manifest(data_dir, 2, ["background", "outer", "inner"], records).write()


@pytest.fixture
def dp_config(tiny_config: Callable[..., PipelineSettings]) -> Callable[..., PipelineSettings]:
    """Factory: the tiny config on a 10-patient phantom dataset (written once), DP on unless ``private=False``."""

    def make(*overrides: str, private: bool = True, patients: int = 10) -> PipelineSettings:
        settings = tiny_config(*(DP if private else []), *overrides)
        if not (Path(settings.paths.data) / "manifest.json").is_file():
            write_patients(Path(settings.paths.data), patients=patients)
        return settings

    return make


def _one_line(err: pytest.ExceptionInfo[Exception]) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


# ------------------------------------------------------------------------------------ accounting


def test_accountant_matches_opacus_and_calibrated_noise_meets_target() -> None:
    from opacus.accountants import RDPAccountant

    ours = PatientAccountant(noise_multiplier=1.1, sample_rate=0.05)
    reference = RDPAccountant()
    for _ in range(120):
        ours.step()
        reference.step(noise_multiplier=1.1, sample_rate=0.05)
    assert ours.steps == 120
    assert ours.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    resumed = PatientAccountant(noise_multiplier=1.1, sample_rate=0.05, steps=120)
    assert resumed.epsilon(1e-5) == pytest.approx(ours.epsilon(1e-5), rel=1e-12)

    sigma = calibrate_noise(target_epsilon=4.0, delta=1e-4, sample_rate=0.08, steps=300)
    spent = PatientAccountant(noise_multiplier=sigma, sample_rate=0.08, steps=300).epsilon(1e-4)
    assert 0.95 * 4.0 <= spent <= 4.0
    # less noise would overspend: the calibration is tight
    assert PatientAccountant(noise_multiplier=0.9 * sigma, sample_rate=0.08, steps=300).epsilon(1e-4) > 4.0


# ------------------------------------------------------------------------------------- clipping


def _tiny_denoiser(tiny_config: Callable[..., PipelineSettings]) -> tuple[nn.Module, object]:
    settings = tiny_config()
    torch.manual_seed(0)
    return build_denoiser(settings.model, num_classes=3, vocabulary={}), build_scheduler(settings.scheduler)


def test_an_extreme_patient_contributes_at_most_the_clipping_norm(tiny_config: Callable[..., PipelineSettings]) -> None:
    model, scheduler = _tiny_denoiser(tiny_config)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 1, 16, 16, generator=gen)
    images[0] = 1e3 * torch.randn(2, 1, 16, 16, generator=gen)  # a patient with extreme images
    labels = torch.randint(0, 3, (3, 2, 1, 16, 16), generator=gen)
    weights = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])  # the third patient has one record (padding)
    batch = PatientBatch(images, labels, torch.zeros(3, 2, 0, dtype=torch.long), weights)
    inputs = noised_inputs(model, scheduler, batch, seed=0, draw=1, device=torch.device("cpu"))
    grads, _ = patient_gradients(model, inputs)
    C = 0.5
    summed, norms = clip_and_sum(grads, max_grad_norm=C)
    assert norms[0] > 100 * C  # unclipped, the extreme patient would dominate

    # each patient's gradient by ordinary autograd over its own records, clipped by hand
    forward, expected = _Forward(model), {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for p in range(3):
        model.zero_grad()
        prediction = forward(inputs.x_t[p], inputs.t[p], inputs.condition[p])
        errors = (prediction - inputs.target[p]).pow(2).flatten(1).mean(1)
        (errors * inputs.weights[p]).sum().backward()
        g = {n: q.grad.clone() for n, q in model.named_parameters()}
        norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        assert norm == pytest.approx(float(norms[p]), rel=1e-4)
        clipped = {n: v * min(1.0, C / (float(norm) + 1e-6)) for n, v in g.items()}
        assert float(torch.sqrt(sum((v**2).sum() for v in clipped.values()))) <= C + 1e-5
        for n, v in clipped.items():
            expected[n] += v
    one = {n: g[:1] for n, g in grads.items()}
    alone, _ = clip_and_sum(one, max_grad_norm=C)
    assert float(torch.sqrt(sum((v**2).sum() for v in alone.values()))) <= C + 1e-5
    for n in expected:
        torch.testing.assert_close(summed[n], expected[n], rtol=1e-4, atol=1e-6)


def test_noise_and_average_over_expected_patients(tiny_config: Callable[..., PipelineSettings]) -> None:
    model, scheduler = _tiny_denoiser(tiny_config)
    empty = PatientBatch(torch.zeros(0, 0, 1, 16, 16), torch.zeros(0, 0, 1, 16, 16, dtype=torch.long),
                         torch.zeros(0, 0, 0, dtype=torch.long), torch.zeros(0, 0))
    step = private_gradient(model, scheduler, noise_multiplier=2.0, max_grad_norm=0.5, expected_patients=4.0, seed=0,
                            device=torch.device("cpu"))
    loss, count = step(model, empty, 1)
    assert math.isnan(loss) and count == 0  # no patient sampled: the step is pure noise
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 4.0, rel=0.05)


def test_poisson_patients_and_record_cap() -> None:
    data = LabelledArrays(torch.arange(12.0).view(12, 1, 1, 1), torch.zeros(12, 1, 1, 1, dtype=torch.long),
                          [str(i) for i in range(12)], [np.eye(4)] * 12)
    groups = patient_groups(["b", "a", "b", "a", "b", "c", "c", "b", "b", "a", "c", "c"])
    assert groups == [[1, 3, 9], [0, 2, 4, 7, 8], [5, 6, 10, 11]]
    stream = patient_batches(data, groups, rate=0.5, records_per_patient=2, seed=3)
    sizes = []
    for _ in range(200):
        batch = next(stream)
        sizes.append(batch.num_patients)
        assert batch.weights.sum(1).max() <= 2 if batch.num_patients else True
        for p in range(batch.num_patients):  # a patient's records all come from that patient
            values = {int(v) for v in batch.images[p, batch.weights[p] > 0].flatten()}
            assert any(values <= set(g) for g in groups)
    assert np.mean(sizes) == pytest.approx(1.5, abs=0.2)
    # a stream resumed at step 10 yields what the uninterrupted stream yields at step 11
    resumed = next(patient_batches(data, groups, rate=0.5, records_per_patient=2, seed=3, start_step=10))
    replay = patient_batches(data, groups, rate=0.5, records_per_patient=2, seed=3)
    for _ in range(10):
        next(replay)
    torch.testing.assert_close(resumed.images, next(replay).images)


# ------------------------------------------------------------------------------------- training


def test_dp_model_trains(tiny_config: Callable[..., PipelineSettings]) -> None:
    model, scheduler = _tiny_denoiser(tiny_config)
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (1, 1, 16, 16), generator=gen).expand(24, 1, 16, 16).clone()
    images = 0.3 * labels.float() + 0.02 * torch.randn(24, 1, 16, 16, generator=gen)
    data = LabelledArrays(images, labels, [str(i) for i in range(24)], [np.eye(4)] * 24)
    groups = patient_groups([f"p{i // 2}" for i in range(24)])  # 12 patients, 2 records each
    accountant = PatientAccountant(noise_multiplier=0.6, sample_rate=0.5)
    step = private_gradient(model, scheduler, noise_multiplier=0.6, max_grad_norm=1.0, expected_patients=6.0, seed=0,
                            device=torch.device("cpu"), on_noised=accountant.step)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    result = fit(model, loss_fn=lambda *args: torch.tensor(0.0), batches=patient_batches(data, groups, rate=0.5,
                 records_per_patient=None, seed=0), optimizer=optimizer, max_steps=40, grad_clip=None, progress=False,
                 gradient_fn=step)
    losses = np.array(result.losses)
    assert np.nanmean(losses[:5]) > 1.5 * np.nanmean(losses[-5:])
    assert accountant.steps == 40 and 0 < accountant.epsilon(1e-3) < math.inf


def test_train_stage_records_privacy_and_resume_ends_with_same_epsilon(dp_config: Callable[..., PipelineSettings],
                                                                       tmp_path: Path) -> None:
    settings = dp_config("trainer.max_steps=6", "trainer.checkpoint_every=3")
    last = Path(run_stage("train", settings))
    record = checkpoint_privacy(last)
    assert record is not None and record.steps == 6 and record.unit == "patient" and record.accountant == "rdp"
    assert record.train_patients == 10 and record.delta == pytest.approx(1 / 100)
    assert 0 < record.epsilon <= record.target_epsilon == 50.0
    assert record.sample_rate == pytest.approx(0.3)
    uninterrupted = load_checkpoint(last)
    kept = tmp_path / "kept.pt"
    shutil.copyfile(last, kept)

    step3 = Path(settings.paths.checkpoints) / "step_0000003.pt"
    assert checkpoint_privacy(step3).steps == 3
    resumed = dp_config("trainer.max_steps=6", "trainer.checkpoint_every=3", f"trainer.resume={step3}")
    last = Path(run_stage("train", resumed))
    again = checkpoint_privacy(last)
    assert again.steps == 6 and again.epsilon == pytest.approx(record.epsilon, rel=1e-12)
    for name, tensor in load_checkpoint(last)["model"].items():  # same patients, records and noise: same weights
        torch.testing.assert_close(tensor, uninterrupted["model"][name], rtol=1e-5, atol=1e-6)

    # a checkpoint is data: its privacy entry must be a plain, well-formed record
    for bad in (torch.tensor([1.0]), {**uninterrupted["privacy"], "epsilon": torch.tensor(1.0)},
                {**uninterrupted["privacy"], "extra": 1}, {**uninterrupted["privacy"], "epsilon": "8"},
                {**uninterrupted["privacy"], "accountant": ["rdp"]}, {**uninterrupted["privacy"], "delta": 2.0}):
        crafted = tmp_path / "crafted.pt"
        save_checkpoint(crafted, {**uninterrupted, "privacy": bad})
        with pytest.raises(MedsynthError) as err:
            checkpoint_privacy(crafted)
        assert "privacy" in _one_line(err)
        with pytest.raises(MedsynthError) as err:
            run_stage("train", dp_config("trainer.max_steps=6", f"trainer.resume={crafted}"))
        assert "privacy" in _one_line(err)


def test_generate_and_evaluate_carry_the_dp_record(dp_config: Callable[..., PipelineSettings]) -> None:
    settings = dp_config("trainer.max_steps=2", "generate.formats=[nifti,dicom]", "generate.num_samples=2")
    run_stage("train", settings)
    run_stage("generate", settings)
    record = checkpoint_privacy(Path(settings.paths.checkpoints) / "last.pt")
    with open(Path(settings.paths.synthetic) / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(float(r["dp_epsilon"]) == pytest.approx(record.epsilon, rel=1e-5) for r in rows)
    assert {r["dp_unit"] for r in rows} == {"patient"} and float(rows[0]["dp_delta"]) == pytest.approx(record.delta)
    import pydicom

    first = sorted((Path(settings.paths.synthetic) / rows[0]["dicom_series"]).glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    assert "DP-SGD" in ds.DerivationDescription and "epsilon=" in ds.DeidentificationMethod
    assert len(ds.DeidentificationMethod) <= 64 and ds.PatientIdentityRemoved == "YES"

    metrics = json.loads(Path(run_stage("evaluate", settings)).read_text())
    assert metrics["differential_privacy"]["epsilon"] == pytest.approx(record.epsilon)
    assert metrics["differential_privacy"]["unit"] == "patient"
    assert metrics["metrics"]["privacy/dp_epsilon"]["value"] == pytest.approx(record.epsilon)
    report = (Path(settings.paths.evaluation) / "report.html").read_text()
    assert "Differential privacy" in report and "noise multiplier" in report


# ------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("override", "key"), [
    ("trainer.accumulate=2", "trainer.accumulate"),
    ("trainer.precision=fp16", "trainer.precision"),
    ("trainer.gradient_checkpointing=true", "trainer.gradient_checkpointing"),
    ("trainer.compile=true", "trainer.compile"),
    ("trainer.privacy.target_epsilon=0", "trainer.privacy.target_epsilon"),
    ("trainer.privacy.delta=1.5", "trainer.privacy.delta"),
    ("trainer.privacy.accountant=gdp", "trainer.privacy.accountant"),
    ("model=latent", "model.autoencoder"),
])
def test_options_that_break_the_guarantee_are_refused(tiny_config: Callable[..., PipelineSettings], override: str,
                                                      key: str) -> None:
    with pytest.raises(ConfigError) as err:
        tiny_config(*DP, override)
    assert _one_line(err).startswith(key)
    if key.startswith("trainer.privacy."):  # a bad value is refused with privacy off too
        with pytest.raises(ConfigError):
            tiny_config(override)
    elif override != "model=latent":  # the others are fine without DP
        tiny_config(override)


def test_runtime_refusals_each_one_line(dp_config: Callable[..., PipelineSettings], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        check_private_run(distributed=True)
    assert "torchrun" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        check_private_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    assert "batch normalisation" in _one_line(err)

    # too few patients
    few = dp_config("trainer.privacy.min_patients=20", "trainer.max_steps=2")
    with pytest.raises(ConfigError) as err:
        run_stage("train", few)
    assert "min_patients" in _one_line(err)

    # resume from a checkpoint trained without DP
    plain = dp_config("trainer.max_steps=2", "trainer.grid.num=0", private=False)
    run_stage("train", plain)
    with pytest.raises(MedsynthError) as err:
        run_stage("train", dp_config("trainer.max_steps=4", "trainer.resume=auto"))
    assert "without trainer.privacy" in _one_line(err)
    # resume with other noise (trainer.max_steps changed after the calibration)
    run_stage("train", dp_config("trainer.max_steps=2", f"paths.output={tmp_path / 'dp'}"))
    with pytest.raises(MedsynthError) as err:
        run_stage("train", dp_config("trainer.max_steps=4", "trainer.resume=auto", f"paths.output={tmp_path / 'dp'}"))
    assert "calibrated" in _one_line(err)


def test_one_patient_demo_is_refused(tiny_config: Callable[..., PipelineSettings]) -> None:
    settings = tiny_config(*DP)
    write_patients(Path(settings.paths.data), patients=1)
    with pytest.raises(ConfigError) as err:
        run_stage("train", settings)
    assert "the dataset has 1:" in _one_line(err) and "noise-like" in str(err.value)


def test_the_default_demo_plans_dp_on_its_cohort() -> None:
    """``trainer.privacy=dp trainer.privacy.target_epsilon=8`` on the default demo: its cohort's training
    patients meet the preset's guard and the noise is calibrated; the global guard of 20 refuses them."""
    from medsynth.config import compose
    from medsynth.data.splits import patient_splits
    from medsynth.training.privacy import private_plan

    settings = compose(["trainer.privacy=dp", "trainer.privacy.target_epsilon=8"])
    assignment = patient_splits([f"subject{i:02d}" for i in range(settings.data.subjects)],
                                fractions=settings.data.splits.fractions)
    train = sum(split == "train" for split in assignment.values())
    privacy = settings.trainer.privacy
    assert privacy.enabled and privacy.min_patients <= train < 20
    plan = private_plan(privacy, train_patients=train, max_steps=settings.trainer.max_steps)
    assert plan.sample_rate == privacy.expected_batch_patients / train and math.isfinite(plan.noise_multiplier)
    assert math.isclose(PatientAccountant(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                          steps=settings.trainer.max_steps).epsilon(plan.delta), 8.0, rel_tol=0.02)
    guarded = compose(["trainer.privacy=dp", "trainer.privacy.min_patients=20"]).trainer.privacy
    with pytest.raises(ConfigError, match="min_patients=20 training patients, the dataset has"):
        private_plan(guarded, train_patients=train, max_steps=settings.trainer.max_steps)


def test_read_privacy_accepts_its_own_record() -> None:
    record = PatientAccountant(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    from medsynth.config import DifferentialPrivacySettings
    from medsynth.training.privacy import PrivatePlan

    plan = PrivatePlan(DifferentialPrivacySettings(enabled=True), 50, 0.1, 1.0, 1e-3, 5)
    written = plan.record(record).as_json()
    assert read_privacy(written, where="x") == plan.record(record)
    assert read_privacy(None, where="x") is None


def test_dp_randomness_comes_from_a_secret_not_the_public_seed(tmp_path: Path) -> None:
    """Patient sampling and noise are seeded from <output>/secret/dp_seed: made once with mode 0600,
    the same on resume, different for another run folder whatever `seed` says; an emptied file is refused."""
    from medsynth import MedsynthError
    from medsynth.stages.train import dp_secret_seed

    first = dp_secret_seed(tmp_path / "a")
    path = tmp_path / "a" / "secret" / "dp_seed"
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_bytes()) == 32
    assert dp_secret_seed(tmp_path / "a") == first  # a resumed run draws the same noise
    assert dp_secret_seed(tmp_path / "b") != first  # another run does not, with the same public seed
    path.write_bytes(b"")
    with pytest.raises(MedsynthError, match="dp_seed is empty"):
        dp_secret_seed(tmp_path / "a")

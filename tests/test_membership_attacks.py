"""The membership attacks (denoising error and PIA) on denoisers with a known answer.

A constructed denoiser that has memorised its members predicts the posterior mean of the clean
image over exactly those records, the best any model trained on them can do; every attack must tell
them from records it never saw. The same denoiser built on other records has seen no member: no
attack can do better than chance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler
from torch import nn

from medsynth.config.settings import SchedulerSettings
from medsynth.data import LabelledArrays, Record
from medsynth.diffusion import Denoiser, denoising_errors, from_unit_range, prediction_target
from medsynth.diffusion.generator import Generator
from medsynth.evaluation.audit import membership_figures
from medsynth.evaluation.instruments import (
    MEMBERSHIP_ATTACKS,
    attack_sample,
    diffusion_coefficients,
    membership_errors,
    noise_estimate,
    pia_errors,
)
from medsynth.metrics import roc_auc

SCHEDULES = {
    "epsilon": lambda: DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon"),
    "sample": lambda: DDPMScheduler(num_train_timesteps=1000, prediction_type="sample"),
    "v_prediction": lambda: DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction"),
    "rflow": lambda: RFlowScheduler(num_train_timesteps=1000, spatial_dim=2),
}
TIMESTEPS = [50, 200]
SIZE = 6


def coefficients(scheduler: Scheduler, step: int) -> tuple[float, float]:
    """``(a, b)`` of ``x_t = a x0 + b eps``, read off the scheduler's own ``add_noise``."""
    one, zero, t = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([step])
    return (float(scheduler.add_noise(original_samples=one, noise=zero, timesteps=t)),
            float(scheduler.add_noise(original_samples=zero, noise=one, timesteps=t)))


class Memoriser(nn.Module):
    """A network that has memorised ``records`` (model range): it predicts the scheduler's target
    from the posterior mean of x0 over them (exact on a record at small t)."""

    def __init__(self, records: torch.Tensor, scheduler: Scheduler) -> None:
        super().__init__()
        self.register_buffer("records", records)
        object.__setattr__(self, "scheduler", scheduler)  # a plain attribute, not a submodule
        self.weight = nn.Parameter(torch.zeros(()))  # one parameter: the code finds the device by it

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, b = coefficients(self.scheduler, int(timesteps[0]))
        distance = torch.cdist(x.flatten(1), a * self.records.flatten(1)) ** 2
        weights = torch.softmax(-distance / (2 * max(b, 1e-3) ** 2), dim=1)
        x0 = (weights @ self.records.flatten(1)).view_as(x)
        eps = (x - a * x0) / b if b > 0 else torch.zeros_like(x)  # no noise in x at t = 0 for rectified flow
        return prediction_target(self.scheduler, x0, eps, timesteps)


def images(n: int, seed: int) -> torch.Tensor:
    """``n`` random ``(1, SIZE, SIZE)`` images in [0, 1] from one distribution."""
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def memoriser(records: torch.Tensor, scheduler: Scheduler) -> Denoiser:
    return Denoiser(Memoriser(from_unit_range(records), scheduler), conditioning="none", num_classes=2).eval()


def records(n: int) -> list[Record]:
    return [Record(str(i), str(i), "train", f"{i}.npz", [8, 8], [1.0, 1.0], np.eye(4).tolist(), "") for i in range(n)]


def attack(name: str, model: Denoiser, x: torch.Tensor, scheduler: Scheduler) -> torch.Tensor:
    labels = torch.zeros(x.shape, dtype=torch.long)
    if name == "loss":
        return denoising_errors(model, x, labels, scheduler, timesteps=TIMESTEPS, seed=3)
    return pia_errors(model, x, labels, scheduler, timesteps=TIMESTEPS)


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("name", MEMBERSHIP_ATTACKS)
def test_attacks_tell_memorised_members_apart(name: str, kind: str) -> None:
    """On a model that memorised its members, every attack separates them from unseen records."""
    scheduler = SCHEDULES[kind]()
    members, nonmembers = images(24, seed=1), images(24, seed=2)
    model = memoriser(members, scheduler)
    auc = roc_auc(-attack(name, model, members, scheduler), -attack(name, model, nonmembers, scheduler))
    assert auc >= 0.95


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("name", MEMBERSHIP_ATTACKS)
def test_attacks_are_at_chance_on_a_model_that_saw_no_member(name: str, kind: str) -> None:
    """On a model that memorised other records, members and non-members look alike: AUC near 0.5."""
    scheduler = SCHEDULES[kind]()
    model = memoriser(images(24, seed=9), scheduler)
    members, nonmembers = images(80, seed=1), images(80, seed=2)
    auc = roc_auc(-attack(name, model, members, scheduler), -attack(name, model, nonmembers, scheduler))
    assert abs(auc - 0.5) <= 0.15


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_noise_estimate_inverts_each_prediction_type(kind: str) -> None:
    """The noise read from each target is the noise that made x_t, at t = 0 and later."""
    scheduler = SCHEDULES[kind]()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    for step in (0, 1, 500, 999):
        if kind == "sample" and step == 0:
            continue  # covered by the t = 0 case below with a DDPM schedule's small but non-zero noise
        t = torch.full((2,), step)
        assert diffusion_coefficients(scheduler, step) == pytest.approx(coefficients(scheduler, step), abs=1e-6)
        x_t = scheduler.add_noise(original_samples=x0, noise=eps, timesteps=t)
        target = prediction_target(scheduler, x0, eps, t)
        if kind == "rflow" and step == 0:
            continue  # x_t carries no noise: the noise is whatever the velocity says, checked by PIA itself
        torch.testing.assert_close(noise_estimate(scheduler, target, x_t, step), eps, atol=1e-3, rtol=1e-3)


def test_noise_estimate_refuses_an_unknown_prediction_type() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=10, prediction_type="epsilon")
    scheduler.prediction_type = "score"
    with pytest.raises(ValueError, match="PIA cannot read a noise estimate from prediction_type 'score'"):
        noise_estimate(scheduler, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 3)


def test_membership_errors_runs_every_attack_on_a_conditioned_generator() -> None:
    """Through the audit's entry point: a mask-conditioned UNet, one score per attack and record."""
    torch.manual_seed(0)
    network = DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(8, 8),
                                 attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
    model = Denoiser(network, conditioning="mask", num_classes=2).eval()
    generator = Generator(model, SchedulerSettings(num_train_timesteps=20), ["background", "lesion"], (8, 8))
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = LabelledArrays(x, (x > 0.5).long(), [str(i) for i in range(5)], [])
    scores = membership_errors(generator, data, records(5), timesteps=[2, 7], seed=0)
    assert list(scores) == list(MEMBERSHIP_ATTACKS)
    assert all(s.shape == (5,) and np.isfinite(s).all() for s in scores.values())
    again = membership_errors(generator, data, records(5), timesteps=[2, 7], seed=0, attacks=["pia"])
    np.testing.assert_allclose(again["pia"], scores["pia"], rtol=1e-5)  # PIA is deterministic
    with pytest.raises(ValueError, match="membership attacks must be some of"):
        membership_errors(generator, data, records(5), timesteps=[2], seed=0, attacks=["secmi"])


def test_membership_errors_show_progress(capsys: pytest.CaptureFixture[str]) -> None:
    """The attacks run over every training and holdout record (minutes on a large set): their progress is shown."""
    torch.manual_seed(0)
    network = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8),
                                 attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
    generator = Generator(Denoiser(network, conditioning="none", num_classes=2).eval(),
                          SchedulerSettings(num_train_timesteps=20), ["background", "lesion"], (8, 8))
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = LabelledArrays(x, (x > 0.5).long(), [str(i) for i in range(5)], [])
    membership_errors(generator, data, records(5), timesteps=[2], seed=0, progress=True, desc="attacks (train)")
    err = capsys.readouterr().err
    assert "attacks (train)" in err and "10/10" in err, err


def test_membership_figures_report_each_attack_and_the_strongest_under_the_plain_names() -> None:
    members = {"loss": np.linspace(0.5, 1.5, 40), "pia": np.linspace(0.0, 1.0, 40)}
    nonmembers = {"loss": np.linspace(0.6, 1.6, 40), "pia": np.linspace(2.0, 3.0, 40)}
    figures = {f.name: f for f in membership_figures(members, nonmembers)}
    assert figures["privacy/membership_auc_pia"].value == 1.0
    assert 0.5 < figures["privacy/membership_auc_loss"].value < 1.0
    assert figures["privacy/membership_auc"].value == 1.0
    assert figures["privacy/membership_tpr_at_1pct_fpr"].value == figures["privacy/membership_tpr_at_1pct_fpr_pia"].value
    assert "here pia" in figures["privacy/membership_auc"].meaning
    assert "(pia)" in figures["privacy/membership_tpr_at_1pct_fpr"].meaning
    assert figures["privacy/membership_auc"].headline
    # one array: the loss attack alone, as before
    alone = {f.name: f.value for f in membership_figures(members["loss"], nonmembers["loss"])}
    assert alone["privacy/membership_auc"] == alone["privacy/membership_auc_loss"]
    with pytest.raises(ValueError, match="same attacks"):
        membership_figures(members, {"loss": nonmembers["loss"]})


def test_attack_sample_draws_the_same_rows_with_their_records() -> None:
    """At most ``max_records`` rows, in order, the same for a seed, each with its own record; small sets stay whole."""
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 1, 2, 2).clone()
    data = LabelledArrays(x, torch.zeros(10, 1, 2, 2, dtype=torch.long), [f"r{i}" for i in range(10)], [np.eye(4)] * 10)
    sample, chosen = attack_sample(data, records(10), max_records=4, seed=3)
    again, _ = attack_sample(data, records(10), max_records=4, seed=3)
    assert len(sample) == 4 and sample.ids == again.ids and sample.ids == sorted(sample.ids, key=lambda i: int(i[1:]))
    assert [f"r{r.id}" for r in chosen] == sample.ids
    assert [int(v) for v in sample.images[:, 0, 0, 0]] == [int(i[1:]) for i in sample.ids]
    assert attack_sample(data, records(10), max_records=4, seed=4)[0].ids != sample.ids
    whole, kept = attack_sample(data, records(10), max_records=None, seed=3)
    assert whole is data and len(kept) == 10
    assert attack_sample(data, records(10), max_records=10, seed=3)[0] is data

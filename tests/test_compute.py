"""How generation's and the audit's networks run: ``precision: auto`` and the 2D memory layout.

bf16 is only worth it (and only the default) where the device computes it natively; the audit's
figures under it must be those of float32 within the networks' rounding, and the channels-last
layout must not change what a network computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from medsynth.compute import autocast, layout, native_bf16, resolve_precision
from medsynth.config.settings import SchedulerSettings
from medsynth.data import LabelledArrays, Record
from medsynth.diffusion import Denoiser
from medsynth.diffusion.generator import Generator
from medsynth.evaluation.instruments import holdout_dice, membership_errors
from medsynth.training.segmenter import train_segmenter


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")])
def test_auto_is_bf16_only_on_a_cpu_that_computes_it(monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool,
                                                      expected: str) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert resolve_precision("auto", torch.device("cpu")) == expected


def test_a_torch_without_the_probes_reads_as_no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert not native_bf16(torch.device("cpu")) and resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_explicit_precisions_stay_and_others_are_refused() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert not native_bf16(torch.device("meta"))
    with pytest.raises(ValueError, match=r"evaluate.precision must be one of \['auto', 'fp32', 'bf16'\], got 'fp16'"):
        resolve_precision("fp16", cpu, key="evaluate.precision")


def test_2d_networks_run_channels_last_and_3d_ones_contiguous() -> None:
    assert layout(2) == torch.channels_last and layout(3) == torch.contiguous_format


def _generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    network = DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(16, 16),
                                 attention_levels=(False, True), num_res_blocks=1, norm_num_groups=8, num_head_channels=8)
    with torch.no_grad():  # MONAI starts the output layers at zero: give them weights, so the network computes something
        for weight in network.parameters():
            if weight.dim() > 1 and not weight.any():
                weight.normal_(std=0.1)
    return Generator(Denoiser(network, conditioning="mask", num_classes=2).eval(), SchedulerSettings(num_train_timesteps=100),
                     ["background", "lesion"], (16, 16))


def _records(n: int) -> list[Record]:
    return [Record(str(i), str(i), "train", f"{i}.npz", [16, 16], [1.0, 1.0], np.eye(4).tolist(), "") for i in range(n)]


def _data(n: int) -> LabelledArrays:
    x = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    return LabelledArrays(x, (x > 0.5).long(), [str(i) for i in range(n)], [])


def test_channels_last_computes_what_the_contiguous_network_computes() -> None:
    generator, labels = _generator(), (torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2)) > 0.5).long()
    plain = generator.sample([1, 2, 3], labels=labels, steps=4).images
    generator.model.to(memory_format=layout(2))
    assert generator.model.network.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(generator.sample([1, 2, 3], labels=labels, steps=4).images, plain, atol=1e-5)


def test_bf16_attacks_score_every_record_as_fp32_does_within_rounding() -> None:
    """The audit's attacks under bf16 autocast: the same scores within a percent, so the same AUC ranks."""
    generator, data = _generator(), _data(12)
    exact = membership_errors(generator, data, _records(12), timesteps=[10, 40], seed=0, batch_size=5)
    fast = membership_errors(generator, data, _records(12), timesteps=[10, 40], seed=0, batch_size=5, precision="bf16")
    for attack in exact:
        assert fast[attack].dtype == np.float32
        np.testing.assert_allclose(fast[attack], exact[attack], rtol=0.02)
        assert not np.array_equal(fast[attack], exact[attack])  # it did run in bf16


def test_the_attacks_score_a_record_the_same_in_any_batch() -> None:
    generator, data = _generator(), _data(7)
    one = membership_errors(generator, data, _records(7), timesteps=[10], seed=0, batch_size=7)
    many = membership_errors(generator, data, _records(7), timesteps=[10], seed=0, batch_size=2)
    for attack in one:
        np.testing.assert_allclose(many[attack], one[attack], rtol=1e-5)


def test_a_segmenter_trained_under_bf16_learns_as_in_fp32() -> None:
    x = torch.zeros(16, 1, 16, 16)
    x[:, :, 4:12, 4:12] = 1.0
    x += 0.1 * torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    data = LabelledArrays(x, (x > 0.5).long(), [str(i) for i in range(16)], [])
    dice = {p: holdout_dice(train_segmenter(data, num_classes=2, spatial_dims=2, channels=(8, 16), steps=40, batch_size=8,
                                            precision=p), data, num_classes=2) for p in ("fp32", "bf16")}
    assert dice["fp32"] > 0.9 and dice["bf16"] > 0.9, dice


def test_autocast_runs_bf16_only_when_asked() -> None:
    layer, x = torch.nn.Linear(4, 4), torch.rand(2, 4)
    with autocast("bf16", torch.device("cpu")):
        assert layer(x).dtype == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert layer(x).dtype == torch.float32

"""The paths that differ on a GPU, run on the best device there is (CUDA when available, else the CPU).

On a CPU-only machine they check the same code on the CPU; ``benchmarks/gpu_suite.py`` runs this
module on the GPU it is given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from medsynth.config import PipelineSettings
from medsynth.diffusion.generator import Generator
from medsynth.training import load_checkpoint
from tests.conftest import run_stage

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_bf16_channels_last_training_checkpoint_samples_on_the_cpu(tiny_config: Callable[..., PipelineSettings]) -> None:
    """Train in bf16 with channels_last on the device; the checkpoint is fp32 data that samples on the CPU."""
    cfg = tiny_config(f"device={DEVICE}", "trainer.precision=bf16", "trainer.channels_last=true", "trainer.max_steps=4")
    run_stage("preprocess", cfg)
    checkpoint = run_stage("train", cfg)
    state = load_checkpoint(checkpoint)
    assert state["step"] == 4
    weights = [v for v in state["ema"]["shadow"].values() if v.is_floating_point()]
    assert weights and all(w.dtype == torch.float32 and w.device.type == "cpu" and torch.isfinite(w).all()
                           for w in weights)
    generator = Generator.from_checkpoint(checkpoint, device="cpu")
    labels = torch.zeros(2, 1, *generator.image_size, dtype=torch.long)
    samples = generator.sample([0, 1], labels=labels, steps=2)
    assert samples.images.shape == (2, 1, *generator.image_size) and torch.isfinite(samples.images).all()


def test_bf16_autocast_sampling_stays_near_fp32(tiny_config: Callable[..., PipelineSettings]) -> None:
    """One seed sampled on the device in fp32 and with ``precision="bf16"``: the same image up to bf16 rounding."""
    cfg = tiny_config(f"device={DEVICE}", "trainer.max_steps=3")
    run_stage("preprocess", cfg)
    generator = Generator.from_checkpoint(run_stage("train", cfg), device=DEVICE)
    labels = torch.ones(1, 1, *generator.image_size, dtype=torch.long)
    fp32 = generator.sample([7], labels=labels, steps=3).images
    bf16 = generator.sample([7], labels=labels, steps=3, precision="bf16").images
    assert bf16.dtype == torch.float32
    difference = (fp32 - bf16).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.2, (difference.mean(), difference.max())
    assert not torch.equal(fp32, bf16)  # autocast took effect: bf16 rounding shows


def test_generate_stage_in_bf16_with_a_compiled_denoiser(tiny_config: Callable[..., PipelineSettings]) -> None:
    """``generate.precision=bf16 generate.compile=true``: the stage writes its samples, near the fp32 ones."""
    import nibabel as nib

    plain = tiny_config(f"device={DEVICE}", "trainer.max_steps=3", "generate.num_samples=2", "generate.formats=[nifti]",
                        "generate.privacy_gate.enabled=false", "generate.precision=fp32")
    run_stage("preprocess", plain)
    run_stage("train", plain)
    run_stage("generate", plain)
    fast = tiny_config(f"device={DEVICE}", "trainer.max_steps=3", "generate.num_samples=2", "generate.formats=[nifti]",
                       "generate.privacy_gate.enabled=false", "generate.precision=bf16", "generate.compile=true",
                       f"paths.synthetic={plain.paths.output}/synthetic_bf16")
    run_stage("generate", fast)
    for name in ("syn_00000", "syn_00001"):
        a = nib.load(f"{plain.paths.synthetic}/imagesTr/{name}_0000.nii.gz").get_fdata()
        b = nib.load(f"{fast.paths.synthetic}/imagesTr/{name}_0000.nii.gz").get_fdata()
        assert abs(a - b).mean() < 0.05 and not (a == b).all(), abs(a - b).mean()

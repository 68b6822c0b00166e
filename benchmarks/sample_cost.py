"""Seconds per sample and peak memory of sampling one preset's model, in fp32 and under bf16 autocast.

Usage:
    python benchmarks/sample_cost.py [--preset demo] [--set KEY=VALUE ...] [--steps 50]
        [--measure-steps N] [--device cpu|cuda] [--json]

The model is the preset's network at its initial weights (a latent preset with its autoencoder;
the cost of sampling does not depend on the weights), sampled through ``medsynth.Generator`` with
the preset's sampler for one sample conditioned on a random label map (or attributes). After a
warm-up, one sample is timed at 1 step and one at ``--measure-steps`` (default: ``--steps``); their
difference gives the time of one step and the rest (conditioning, latent decoding) is the fixed
part, so ``s/sample`` at ``--steps`` is measured when the two are equal and extrapolated from
those two runs otherwise (said in the output). Peak memory: the CUDA allocator's peak on a GPU,
the process's peak resident memory on the CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import NUM_CLASSES, build_model, preset_config  # noqa: E402 - same folder

from medsynth.config.settings import SamplingSettings  # noqa: E402
from medsynth.diffusion.generator import Generator  # noqa: E402


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(generator: Generator, labels: torch.Tensor, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    generator.sample([1], labels=labels if generator.conditioning == "mask" else None, steps=steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(preset: str, overrides: list[str], *, steps: int, measure_steps: int, device: str) -> dict[str, float]:
    """``{"fp32 s/sample", "fp32 s/step", "fp32 peak MiB", "bf16 ..."}`` for one sample at ``steps`` steps."""
    cfg = preset_config(preset, overrides)
    target = torch.device(device)
    size = tuple(cfg.data.size)
    generator = Generator(model=build_model(cfg, target).eval(), scheduler=cfg.scheduler,
                          label_names=[f"class{i}" for i in range(NUM_CLASSES)], image_size=size,
                          sampling=SamplingSettings(steps=steps))
    labels = torch.randint(0, NUM_CLASSES, (1, 1, *size), generator=torch.Generator().manual_seed(0))
    out: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), torch.autocast(target.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            _timed(generator, labels, 1, target)  # warm-up: the first call at a shape is slow
            if target.type == "cuda":
                torch.cuda.reset_peak_memory_stats(target)
            one = _timed(generator, labels, 1, target)
            many = _timed(generator, labels, measure_steps, target) if measure_steps > 1 else one
        per_step = (many - one) / (measure_steps - 1) if measure_steps > 1 else one
        out[f"{precision} s/step"] = per_step
        out[f"{precision} s/sample"] = many if measure_steps == steps else one - per_step + steps * per_step
        out[f"{precision} peak MiB"] = _peak_mib(target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps a sample takes (generate.steps)")
    parser.add_argument("--measure-steps", type=int, default=None, help="steps of the timed run (default: --steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="one JSON line, for benchmarks/gpu_suite.py")
    args = parser.parse_args()
    measure_steps = args.measure_steps or args.steps
    figures = measure(args.preset, args.set, steps=args.steps, measure_steps=measure_steps, device=args.device)
    if args.json:
        print("SAMPLE " + json.dumps(figures))
        return
    cfg = preset_config(args.preset, args.set)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    how = "measured" if measure_steps == args.steps else f"from runs of 1 and {measure_steps} steps"
    print(f"preset {args.preset} {' '.join(args.set)}: {cfg.data.spatial_dims}D {list(cfg.data.size)}"
          f"{', latent' if cfg.model.autoencoder is not None else ''}, {args.steps} steps ({how}); device {name}")
    for precision in ("fp32", "bf16"):
        print(f"{precision}: {figures[f'{precision} s/sample']:.3f} s/sample, {figures[f'{precision} s/step'] * 1000:.1f} "
              f"ms/step, peak memory {figures[f'{precision} peak MiB']:.0f} MiB")


if __name__ == "__main__":
    main()

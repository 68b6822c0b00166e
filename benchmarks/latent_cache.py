"""Step time of latent diffusion training with ``trainer.latent_cache`` against encoding every batch.

Usage:
    python benchmarks/latent_cache.py [--preset brain3d_latent_gpu] [--set KEY=VALUE ...] [--steps 20]
        [--repeats 4] [--examples 64] [--device cpu|cuda]

Both arms run ``medsynth.training.train`` with the pipeline's objective
(``medsynth.training.objective.denoising_objective``) on the same random images and label maps, the
preset's network and an autoencoder at its initial weights (the cost of a step does not depend on
the weights): one draws batches with ``medsynth.data.infinite_batches`` and encodes them at every
step, as before the cache; the other encodes the examples once in every flip orientation
(``encode_training_set``) and draws the same batches from the cache. Runs alternate after a
warm-up each and the medians are compared, so a drifting machine affects both alike. The one-off
encoding time and the steps after which the cache has paid for it are reported too.

Without ``--preset`` the CPU default is the demo's 64x64 2D setting with ``model=latent``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import build_model, preset_config, random_data  # noqa: E402 - same folder

from medsynth.data import infinite_batches  # noqa: E402
from medsynth.diffusion.generator import build_scheduler  # noqa: E402
from medsynth.training import EMA, train, warmup_cosine  # noqa: E402
from medsynth.training.latent_cache import cached_latent_batches, encode_training_set  # noqa: E402
from medsynth.training.objective import denoising_objective  # noqa: E402

CPU_DEFAULT = ["model=latent", "model.conditioning=mask", "scheduler.clip_sample=false"]


def loop(cfg, data, latents, steps: int, *, batch: int, device: torch.device, cached: bool) -> float:
    """``steps`` training steps, from the cache or encoding each batch; examples/s."""
    model = build_model(cfg, device)
    flips = list(cfg.trainer.flip_dims)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(warmup_cosine, warmup_steps=5,
                                                                                  max_steps=steps))
    batches = (cached_latent_batches(latents, data, batch_size=batch, seed=0, flip_dims=flips) if cached
               else infinite_batches(data, batch_size=batch, seed=0, flip_dims=flips))
    objective = denoising_objective(model, build_scheduler(cfg.scheduler), seed=0, device=device, encoded=cached)
    result = train(model, loss_fn=objective, batches=batches, optimizer=optimizer, max_steps=steps,
                   lr_scheduler=lr_scheduler, ema=EMA(model), grad_clip=1.0, precision=cfg.trainer.precision,
                   on_step=lambda *_: None, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result.examples_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--examples", type=int, default=64, help="training examples encoded into the cache")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    overrides = args.set if args.set is not None else (CPU_DEFAULT if args.preset == "demo" else [])
    cfg = preset_config(args.preset, overrides)
    if cfg.model.autoencoder is None:
        raise SystemExit("latent_cache: the preset is not a latent diffusion model; add --set model=latent")
    device = torch.device(args.device)
    batch = cfg.trainer.batch_size
    data = random_data(cfg, max(args.examples, batch))

    started = time.perf_counter()
    latents = encode_training_set(build_model(cfg, device), data, flip_dims=list(cfg.trainer.flip_dims), device=device)
    encode_s = time.perf_counter() - started

    arms = {name: functools.partial(loop, cfg, data, latents, batch=batch, device=device, cached=name == "cached")
            for name in ("encode every batch", "cached")}
    for arm in arms.values():
        arm(3)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(args.repeats):
        for name in (list(arms) if repeat % 2 == 0 else list(arms)[::-1]):
            rates[name].append(arms[name](args.steps))
    step_s = {name: batch / statistics.median(values) for name, values in rates.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"preset {args.preset} {' '.join(overrides)}: {cfg.data.spatial_dims}D {list(cfg.data.size)}, latent "
          f"{list(latents.shape[3:])} x {latents.shape[2]}, batch {batch}, {len(data)} examples x "
          f"{latents.shape[0]} flip orientations; device {name}")
    for arm_name, values in rates.items():
        print(f"{arm_name:18s}: {', '.join(f'{x:.2f}' for x in values)} examples/s; step {step_s[arm_name] * 1000:.1f} ms")
    saved = step_s["encode every batch"] - step_s["cached"]
    print(f"step time cached / encode every batch: {step_s['cached'] / step_s['encode every batch']:.3f}")
    print(f"encoding once: {encode_s:.2f} s"
          + (f", paid back after {encode_s / saved:.0f} steps" if saved > 0 else ", never paid back at this size"))


if __name__ == "__main__":
    main()

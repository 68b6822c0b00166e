"""Memory and compute of one training step of each preset at its full size, measured on this machine.

Usage:
    python benchmarks/preset_footprint.py [--preset NAME ...] [--device cpu|cuda]

For each preset the model (``medsynth.diffusion.generator.build_denoiser``) is built at the preset's image size and one forward and
backward pass of one example is run in fp32 (with the preset's activation checkpointing).
Reported: trained parameters, model FLOPs per example (``torch.utils.flop_counter``), and the
peak memory of that step (CUDA allocator peak on a GPU; on the CPU the growth of the process's
peak resident memory over its size before the step, in a fresh process per preset). Multiply the activation memory by
the preset's batch size for a full step; bf16 autocast roughly halves activations. Latent presets
include the frozen autoencoder's encode pass.
"""

from __future__ import annotations

import argparse
import gc
import resource
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from medsynth.training.activation import enable_activation_checkpointing
from medsynth.config import config_dir
from train_throughput import build_model, preset_config, random_data  # same folder


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def footprint(preset: str, device: torch.device) -> str:
    cfg = preset_config(preset, [])
    model = build_model(cfg, device)
    if cfg.trainer.gradient_checkpointing:
        enable_activation_checkpointing(model.network)
    model.train()
    data = random_data(cfg, 1)
    images, labels, codes = (x.to(device) for x in (data.images, data.labels, data.codes))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = rss_mib()
    start = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        x0 = model.to_sample(images, labels)
        t = torch.randint(0, 1000, (1,), device=device)
        model(x0, t, model.condition(labels, codes)).square().mean().backward()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss_mib() - before
    return (f"| {preset} | {cfg.data.spatial_dims}D {list(cfg.data.size)} | {params / 1e6:.1f}M | {weights_mib:.0f} MiB | "
            f"{counter.get_total_flops() / 1e9:.0f} GFLOP | {peak:.0f} MiB | {cfg.trainer.batch_size} | {seconds:.1f} s |")


def main() -> None:
    presets = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=presets, help="default: all presets")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # measure one preset in this process
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.one:
        print(footprint(args.preset[0], device), flush=True)
        return
    print("| preset | size | trained parameters | weights (all) | FLOPs / example (fwd+bwd) | step peak memory, 1 example, fp32 "
          "| preset batch | step time, 1 example |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.preset or presets:  # a fresh process each, so peak memory is that preset's alone
        done = subprocess.run([sys.executable, __file__, "--one", "--preset", preset, "--device", args.device],
                              capture_output=True, text=True)
        print(done.stdout.strip() if done.returncode == 0 else f"| {preset} | failed: {done.stderr.strip()[-300:]} |", flush=True)


if __name__ == "__main__":
    main()

"""Training throughput and peak memory of medsynth's loop against a bare loop written as MONAI's
tutorials write it, for any preset.

Usage:
    python benchmarks/train_throughput.py [--preset demo] [--set KEY=VALUE ...] [--plain]
        [--steps 30] [--repeats 4] [--batch N] [--device cpu|cuda] [--peak-tflops 989]

Both loops train the preset's network (built by ``medsynth.diffusion.generator.build_denoiser``) with the same
batch of random images, label maps and attribute codes, the same noise schedule and AdamW:

- the bare loop is the tutorial's: DataLoader, noise, ``add_noise``, the network called directly
  with the preset's conditioning (one-hot label map concatenated, ``class_labels`` or a
  cross-attention ``context``; a latent model's autoencoder encodes each batch without gradients),
  MSE to the target, backward, step, in fp32;
- medsynth's loop is ``medsynth.training.train`` with the pipeline's loss: per-step seeded noise and
  condition dropout, gradient clipping, LR schedule, EMA, and the preset's trainer options
  (precision, channels_last, activation checkpointing, torch.compile, and for latent models the
  latent cache: the examples are encoded once, before the timed steps). ``--plain`` drops those
  options (fp32, no checkpointing, encoding every batch), which is the like-for-like comparison of
  loop overhead.

Runs alternate (bare, ours, ours, bare, ...) after one warm-up each and the ratio of medians is
reported, so drift of a shared machine affects both alike. Peak memory is the CUDA allocator's
peak per loop on a GPU, and the process's peak resident memory on the CPU. Model FLOPs per example
are counted with ``torch.utils.flop_counter``; with ``--peak-tflops`` (the device's dense peak at
the chosen precision) the model FLOPs utilisation of each loop is printed.
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from medsynth.config import PipelineSettings, compose
from medsynth.data import LabelledArrays, infinite_batches
from medsynth.diffusion import Denoiser, prediction_target
from medsynth.diffusion.generator import build_denoiser, build_scheduler
from medsynth.training import EMA, train, warmup_cosine
from medsynth.training.activation import enable_activation_checkpointing
from medsynth.training.latent_cache import cached_latent_batches, encode_training_set
from medsynth.training.objective import denoising_objective

NUM_CLASSES = 4
VOCABULARY = {"class": ["1", "2", "3"], "age": ["40-50", "50-60", "60-70"], "sex": ["F", "M"]}


def preset_config(preset: str, overrides: list[str]) -> PipelineSettings:
    """The preset's checked settings with ``overrides``."""
    return compose([f"experiment={preset}", *overrides])


def build_model(cfg: PipelineSettings, device: torch.device) -> Denoiser:
    """The preset's denoiser with fixed initial weights (latent models: an untrained autoencoder and scale 1)."""
    torch.manual_seed(0)
    vocabulary = {cfg.model.class_key: VOCABULARY["class"]} if cfg.model.conditioning == "class" else (
        {k: VOCABULARY[k] for k in ("age", "sex")} if cfg.model.conditioning == "attributes" else {})
    return build_denoiser(cfg.model, num_classes=NUM_CLASSES, vocabulary=vocabulary).to(device)


def random_data(cfg: PipelineSettings, n: int) -> LabelledArrays:
    g = torch.Generator().manual_seed(0)
    size = list(cfg.data.size)
    labels = torch.randint(0, NUM_CLASSES, (n, 1, *size), generator=g)
    codes = torch.randint(0, 2, (n, {"class": 1, "attributes": 2}.get(cfg.model.conditioning, 0)), generator=g)
    return LabelledArrays(torch.rand(n, 1, *size, generator=g), labels, [str(i) for i in range(n)], [], codes)


def bare_loop(cfg: PipelineSettings, data: LabelledArrays, steps: int, *, batch: int, device: torch.device) -> float:
    """The tutorial loop on the preset's network. Returns examples/s."""
    model = build_model(cfg, device)
    network, autoencoder = model.network, model.autoencoder
    scheduler = build_scheduler(cfg.scheduler)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.images, data.labels, data.codes),
                                         batch_size=batch, shuffle=True, drop_last=True)
    mode = model.conditioning
    done, start = 0, time.perf_counter()
    while done < steps:
        for images, labels, codes in loader:
            images, labels, codes = images.to(device) * 2 - 1, labels.to(device), codes.to(device)
            if autoencoder is not None:
                with torch.no_grad():
                    images = autoencoder.encode(images)[0]
            if model.output == "pair":
                images = torch.cat([images, F.one_hot(labels[:, 0], NUM_CLASSES).movedim(-1, 1).float() * 2 - 1], dim=1)
            optimizer.zero_grad(set_to_none=True)
            noise = torch.randn_like(images)
            timesteps = torch.randint(0, scheduler.num_train_timesteps, (images.shape[0],), device=device).long()
            noisy = scheduler.add_noise(original_samples=images, noise=noise, timesteps=timesteps)
            if mode == "mask":
                one_hot = F.one_hot(labels[:, 0], NUM_CLASSES).movedim(-1, 1).float()
                prediction = network(torch.cat([noisy, F.interpolate(one_hot, size=noisy.shape[2:], mode="area")], 1), timesteps)
            elif mode == "class":
                prediction = network(noisy, timesteps, class_labels=codes[:, 0])
            elif mode == "attributes":
                context = torch.stack([embed(codes[:, k]) for k, embed in enumerate(model.attribute_tokens)], dim=1)
                prediction = network(noisy, timesteps, context=context)
            else:
                prediction = network(noisy, timesteps)
            loss = F.mse_loss(prediction.float(), prediction_target(scheduler, images, noise, timesteps).float())
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def medsynth_loop(cfg: PipelineSettings, data: LabelledArrays, steps: int, *, batch: int, device: torch.device, plain: bool) -> float:
    """medsynth.training.train with the pipeline's loss and the preset's trainer options. Returns examples/s."""
    t = cfg.trainer
    model = build_model(cfg, device)
    layout = torch.channels_last if t.channels_last and not plain and cfg.data.spatial_dims == 2 else torch.contiguous_format
    model.to(memory_format=layout)
    if t.gradient_checkpointing and not plain:
        enable_activation_checkpointing(model.network)
    scheduler = build_scheduler(cfg.scheduler)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(warmup_cosine, warmup_steps=5, max_steps=steps))
    # a latent model trains from latents encoded once (trainer.latent_cache), as the train stage does
    cached = model.autoencoder is not None and t.latent_cache and not plain
    batches = (cached_latent_batches(encode_training_set(model, data, flip_dims=[], device=device), data,
                                     batch_size=batch, seed=0, flip_dims=[]) if cached
               else infinite_batches(data, batch_size=batch, seed=0))
    trained = torch.compile(model, **t.compile_options) if t.compile and not plain else model
    loss_fn = denoising_objective(model, scheduler, seed=0, device=device, memory_format=layout, encoded=cached)

    precision = "fp32" if plain else t.precision
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    result = train(trained, loss_fn=loss_fn, batches=batches, optimizer=optimizer, max_steps=steps, lr_scheduler=lr_scheduler,
                   ema=EMA(model), grad_clip=1.0, precision=precision, scaler=scaler, on_step=lambda *_: None, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result.examples_per_second


def flops_per_example(cfg: PipelineSettings, data: LabelledArrays, batch: int, device: torch.device) -> float:
    """Model FLOPs of one training step (forward and backward) divided by the batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg, device)
    images, labels, codes = (x[:batch].to(device) for x in (data.images, data.labels, data.codes))
    x0 = model.to_sample(images, labels)
    t = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        model(x0, t, model.condition(labels, codes)).square().mean().backward()
    return counter.get_total_flops() / batch


def timed(loop: functools.partial, device: torch.device) -> tuple[float, float]:
    """``(examples/s, peak MiB)``: the CUDA allocator's peak on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rate = loop()
    if device.type == "cuda":
        return rate, torch.cuda.max_memory_allocated(device) / 2**20
    return rate, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--plain", action="store_true", help="medsynth loop in fp32 without the preset's trainer options")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's trainer.batch_size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense peak of the device at the precision used")
    args = parser.parse_args()
    cfg = preset_config(args.preset, args.set)
    device = torch.device(args.device)
    batch = args.batch or cfg.trainer.batch_size
    data = random_data(cfg, max(4 * batch, 16))
    loops = {  # each takes the number of steps and returns examples/s
        "bare": functools.partial(bare_loop, cfg, data, batch=batch, device=device),
        "medsynth": functools.partial(medsynth_loop, cfg, data, batch=batch, device=device, plain=args.plain),
    }
    for loop in loops.values():  # warm-up (and compilation)
        loop(3)
    rates: dict[str, list[float]] = {"bare": [], "medsynth": []}
    peaks: dict[str, float] = {"bare": 0.0, "medsynth": 0.0}
    for repeat in range(args.repeats):  # alternate which loop goes first
        for name in (["bare", "medsynth"] if repeat % 2 == 0 else ["medsynth", "bare"]):
            rate, peak = timed(functools.partial(loops[name], args.steps), device)
            rates[name].append(rate)
            peaks[name] = max(peaks[name], peak)
    t = cfg.trainer
    options = "fp32 (plain)" if args.plain else (
        f"{t.precision}{', channels_last' if t.channels_last else ''}{', activation checkpointing' if t.gradient_checkpointing else ''}"
        f"{', compiled' if t.compile else ''}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    model = build_model(cfg, device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    print(f"preset {args.preset} {' '.join(args.set)}: {cfg.model.conditioning} conditioning, "
          f"{'latent ' if model.autoencoder is not None else ''}{cfg.data.spatial_dims}D {list(cfg.data.size)}, "
          f"{n_params:.2f}M trained parameters, batch {batch}; device {name}; medsynth loop: {options}")
    for label in ("bare", "medsynth"):
        values = rates[label]
        print(f"{label:9s}: {', '.join(f'{x:.2f}' for x in values)} examples/s (median {statistics.median(values):.2f}), "
              f"peak memory {peaks[label]:.0f} MiB{' (process RSS)' if device.type == 'cpu' else ''}")
    print(f"ratio medsynth / bare: {statistics.median(rates['medsynth']) / statistics.median(rates['bare']):.3f}")
    flops = flops_per_example(cfg, data, batch, device)
    print(f"model FLOPs per example (forward + backward): {flops / 1e9:.2f} GFLOP")
    if args.peak_tflops:
        for label, values in rates.items():
            print(f"MFU {label}: {statistics.median(values) * flops / (args.peak_tflops * 1e12):.2%}")


if __name__ == "__main__":
    main()

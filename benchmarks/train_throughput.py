"""Training throughput of medsynth's loop against a bare loop written as MONAI's tutorials write it.

Usage:
    python benchmarks/train_throughput.py [--steps 30] [--repeats 3] [--device cpu|cuda]

Both loops train the demo's network (DiffusionModelUNet, 1.1M parameters, mask conditioning) on
batches of 16 random 64x64 images with 4-class label maps, with the same DDPM scheduler and AdamW.
medsynth's loop adds what it always does: per-step seeded noise, gradient clipping, LR schedule,
EMA update and the loss callback. Runs alternate (bare, ours, bare, ours, ...) after one warm-up
each, the order flipping every repeat, and the ratio of medians is reported, so drift of a shared machine affects both alike.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from medsynth.data import LabelledArrays, infinite_batches, step_generator
from medsynth.diffusion import Denoiser, diffusion_loss
from medsynth.train import EMA, train, warmup_cosine

NUM_CLASSES, SIZE, BATCH = 4, 64, 16


def network() -> DiffusionModelUNet:
    torch.manual_seed(0)
    return DiffusionModelUNet(
        spatial_dims=2, in_channels=1 + NUM_CLASSES, out_channels=1, channels=(32, 64, 64),
        attention_levels=(False, False, True), num_res_blocks=1, num_head_channels=32, norm_num_groups=16,
    )


def bare_loop(data: LabelledArrays, steps: int, device: torch.device) -> float:
    """The tutorial loop: DataLoader, noise, add_noise, forward, MSE, backward, step. Returns images/s."""
    model = network().to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.images, data.labels), batch_size=BATCH,
                                         shuffle=True, drop_last=True)
    done, start = 0, time.perf_counter()
    while done < steps:
        for images, labels in loader:
            images, labels = images.to(device) * 2 - 1, labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            noise = torch.randn_like(images)
            timesteps = torch.randint(0, scheduler.num_train_timesteps, (images.shape[0],), device=device).long()
            noisy = scheduler.add_noise(original_samples=images, noise=noise, timesteps=timesteps)
            condition = F.one_hot(labels[:, 0], NUM_CLASSES).movedim(-1, 1).float()
            prediction = model(torch.cat([noisy, condition], dim=1), timesteps)
            loss = F.mse_loss(prediction.float(), noise.float())
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * BATCH / (time.perf_counter() - start)


def medsynth_loop(data: LabelledArrays, steps: int, device: torch.device) -> float:
    """medsynth.train.train with the pipeline's loss, EMA, clipping and LR schedule. Returns images/s."""
    model = Denoiser(network(), conditioning="mask", num_classes=NUM_CLASSES).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(warmup_cosine, warmup_steps=5, max_steps=steps))
    batches = infinite_batches(data, batch_size=BATCH, seed=0)

    def loss_fn(m, batch, step):
        images, labels = batch
        return diffusion_loss(m, images.to(device) * 2 - 1, labels.to(device), scheduler, generator=step_generator(0, step, 3))

    result = train(model, loss_fn=loss_fn, batches=batches, optimizer=optimizer, max_steps=steps, lr_scheduler=lr_scheduler,
                   ema=EMA(model), grad_clip=1.0, on_step=lambda *_: None, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result.examples_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (128, 1, SIZE, SIZE), generator=g)
    data = LabelledArrays(torch.rand(128, 1, SIZE, SIZE, generator=g), labels, [str(i) for i in range(128)], [])
    bare_loop(data, 3, device), medsynth_loop(data, 3, device)  # warm-up
    bare, ours = [], []
    for repeat in range(args.repeats):  # alternate which loop goes first
        pair = [(bare, bare_loop), (ours, medsynth_loop)]
        for results, loop in (pair if repeat % 2 == 0 else pair[::-1]):
            results.append(loop(data, args.steps, device))
    print(f"device {device}, {torch.get_num_threads()} threads, batch {BATCH} of {SIZE}x{SIZE}, {args.steps} steps x {args.repeats}")
    print(f"bare tutorial loop : {', '.join(f'{x:.1f}' for x in bare)} images/s (median {statistics.median(bare):.1f})")
    print(f"medsynth loop      : {', '.join(f'{x:.1f}' for x in ours)} images/s (median {statistics.median(ours):.1f})")
    print(f"ratio medsynth / bare: {statistics.median(ours) / statistics.median(bare):.3f}")


if __name__ == "__main__":
    main()

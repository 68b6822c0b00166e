"""Seconds per sample and peak memory of each sampler at its default steps, with a realism figure beside each.

Usage:
    python benchmarks/sampling_speed.py --checkpoint outputs/demo/checkpoints/last.pt --data outputs/demo/data
        [--rflow-checkpoint PATH [--rflow-data DIR]] [--num 16] [--batch 16] [--device auto]
        [--ddpm-steps 1000] [--ddim-steps 50] [--rflow-steps 50] [--guidance-scale 3.0] [--seed 1000]

``--checkpoint`` is a trained medsynth checkpoint and ``--data`` the data folder it was trained on
(``make demo`` leaves them under ``outputs/demo``). A 3D model goes through the same code path: run
the script again with its checkpoint and data folder.

Each sampler draws ``--num`` samples with the model's EMA weights (``medsynth.Generator``), conditioned on the holdout
split's label maps (mask models) or attributes (class/attributes models), record ``i % len(holdout)``
for sample ``i``, seeds ``seed + i``: every sampler gets the same conditions and starting noise.

- DDPM (ancestral) at ``--ddpm-steps`` (1000, the training schedule's length) and DDIM (eta 0) at
  ``--ddim-steps`` (50, ``generate.steps``) for a DDPM/DDIM-trained model;
- RFlow at ``--rflow-steps`` for a model trained with rectified flow (``scheduler=rflow``): the
  checkpoint itself when it is one, or ``--rflow-checkpoint``. A DDPM/DDIM sampler cannot run a
  flow model and the reverse, so each model gets only the samplers that fit it; the speed-up of
  RFlow is still taken against the DDPM-1000 row when both models are given (same network size
  in the presets, so the same cost per step).

Each sampler runs in a fresh process after a two-step warm-up at each batch size it uses (the
first call at a new shape is slow), so its peak memory is its own:
the CUDA allocator's peak on a GPU, the process's peak resident memory on the CPU (with the part
above the memory held after loading model and data, "MiB over load").

Realism, against the real holdout images (the evaluation's figures, on few samples, so read them
beside the reference row of as many real training images):

- ``kid_features``: kernel inception distance (cubic-kernel unbiased MMD^2) on the features of the
  evaluation's encoder, ``data/encoder.pt`` (2.5D per-volume features for 3D), when that file was
  trained on this data folder's manifest; lower is better, about 0 means the same distribution;
- ``intensity_w1``: mean over tissues of the Wasserstein-1 distance of tissue intensities ([0, 1]
  scale) between the synthetic and holdout images, for models whose samples have label maps;
  lower is better.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

SAMPLERS = {"DDPM": "ddpm", "DDIM": "ddim", "RFlow": "rflow"}
"""Row name -> sampler name (``generate.sampler``)."""


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def realism(data: str, images: Any, labels: Any, *, num: int, seed: int) -> dict[str, float | None]:
    """KID on encoder features and mean tissue-intensity W1 against the holdout, and the same for ``num`` training images.

    Args:
        data: The data folder.
        images: ``(N, C, *spatial)`` synthetic images in [0, 1] (CPU tensor), or ``None`` for a real reference row.
        labels: Their label maps, or ``None``.
        num: Training images in the reference row.
        seed: Seed for the reference subsample and KID's subsets.

    Returns:
        ``{"kid_features": ..., "intensity_w1": ...}``; ``None`` where a figure cannot be computed.
    """
    import numpy as np

    from medsynth.data import load_split, read_manifest
    from medsynth.evaluation.instruments import features, saved_encoder
    from medsynth.metrics import kernel_inception_distance, tissue_intensity_distances

    manifest = read_manifest(data)
    holdout = load_split(manifest, "holdout")
    if images is None:
        train = load_split(manifest, "train")
        pick = np.random.default_rng(seed).choice(len(train), size=min(num, len(train)), replace=False)
        images, labels = train.images[pick], train.labels[pick]
    out: dict[str, float | None] = {"kid_features": None, "intensity_w1": None}
    encoder = saved_encoder(data)  # None unless data/encoder.pt was trained on this manifest
    if encoder is not None:
        out["kid_features"] = kernel_inception_distance(features(encoder, holdout.images).items,
                                                        features(encoder, images).items, seed=seed)[0]
    if labels is not None:
        w1 = tissue_intensity_distances(holdout.images.numpy(), holdout.labels.numpy(), images.numpy(), labels.numpy(),
                                        label_names=manifest.label_names)
        out["intensity_w1"] = float(np.mean(list(w1.values()))) if w1 else None
    return out


def measure(*, checkpoint: str, data: str, sampler: str, steps: int, num: int, batch: int, device: str,
            guidance_scale: float, seed: int) -> dict[str, Any]:
    """Draw ``num`` samples with one sampler in this process; time, peak memory and realism.

    Returns:
        ``{"seconds_per_sample", "peak_mib", "mib_over_load", "kid_features", "intensity_w1", ...}``,
        or ``{"skipped": reason}`` when the sampler does not fit the model.
    """
    import torch

    from medsynth import ConfigError
    from medsynth.data import load_split, read_manifest
    from medsynth.diffusion.generator import Generator
    from medsynth.stages.context import pick_device

    dev = pick_device(device)
    generator = Generator.from_checkpoint(checkpoint, device=dev)
    try:
        scheduler = generator.sampler(SAMPLERS[sampler])
    except ConfigError:
        trained = generator.scheduler._target_.rsplit(".", 1)[-1]
        return {"skipped": f"the model was trained with {trained}, which {sampler} cannot sample"}
    manifest = read_manifest(data)
    holdout = load_split(manifest, "holdout", vocabulary=generator.model.vocabulary)
    picks = [i % len(holdout) for i in range(num)]
    given = holdout.labels[picks] if generator.conditioning == "mask" else None
    codes = holdout.codes[picks] if generator.guided else None

    def draw(start: int, stop: int, n_steps: int) -> Any:
        return generator.sample([seed + i for i in range(start, stop)], steps=n_steps, eta=0.0,
                                guidance_scale=guidance_scale, sampler=scheduler,
                                labels=given[start:stop] if given is not None else None,
                                codes=codes[start:stop] if codes is not None else None)

    for size in sorted({min(batch, num), num % batch} - {0}):
        draw(0, size, 2)  # warm-up for every batch shape used: allocator, kernel selection, autotuning
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    loaded = _rss_mib()
    start_time = time.perf_counter()
    parts = [draw(start, min(start + batch, num), steps) for start in range(0, num, batch)]  # samples come back on the CPU
    seconds = time.perf_counter() - start_time
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _rss_mib()
    images = torch.cat([p.images for p in parts]) if parts[0].images is not None else None
    labels = torch.cat([p.labels for p in parts]) if parts[0].labels is not None else None
    out: dict[str, Any] = {
        "seconds_per_sample": seconds / num, "seconds": seconds, "peak_mib": peak,
        "mib_over_load": None if dev.type == "cuda" else peak - loaded, "device": str(dev),
        "parameters": sum(p.numel() for p in generator.model.parameters()), "spatial_dims": manifest.spatial_dims,
    }
    if images is not None:
        out.update(realism(data, images.float(), labels, num=num, seed=0))
    return out


def _run_child(args: argparse.Namespace, job: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh Python process (so its peak memory is its own)."""
    cmd = [sys.executable, __file__, "--child", json.dumps(job)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line and not line[0].isspace()]
        return {"skipped": "failed: " + (errors[-1] if errors else f"exit status {done.returncode}")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="trained medsynth checkpoint (e.g. outputs/demo/checkpoints/last.pt)")
    parser.add_argument("--data", help="its data folder (e.g. outputs/demo/data)")
    parser.add_argument("--rflow-checkpoint", help="a checkpoint trained with scheduler=rflow, for the RFlow row")
    parser.add_argument("--rflow-data", help="its data folder (default: --data)")
    parser.add_argument("--num", type=int, default=16, help="samples per sampler")
    parser.add_argument("--batch", type=int, default=16, help="samples per sampling batch")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--rflow-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="for class/attributes models")
    parser.add_argument("--seed", type=int, default=1000, help="sample i uses seed + i")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    if not args.checkpoint or not args.data:
        parser.error("--checkpoint and --data are required")

    common = dict(num=args.num, batch=args.batch, device=args.device, guidance_scale=args.guidance_scale, seed=args.seed)
    main_model = dict(checkpoint=args.checkpoint, data=args.data)
    jobs = [("DDPM", args.ddpm_steps, main_model), ("DDIM", args.ddim_steps, main_model), ("RFlow", args.rflow_steps, main_model)]
    if args.rflow_checkpoint:
        jobs[2] = ("RFlow", args.rflow_steps, dict(checkpoint=args.rflow_checkpoint, data=args.rflow_data or args.data))
    rows: list[tuple[str, int, str, dict[str, Any]]] = []
    for sampler, steps, model in jobs:
        print(f"{sampler} {steps} steps on {model['checkpoint']} ...", file=sys.stderr, flush=True)
        result = _run_child(args, dict(sampler=sampler, steps=steps, **model, **common))
        rows.append((sampler, steps, model["checkpoint"], result))
    folders = list(dict.fromkeys(model["data"] for _, _, model in jobs))
    references = {folder: realism(folder, None, None, num=args.num, seed=0) for folder in folders}

    ddpm = next((r for s, _, _, r in rows if s == "DDPM" and "seconds_per_sample" in r), None)
    measured = [r for *_, r in rows if "seconds_per_sample" in r]
    device = measured[0]["device"] if measured else args.device
    memory = "peak CUDA MiB" if device.startswith("cuda") else "peak RSS MiB (over load)"
    print(f"\n{args.num} samples per sampler, batch {args.batch}, device {device}\n")
    print(f"| sampler | steps | s/sample | {memory} | speed-up vs DDPM-{args.ddpm_steps} | kid_features | intensity_w1 |")
    print("|---|---|---|---|---|---|---|")
    for sampler, steps, checkpoint, r in rows:
        if "skipped" in r:
            print(f"| {sampler} | {steps} | skipped: {r['skipped']} | | | | |")
            continue
        mem = f"{r['peak_mib']:.0f}" + (f" ({r['mib_over_load']:.0f})" if r["mib_over_load"] is not None else "")
        speedup = f"{ddpm['seconds_per_sample'] / r['seconds_per_sample']:.1f}x" if ddpm else "n/a"
        other = "" if checkpoint == args.checkpoint else " (rflow model)"
        print(f"| {sampler}{other} | {steps} | {r['seconds_per_sample']:.3f} | {mem} | {speedup} | "
              f"{_fmt(r.get('kid_features'), '.4f')} | {_fmt(r.get('intensity_w1'), '.4f')} |")
    for folder, reference in references.items():
        where = f", {folder}" if len(references) > 1 else ""
        print(f"| real training images ({args.num}{where}) | | | | | {_fmt(reference['kid_features'], '.4f')} | "
              f"{_fmt(reference['intensity_w1'], '.4f')} |")
    if not args.rflow_checkpoint and rows[2][3].get("skipped"):
        print("\nRFlow needs a model trained with scheduler=rflow: pass --rflow-checkpoint.")
    for folder, reference in references.items():
        if reference["kid_features"] is None:
            print(f"\nkid_features: no encoder.pt trained on {folder}/manifest.json (run `medsynth evaluate` once to make it).")


if __name__ == "__main__":
    main()

"""Every figure that needs a GPU, in one command that prints one markdown table.

Usage:
    python benchmarks/gpu_suite.py [--dry-run] [--budget SECONDS] [--log outputs/gpu_suite.log]

Sections, each in its own process with its share of the time budget (a section that runs out of
time or memory is reported as such and the suite goes on):

- **train 2D**: ``train_throughput.py`` on ``brain2d_joint_gpu`` (bf16, channels_last): medsynth's
  loop against the fp32 loop of MONAI's tutorials, examples/s, the ratio, peak memory and model
  FLOPs utilisation against the GPU's dense bf16 peak; then the same with ``trainer.compile=true``.
- **train 3D**: the same script on ``brain3d_ddpm_gpu`` and ``brain3d_latent_gpu``: step time
  (batch / examples per second) and peak memory of medsynth's loop.
- **latent cache**: ``latent_cache.py`` on ``brain3d_latent_gpu``: step time with the training set
  encoded once against encoding every batch, and the one-off encoding time.
- **sample**: ``sample_cost.py``: one sample of a 128^3 latent volume (``brain3d_latent_gpu``, the
  network at its initial weights: the cost of sampling does not depend on them) in fp32 and under
  bf16 autocast, then 256^3 if it fits: seconds per sample and per step, peak memory.
- **tests**: ``tests/test_gpu.py``, which runs on the best device there is.

``--dry-run`` runs every section on the CPU at tiny sizes (16-pixel images, 2 steps), to show the
suite works before a GPU is lent; its figures mean nothing. Without ``--dry-run`` the suite refuses
to start when CUDA is not available.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 peak (TFLOP/s) by GPU family, for the utilisation figure; unknown GPUs get none."""

TINY_2D = ["data.size=[16,16]", "model.network.channels=[8,16]", "model.network.attention_levels=[false,false]",
           "model.network.norm_num_groups=8", "model.network.num_head_channels=8", "trainer.batch_size=2"]
TINY_3D = ["data.size=[16,16,16]", "model.network.channels=[8,16]", "model.network.attention_levels=[false,false]",
           "model.network.norm_num_groups=8", "model.network.num_head_channels=8", "trainer.batch_size=1"]
TINY_LATENT = ["data.size=[16,16,16]", "model.network.channels=[8,16]", "model.network.attention_levels=[false,false]",
               "model.network.norm_num_groups=8", "model.network.num_head_channels=8", "model.autoencoder.network.channels=[8,8,8]",
               "model.autoencoder.network.norm_num_groups=8", "model.autoencoder.decode_tile=null", "trainer.batch_size=1"]


@dataclass
class Section:
    """One measurement: a command and the figures read from its output."""

    name: str
    command: list[str]
    share: float  # of the time budget
    optional: bool = False  # running out of memory is a result, not a failure (256^3 "if it fits")
    figures: dict[str, str] = field(default_factory=dict)
    status: str = "not run"
    seconds: float = 0.0
    output: str = ""


def train_command(preset: str, overrides: list[str], *, steps: int, repeats: int, device: str,
                  peak: float | None) -> list[str]:
    command = [sys.executable, str(HERE / "train_throughput.py"), "--preset", preset, "--steps", str(steps),
               "--repeats", str(repeats), "--device", device]
    command += [f"--set={o}" for o in overrides]
    return command + (["--peak-tflops", str(peak)] if peak else [])


def read_train(output: str) -> dict[str, str]:
    """The figures ``train_throughput.py`` prints."""
    figures = {}
    for loop in ("bare", "medsynth"):
        found = re.search(rf"^{loop}\s*: .*\(median ([\d.]+)\), peak memory (\d+) MiB", output, re.M)
        if found:
            figures[f"{loop} examples/s"], figures[f"{loop} peak MiB"] = found.groups()
        mfu = re.search(rf"^MFU {loop}: ([\d.]+%)", output, re.M)
        if mfu:
            figures[f"{loop} MFU"] = mfu.group(1)
    ratio = re.search(r"^ratio medsynth / bare: ([\d.]+)", output, re.M)
    if ratio:
        figures["ratio medsynth / bare"] = ratio.group(1)
    batch = re.search(r", batch (\d+);", output)
    if batch and "medsynth examples/s" in figures:
        figures["medsynth step s"] = f"{int(batch.group(1)) / float(figures['medsynth examples/s']):.3f}"
    return figures


def sample_command(preset: str, overrides: list[str], *, steps: int, device: str) -> list[str]:
    return [sys.executable, str(HERE / "sample_cost.py"), "--preset", preset, "--steps", str(steps), "--device", device,
            "--json", *(f"--set={o}" for o in overrides)]


def read_sample(output: str) -> dict[str, str]:
    line = next((x for x in reversed(output.splitlines()) if x.startswith("SAMPLE ")), None)
    if line is None:
        return {}
    return {k: (f"{v:.0f}" if "MiB" in k else f"{v:.3g}") for k, v in json.loads(line[len("SAMPLE "):]).items()}


def read_cache(output: str) -> dict[str, str]:
    """The figures ``latent_cache.py`` prints."""
    figures = {}
    for arm, key in (("encode every batch", "uncached step ms"), ("cached", "cached step ms")):
        found = re.search(rf"^{arm}\s*: .*; step ([\d.]+) ms", output, re.M)
        if found:
            figures[key] = found.group(1)
    ratio = re.search(r"^step time cached / encode every batch: ([\d.]+)", output, re.M)
    if ratio:
        figures["ratio cached / uncached"] = ratio.group(1)
    once = re.search(r"^encoding once: ([\d.]+) s", output, re.M)
    if once:
        figures["encoding once s"] = once.group(1)
    return figures


def read_tests(output: str) -> dict[str, str]:
    found = re.search(r"(\d+ passed[^\n=]*)", output)
    return {"pytest": found.group(1).strip()} if found else {}


def sections(*, dry_run: bool, device: str, peak: float | None) -> list[Section]:
    """The suite, at full size or (``dry_run``) tiny on the CPU."""
    steps, repeats, sample_steps = (2, 1, 2) if dry_run else (20, 4, 50)
    tiny2d, tiny3d, tiny_latent = (TINY_2D, TINY_3D, TINY_LATENT) if dry_run else ([], [], [])
    big = ["data.size=[256,256,256]"] if not dry_run else ["data.size=[32,32,32]", *TINY_LATENT[1:]]
    return [
        Section("train 2D brain2d_joint_gpu", train_command("brain2d_joint_gpu", tiny2d, steps=steps, repeats=repeats,
                                                            device=device, peak=peak), 0.15),
        Section("train 2D brain2d_joint_gpu, compiled",
                train_command("brain2d_joint_gpu", [*tiny2d, "trainer.compile=true"], steps=steps, repeats=repeats,
                              device=device, peak=peak), 0.2),  # compiling takes a minute or more
        Section("train 3D brain3d_ddpm_gpu", train_command("brain3d_ddpm_gpu", tiny3d, steps=max(2, steps // 4),
                                                           repeats=min(repeats, 2), device=device, peak=peak), 0.12),
        Section("train 3D brain3d_latent_gpu", train_command("brain3d_latent_gpu", tiny_latent, steps=max(2, steps // 4),
                                                             repeats=min(repeats, 2), device=device, peak=peak), 0.12),
        Section("latent cache brain3d_latent_gpu",
                [sys.executable, str(HERE / "latent_cache.py"), "--preset", "brain3d_latent_gpu", "--device", device,
                 "--steps", str(max(2, steps // 4)), "--repeats", str(min(repeats, 2)), "--examples", "4" if dry_run else "8",
                 *(f"--set={o}" for o in tiny_latent)], 0.11),
        Section("sample latent 128^3 (brain3d_latent_gpu)",
                sample_command("brain3d_latent_gpu", tiny_latent, steps=sample_steps, device=device), 0.1),
        Section("sample latent 256^3 (brain3d_latent_gpu)",
                sample_command("brain3d_latent_gpu", big, steps=sample_steps, device=device), 0.1, optional=True),
        Section("tests/test_gpu.py", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      str(ROOT / "tests" / "test_gpu.py")], 0.1),
    ]


READERS = {"train": read_train, "latent cache": read_cache, "sample": read_sample, "tests/": read_tests}


def run(section: Section, *, timeout: float) -> None:
    started = time.monotonic()
    try:
        done = subprocess.run(section.command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        section.output = done.stdout + done.stderr
        oom = "out of memory" in section.output.lower()
        section.status = "ok" if done.returncode == 0 else ("out of memory" if oom else f"failed (exit {done.returncode})")
    except subprocess.TimeoutExpired as err:
        section.output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        section.status = f"ran past its {timeout:.0f} s"
    section.seconds = time.monotonic() - started
    reader = next(read for prefix, read in READERS.items() if section.name.startswith(prefix))
    section.figures = reader(section.output)


def table(results: list[Section], *, device_name: str, dry_run: bool) -> str:
    lines = [f"GPU suite on {device_name}{' (dry run: tiny sizes on the CPU, figures meaningless)' if dry_run else ''}",
             "", "| section | status | s | figures |", "|---|---|---|---|"]
    for s in results:
        figures = ", ".join(f"{k} {v}" for k, v in s.figures.items()) or "-"
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {figures} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks that the suite runs")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole suite (default 480; 1500 for --dry-run: a CPU compiles slowly)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME",
                        help="leave out the sections whose name starts with NAME (e.g. tests/, which the test suite runs itself)")
    parser.add_argument("--log", type=Path, default=ROOT / "outputs" / "gpu_suite.log",
                        help="every section's full output")
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; run with --dry-run to check the suite on the CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    device_name = "cpu" if args.dry_run else torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    budget = args.budget or (1500.0 if args.dry_run else 480.0)
    skip = tuple(args.skip)
    results = [s for s in sections(dry_run=args.dry_run, device=device, peak=peak) if not (skip and s.name.startswith(skip))]
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "w") as log:
        for section in results:
            print(f"gpu_suite: {section.name} ...", file=sys.stderr, flush=True)
            run(section, timeout=max(30.0, section.share * budget))
            print(f"gpu_suite: {section.name}: {section.status} in {section.seconds:.0f} s", file=sys.stderr, flush=True)
            log.write(f"==== {section.name}: {section.status}\n$ {' '.join(section.command)}\n{section.output}\n")
    print(table(results, device_name=device_name, dry_run=args.dry_run))
    return 0 if all(s.status == "ok" or (s.optional and s.status == "out of memory") for s in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())

"""``benchmarks/gpu_suite.py --dry-run``: every section of the GPU suite runs, at tiny sizes on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_dry_run_finishes_every_section(tmp_path: Path) -> None:
    log = tmp_path / "gpu_suite.log"
    # tests/test_gpu.py is left out: the test suite runs it itself (the section is one pytest command)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--skip", "tests/",
                           "--log", str(log)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log.read_text()[-5000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[0].lstrip("| ") for row in rows] == [
        "train 2D brain2d_joint_gpu", "train 2D brain2d_joint_gpu, compiled", "train 3D brain3d_ddpm_gpu",
        "train 3D brain3d_latent_gpu", "latent cache brain3d_latent_gpu", "sample latent 128^3 (brain3d_latent_gpu)",
        "sample latent 256^3 (brain3d_latent_gpu)"]
    assert all(row[1] == "ok" for row in rows), done.stdout
    figures = {row[0].lstrip("| "): row[3] for row in rows}
    for name in list(figures)[:4]:
        assert "ratio medsynth / bare" in figures[name] and "medsynth peak MiB" in figures[name], figures[name]
    assert "ratio cached / uncached" in figures["latent cache brain3d_latent_gpu"]
    assert "fp32 s/sample" in figures["sample latent 128^3 (brain3d_latent_gpu)"]
    assert "bf16 s/sample" in figures["sample latent 128^3 (brain3d_latent_gpu)"]
    assert "GPU suite on cpu (dry run" in done.stdout

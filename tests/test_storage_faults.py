"""Storage faults: a disk that fills mid-write, a damaged ``last.pt``, a read-only output folder.

The full disk and the read-only folder are real: a small tmpfs mounted for the test (the ``tmpfs``
fixture of conftest.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from medsynth.io import DiskFullError, write_json
from medsynth.io.atomic import is_temporary
from medsynth.training.checkpoint import DamagedCheckpointError, load_checkpoint, save_step_checkpoint
from tests.conftest import TINY, phantom_overrides, run_stage


def _state(kilobytes: int, fill: float) -> dict[str, object]:
    return {"step": int(fill), "model": {"weight": torch.full((kilobytes * 256,), fill)}}


def test_full_disk_during_a_checkpoint_names_it_and_keeps_the_last_good_one(tmpfs) -> None:
    folder = tmpfs("512k") / "checkpoints"
    save_step_checkpoint(folder, 1, _state(100, 1.0), best=True, keep=3)

    with pytest.raises(DiskFullError) as caught:
        save_step_checkpoint(folder, 2, _state(1024, 2.0), best=True, keep=3)

    message = str(caught.value)
    assert "\n" not in message
    assert "step_0000002.pt" in message and "no space left" in message.lower()
    assert f"the last good checkpoint {folder / 'last.pt'} (step 1) is intact" in message
    assert "trainer.resume=auto" in message
    assert not (folder / "step_0000002.pt").exists()
    assert not [p for p in folder.iterdir() if is_temporary(p)], "a temporary file was left behind"
    for name in ("last.pt", "best.pt", "step_0000001.pt"):
        loaded = load_checkpoint(folder / name)
        assert loaded["step"] == 1 and torch.equal(loaded["model"]["weight"], torch.full((100 * 256,), 1.0))


def test_full_disk_while_a_record_is_written_keeps_the_old_file(tmpfs) -> None:
    folder = tmpfs("64k")
    path = write_json(folder / "manifest.json", {"records": ["old"]})

    with pytest.raises(DiskFullError) as caught:
        write_json(path, {"records": ["x" * 1000] * 200})

    assert "manifest.json" in str(caught.value) and "\n" not in str(caught.value)
    assert path.read_text() == write_json(folder.parent / "expected.json", {"records": ["old"]}).read_text()
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]


def test_training_on_a_full_disk_is_one_line_and_status_2(phantom, tmpfs, tmp_path: Path) -> None:
    checkpoints = tmpfs("16k")
    args = [*TINY, *phantom_overrides(*phantom), f"paths.output={tmp_path / 'out'}", f"paths.checkpoints={checkpoints}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "trainer.checkpoint_every=1"]
    env = {k: v for k, v in os.environ.items() if k != "MEDSYNTH_DEBUG"}
    for stage in ("preprocess", "train"):
        done = subprocess.run([sys.executable, "-m", "medsynth.cli", stage, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "no space left" in line.lower()]
    assert len(errors) == 1, done.stderr
    assert "there is no earlier checkpoint to continue from" in errors[0]
    assert not [p for p in checkpoints.rglob("*") if is_temporary(p)]


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_a_damaged_checkpoint_is_refused_not_loaded(damage: str, tmp_path: Path) -> None:
    path = save_step_checkpoint(tmp_path, 1, _state(64, 3.0), best=False, keep=3)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2] ^= 0x10  # inside the tensor data: torch.load alone would read wrong weights
    (tmp_path / "copy.pt").write_bytes(bytes(data))

    with pytest.raises(DamagedCheckpointError, match="copy.pt"):
        load_checkpoint(tmp_path / "copy.pt")


def test_resume_falls_back_from_a_damaged_last_pt_to_the_newest_whole_step(tiny_config, phantom, tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    common = [*phantom_overrides(*phantom), "trainer.checkpoint_every=2", "trainer.keep_last=3"]
    run_stage("preprocess", tiny_config(*common))
    run_stage("train", tiny_config(*common, "trainer.max_steps=4"))
    folder = Path(tiny_config(*common).paths.checkpoints)
    last = folder / "last.pt"
    assert os.path.samefile(last, folder / "step_0000004.pt")
    last.write_bytes(last.read_bytes()[:-4096])  # last.pt and step 4 are one file: both are damaged

    with caplog.at_level(logging.WARNING, logger="medsynth"):
        final = run_stage("train", tiny_config(*common, "trainer.max_steps=6", "trainer.resume=auto"))

    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(last) in warnings and "step_0000002.pt" in warnings
    assert "resuming from" in warnings
    assert load_checkpoint(final)["step"] == 6
    assert load_checkpoint(folder / "last.pt")["step"] == 6


def test_resume_with_every_checkpoint_damaged_says_what_to_do(tiny_config, phantom, tmp_path: Path) -> None:
    from medsynth import MedsynthError

    common = [*phantom_overrides(*phantom), "trainer.checkpoint_every=2", "trainer.keep_last=1"]
    run_stage("preprocess", tiny_config(*common))
    run_stage("train", tiny_config(*common, "trainer.max_steps=2"))
    last = Path(tiny_config(*common).paths.checkpoints) / "last.pt"
    last.write_bytes(b"not a checkpoint")  # replaces the shared file's content: step 2 is damaged too

    with pytest.raises(MedsynthError, match="no step checkpoint .* reads back whole"):
        run_stage("train", tiny_config(*common, "trainer.max_steps=4", "trainer.resume=auto"))


def test_a_read_only_output_folder_is_refused_before_any_work(phantom, tmpfs, tmp_path: Path) -> None:
    read_only = tmpfs("1m", read_only=True)
    env = {k: v for k, v in os.environ.items() if k != "MEDSYNTH_DEBUG"}
    for stage in ("preprocess", "run"):
        done = subprocess.run(
            [sys.executable, "-m", "medsynth.cli", stage, *TINY, *phantom_overrides(*phantom),
             f"paths.output={read_only / 'out'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert f"paths.output={read_only / 'out'} cannot be written (it is on a read-only file system)" in lines[0]
    assert list(read_only.iterdir()) == []
    assert not (tmp_path / "mlflow.db").exists(), "work started before the folder was checked"


def test_a_read_only_input_is_read_and_left_untouched(phantom, tmpfs, tiny_config, tmp_path: Path) -> None:
    source = tmpfs("4m")
    copies = [Path(shutil.copy(p, source / p.name)) for p in phantom]
    subprocess.run(["mount", "-o", "remount,ro", str(source)], check=True, capture_output=True)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in source.iterdir())

    manifest = run_stage("preprocess", tiny_config(*phantom_overrides(*copies)))

    assert len(manifest.records) > 0
    assert sorted((p.name, p.stat().st_mtime_ns) for p in source.iterdir()) == before


def test_temporary_names_are_recognised(tmp_path: Path) -> None:
    from medsynth.io.atomic import remove_temporaries, temporary_name

    final = tmp_path / "sub" / "image.nii.gz"
    tmp = temporary_name(final)
    assert is_temporary(tmp) and tmp.name.endswith(".tmp.nii.gz") and tmp.parent == final.parent
    assert not is_temporary(final) and not is_temporary(tmp_path / f".hidden.{uuid.uuid4().hex[:6]}.tmp")
    final.parent.mkdir()
    tmp.write_bytes(b"half")
    final.write_bytes(b"whole")
    assert remove_temporaries(tmp_path) == [tmp]
    assert final.read_bytes() == b"whole"

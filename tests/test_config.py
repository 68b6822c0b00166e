"""Every preset composes with the real config files, resolves, and keeps the command-line contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipelines.common import CONFIG_DIR
from tests.conftest import compose_config

PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
GROUPS = ["data", "model", "scheduler", "trainer", "generate", "evaluate", "mlflow", "paths", "experiment"]


def test_config_groups_exist() -> None:
    """conf/ holds one folder per config group named in the design."""
    for group in GROUPS:
        assert (Path(CONFIG_DIR) / group).is_dir(), group


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_resolves(preset: str) -> None:
    """Each preset composes and every interpolation resolves."""
    cfg = compose_config([f"experiment={preset}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["output"].endswith(cfg.name)
    assert resolved["mlflow"]["tracking_uri"].startswith("sqlite:///")
    assert cfg.model.network.spatial_dims == cfg.data.spatial_dims


def test_default_is_demo() -> None:
    """Without overrides the CPU demo on MNI152 is selected."""
    cfg = compose_config()
    assert cfg.name == "demo"
    assert cfg.data.source == "mni152"
    assert list(cfg.data.size) == [64, 64]
    assert cfg.model.conditioning == "mask"


def test_contract_overrides_are_accepted(tmp_path: Path) -> None:
    """The overrides users type often exist under their documented names."""
    cfg = compose_config([
        f"paths.input={tmp_path}", f"paths.output={tmp_path / 'o'}", "mlflow.tracking_uri=sqlite:///x.db",
        "trainer.max_steps=7", "generate.num_samples=3", "generate.steps=4", "generate.formats=[nifti]",
        "model.conditioning=mask", "data=demo",
    ])
    assert cfg.trainer.max_steps == 7 and cfg.generate.num_samples == 3 and cfg.generate.steps == 4
    assert cfg.paths.data == str(tmp_path / "o" / "data")
    assert list(cfg.generate.formats) == ["nifti"]


def test_unknown_key_is_rejected() -> None:
    """A misspelt key fails at composition instead of being silently ignored."""
    with pytest.raises(Exception, match="trainer.max_stepz"):
        compose_config(["trainer.max_stepz=3"])


# shrink what the presets make large: 3D sizes, the latent autoencoder, the label-map generator's vocabulary
PRESET_TINY = [
    "model.autoencoder.network.channels=[8,8,8]", "model.autoencoder.network.norm_num_groups=8",
    "trainer.autoencoder.max_steps=2", "trainer.autoencoder.batch_size=2",
]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_one_tiny_step(preset: str, tiny_config, phantom, tmp_path: Path) -> None:
    """Every preset's wiring (conditioning, scheduler, trainer options, 2D or 3D) runs one step on the CPU."""
    from pipelines import preprocess, train
    from tests.conftest import phantom_overrides, write_volume_dataset

    composed = compose_config([f"experiment={preset}"])
    tiny = [o for o in PRESET_TINY if composed.model.autoencoder or not o.startswith(("model.autoencoder", "trainer.auto"))]
    if composed.data.spatial_dims == 3:
        cfg = tiny_config(f"experiment={preset}", "data.size=[16,16,16]", *tiny, "trainer.max_steps=1", "trainer.device=cpu")
        write_volume_dataset(Path(cfg.paths.data))
    else:
        cfg = tiny_config(f"experiment={preset}", *phantom_overrides(*phantom), *tiny, "trainer.max_steps=1",
                          "trainer.device=cpu")
        preprocess.run(cfg)
    trained = train.run(cfg)
    checkpoint = torch.load(trained, weights_only=True)
    assert checkpoint["step"] == 1 and checkpoint["config"]["name"] == composed.name

"""Every preset composes with the real config files, passes the schema, and keeps the command-line contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsynth import ConfigError
from medsynth.config import PipelineSettings, config_dir, to_mapping
from medsynth.config.settings import require_label_source
from tests.conftest import compose_config, run_stage

CONFIG_DIR = config_dir()
PRESETS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUPS = ["data", "model", "scheduler", "trainer", "generate", "encoder", "evaluate", "mlflow", "paths", "experiment"]


def test_config_groups_exist() -> None:
    """conf/ holds one folder per config group named in the design."""
    for group in GROUPS:
        assert (CONFIG_DIR / group).is_dir(), group


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_passes_the_schema(preset: str) -> None:
    """Each preset composes, every interpolation resolves, and every key and value passes the schema."""
    cfg = compose_config([f"experiment={preset}"])  # compose checks the schema: a bad key raises ConfigError
    assert isinstance(cfg, PipelineSettings)
    assert cfg.paths.output.endswith(cfg.name)
    assert cfg.mlflow.tracking_uri.startswith("sqlite:///")
    assert cfg.model.spatial_dims == cfg.data.spatial_dims
    assert "${" not in repr(to_mapping(cfg))


def test_default_is_demo() -> None:
    """Without overrides the CPU demo is selected: a cohort made from MNI152, image and label map generated together."""
    cfg = compose_config()
    assert cfg.name == "demo"
    assert cfg.data.source == "mni152_cohort"
    assert list(cfg.data.size) == [64, 64]
    assert cfg.model.conditioning == "joint"


def test_user_data_defaults_reuse_no_training_label_map() -> None:
    """A user's own data, with the defaults, gets joint generation; a mask model must be told where its maps come from."""
    for data in ("dicom", "nnunet", "demo_cohort"):
        assert compose_config([f"data={data}"]).model.conditioning == "joint"
    mask = compose_config(["model.conditioning=mask"])
    assert mask.generate.labels.source is None
    with pytest.raises(ConfigError, match=r"^generate\.labels\.source must be a choice .*generator.*folder.*train"):
        require_label_source(mask.model.conditioning, mask.generate.labels)
    require_label_source("joint", mask.generate.labels)  # joint models draw their own label maps
    old = compose_config(["experiment=demo_train_labels"])
    assert (old.data.source, old.model.conditioning, old.generate.labels.source) == ("mni152", "mask", "train")


def test_dp_alias_takes_keys_beside_it() -> None:
    """``trainer.privacy=dp`` turns DP-SGD on and the group's keys can still be set on the same command line."""
    cfg = compose_config(["trainer.privacy=dp", "trainer.privacy.target_epsilon=1"])
    assert cfg.trainer.privacy.enabled and cfg.trainer.privacy.target_epsilon == 1.0
    assert not compose_config(["trainer.privacy=off"]).trainer.privacy.enabled


def test_contract_overrides_are_accepted(tmp_path: Path) -> None:
    """The overrides users type often exist under their documented names."""
    cfg = compose_config([
        f"paths.input={tmp_path}", f"paths.output={tmp_path / 'o'}", "mlflow.tracking_uri=sqlite:///x.db",
        "trainer.max_steps=7", "generate.num_samples=3", "generate.steps=4", "generate.formats=[nifti]",
        "model.conditioning=mask", "data=demo", "trainer.resume=auto", "device=cpu",
    ])
    assert cfg.trainer.max_steps == 7 and cfg.generate.num_samples == 3 and cfg.generate.steps == 4
    assert cfg.paths.data == str(tmp_path / "o" / "data")
    assert list(cfg.generate.formats) == ["nifti"]
    assert cfg.trainer.resume == "auto" and cfg.run.device == "cpu"


def test_unknown_key_is_rejected() -> None:
    """A misspelt key fails at composition instead of being silently ignored."""
    with pytest.raises(ConfigError, match="trainer.max_stepz"):
        compose_config(["trainer.max_stepz=3"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_stepz=3"], r"^unknown config key trainer\.max_stepz; trainer accepts: .*max_steps"),
        (["+trainer.max_stepz=3"], r"^unknown config key trainer\.max_stepz; trainer accepts: .*max_steps"),
        (["data=foo"], r"^unknown option data=foo; data accepts: demo, demo_cohort, dicom, dicomweb, folder, nifti, nnunet$"),
        (["model.network.chanels=[8]"], r"^unknown config key model\.network\.chanels; .*\+model\.network\.chanels="),
        (["generate.guidance_scale=-1"], r"^generate\.guidance_scale must be a number >= 0, got -1"),
        (["scheduler=rflow", "trainer.sampling.sampler=ddpm"], r"^trainer\.sampling\.sampler must be .*rflow"),
    ],
)
def test_config_errors_name_the_key_and_what_it_accepts(overrides: list[str], message: str) -> None:
    """Hydra's and the schema's complaints come out as one line naming the key and its choices."""
    with pytest.raises(ConfigError, match=message) as caught:
        compose_config(overrides)
    assert "\n" not in str(caught.value)


# shrink what the presets make large: 3D sizes, the latent autoencoder, the label-map generator's vocabulary
PRESET_TINY = [
    "model.autoencoder.network.channels=[8,8,8]", "model.autoencoder.network.norm_num_groups=8",
    "trainer.autoencoder.max_steps=2", "trainer.autoencoder.batch_size=2",
]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_one_tiny_step(preset: str, tiny_config, phantom, tmp_path: Path) -> None:
    """Every preset's wiring (conditioning, scheduler, trainer options, 2D or 3D) runs one step on the CPU."""
    from tests.conftest import phantom_overrides, write_volume_dataset

    composed = compose_config([f"experiment={preset}"])
    tiny = [o for o in PRESET_TINY if composed.model.autoencoder or not o.startswith(("model.autoencoder", "trainer.auto"))]
    if composed.data.spatial_dims == 3:
        cfg = tiny_config(f"experiment={preset}", "data.size=[16,16,16]", *tiny, "trainer.max_steps=1", "device=cpu")
        write_volume_dataset(Path(cfg.paths.data))
    else:
        cfg = tiny_config(f"experiment={preset}", *phantom_overrides(*phantom), *tiny, "trainer.max_steps=1", "device=cpu")
        run_stage("preprocess", cfg)
    trained = run_stage("train", cfg)
    checkpoint = torch.load(trained, weights_only=True)
    assert checkpoint["step"] == 1
    assert checkpoint["config"]["model"] == to_mapping(cfg.model)
    assert checkpoint["config"]["scheduler"] == to_mapping(cfg.scheduler)
    assert checkpoint["config"]["model"]["conditioning"] == composed.model.conditioning


@pytest.mark.parametrize("uri", ["https://alice:s3cret@mlflow.hospital", "postgresql+psycopg2://mlflow:s3cret@db:5432/mlflow"])
def test_a_tracking_uri_with_a_password_is_refused_without_repeating_it(uri: str) -> None:
    with pytest.raises(ConfigError, match="mlflow.tracking_uri must not hold a password") as refused:
        compose_config([f"mlflow.tracking_uri={uri}"])
    assert "s3cret" not in str(refused.value)


def test_a_tracking_uri_without_a_password_is_taken() -> None:
    assert compose_config(["mlflow.tracking_uri=https://mlflow.hospital"]).run.mlflow.tracking_uri == "https://mlflow.hospital"

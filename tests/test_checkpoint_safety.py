"""Checkpoints are data: crafted checkpoints are refused on every path that loads a model, with one
line naming the file and the key, and a file and a folder planted beside the test are untouched.

One real tiny checkpoint is trained once; every crafted file is that checkpoint with one part
changed: a class with side effects named where a network, autoencoder or schedule is rebuilt, a
``_target_`` nested in plain arguments, weights that are not tensors or have the wrong shape,
dtype or keys, and malformed facts (label names, image size, vocabulary, sampling).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from medsynth import MedsynthError
from medsynth.config import PipelineSettings
from medsynth.config.schema import to_mapping
from medsynth.config.settings import PathsSettings
from medsynth.data import LabelledArrays
from medsynth.diffusion.generator import Generator, build_denoiser
from medsynth.evaluation.instruments import saved_encoder
from medsynth.tracking.registry import log_generator
from medsynth.training import file_sha256, load_checkpoint, save_checkpoint
from medsynth.training.autoencoder import fit_autoencoder
from tests.conftest import TINY, compose_config, phantom_overrides, run_stage, write_phantom
from tests.servers import free_port, serve_model, stop

FAST = ["trainer.max_steps=2", "trainer.grid.num=0", "trainer.validation.timestep_fractions=[0.5]", "generate.num_samples=2",
        "generate.batch_size=2", "generate.steps=2"]
LATENT = ["model=latent", "scheduler.clip_sample=false", "model.network.channels=[8,8]", "model.network.norm_num_groups=8",
          "model.network.attention_levels=[false,false]", "model.autoencoder.network.channels=[8,8]",
          "model.autoencoder.network.attention_levels=[false,false]", "model.autoencoder.network.norm_num_groups=8",
          "trainer.autoencoder.max_steps=1", "trainer.autoencoder.batch_size=2"]
REGISTERED = "crafted"


# ------------------------------------------------------------------------------ what is planted


@dataclasses.dataclass
class Planted:
    """A file and a folder a crafted checkpoint aims its side effects at; :meth:`intact` checks them."""

    file: Path
    folder: Path

    def __post_init__(self) -> None:
        self.file.write_bytes(b"patient list: do not touch\n")
        self.folder.mkdir()
        (self.folder / "scan.nii").write_bytes(b"\x00\x01" * 64)
        (self.folder / "sub").mkdir()
        (self.folder / "sub" / "note.txt").write_text("kept")
        self.bytes, self.listing = self.file.read_bytes(), self._listing()

    def _listing(self) -> list[tuple[str, bytes]]:
        return sorted((str(p.relative_to(self.folder)), p.read_bytes() if p.is_file() else b"")
                      for p in self.folder.rglob("*"))

    def intact(self) -> None:
        assert self.file.read_bytes() == self.bytes, f"{self.file} was changed"
        assert self._listing() == self.listing, f"{self.folder} was changed"


@pytest.fixture
def planted(tmp_path: Path) -> Planted:
    return Planted(tmp_path / "planted.txt", tmp_path / "planted_dir")


# -------------------------------------------------------------------------------- crafted parts


SIDE_EFFECTS: dict[str, Callable[[Planted], dict[str, Any]]] = {
    "os.remove": lambda p: {"_target_": "os.remove", "path": str(p.file)},
    "shutil.rmtree": lambda p: {"_target_": "shutil.rmtree", "path": str(p.folder)},
    "builtins.open": lambda p: {"_target_": "builtins.open", "file": str(p.file), "mode": "w"},
    "pathlib.Path.unlink": lambda p: {"_target_": "pathlib.Path.unlink", "_args_": [str(p.file)]},
    "subprocess.call": lambda p: {"_target_": "subprocess.call", "args": ["rm", "-rf", str(p.folder), str(p.file)]},
    "os.system": lambda p: {"_target_": "os.system", "command": f"rm -rf {p.folder} {p.file}"},
}
"""Callables a crafted config names, each aimed at the planted file or folder."""

PLACES = ("model.network", "model.autoencoder.network", "scheduler")
"""Where a checkpoint's config names the class that is rebuilt."""

WEIGHT_KINDS = ("list", "str", "dict", "None", "shape", "float64", "int64", "missing", "extra")
"""What a crafted weight is: a non-tensor, a tensor of the wrong shape or dtype, a missing or extra key."""


def poison_weights(weights: dict[str, Any], kind: str, planted: Planted) -> str:
    """Change one entry of a state dict (a conv kernel) as ``kind`` says; return the key changed."""
    key = next(k for k, v in weights.items() if v.dim() >= 2)
    value = weights[key]
    if kind == "list":
        weights[key] = value.tolist()
    elif kind == "str":
        weights[key] = "import os; os.remove('x')"
    elif kind == "dict":
        weights[key] = SIDE_EFFECTS["os.remove"](planted)
    elif kind == "None":
        weights[key] = None
    elif kind == "shape":
        weights[key] = torch.zeros(value.shape[0] + 1, *value.shape[1:])
    elif kind in ("float64", "int64"):
        weights[key] = value.to(getattr(torch, kind))
    elif kind == "missing":
        del weights[key]
    elif kind == "extra":
        key = "evil.weight"
        weights[key] = torch.zeros(1)
    return key


@dataclasses.dataclass(frozen=True)
class Case:
    """One crafted generator checkpoint: ``craft(state, planted)`` changes the state and returns a
    pattern the refusal must contain (the key)."""

    id: str
    craft: Callable[[dict[str, Any], Planted], str]


def _target_case(place: str, target: str) -> Case:
    def craft(state: dict[str, Any], planted: Planted) -> str:
        value = SIDE_EFFECTS[target](planted)
        model = state["config"]["model"]
        if place == "model.network":
            model["network"] = value
        elif place == "model.autoencoder.network":
            model["autoencoder"] = {"network": value, "decode_tile": None}
        else:
            state["config"]["scheduler"] = value
        return re.escape(f"{place}._target_")
    return Case(f"{place}={target}", craft)


def _nested_case(name: str, target: str, put: Callable[[dict[str, Any], dict[str, Any]], None], key: str) -> Case:
    def craft(state: dict[str, Any], planted: Planted) -> str:
        put(state["config"], SIDE_EFFECTS[target](planted))
        return re.escape(f"{key}._target_")
    return Case(f"nested:{name}", craft)


def _weights_case(kind: str) -> Case:
    def craft(state: dict[str, Any], planted: Planted) -> str:
        key = poison_weights(state["ema"]["shadow"], kind, planted)
        return rf"ema\.shadow.*{re.escape(repr(key))}"
    return Case(f"ema.shadow:{kind}", craft)


def _fact_case(name: str, key: str, value: Any) -> Case:
    def craft(state: dict[str, Any], planted: Planted) -> str:
        state[key] = copy.deepcopy(value)
        return re.escape(key)
    return Case(f"{key}:{name}", craft)


def _set(path: str) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    """A setter of ``config[a][b]...`` (a list index as a number)."""
    *parents, last = path.split(".")

    def put(config: dict[str, Any], value: dict[str, Any]) -> None:
        for part in parents:
            config = config[int(part)] if part.isdigit() else config[part]
        config[int(last) if last.isdigit() else last] = value
    return put


CASES: list[Case] = [
    *(_target_case(place, target) for place in PLACES for target in SIDE_EFFECTS),
    _nested_case("network-argument", "os.system", _set("model.network.norm_num_groups"), "model.network.norm_num_groups"),
    _nested_case("in-a-list", "os.remove", _set("model.network.channels.1"), "model.network.channels[1]"),
    _nested_case("schedule-argument", "shutil.rmtree", _set("scheduler.num_train_timesteps"), "scheduler.num_train_timesteps"),
    _nested_case("optimizer", "builtins.open", _set("trainer.optimizer"), "trainer.optimizer"),
    *(_weights_case(kind) for kind in WEIGHT_KINDS),
    _fact_case("numbers", "label_names", [0, 1, 2]),
    _fact_case("text", "label_names", "background,outer,inner"),
    _fact_case("count", "image_size", [16]),
    _fact_case("negative", "image_size", [16, -16]),
    _fact_case("text", "image_size", ["16", "16"]),
    _fact_case("values", "vocabulary", {"level": "123"}),
    _fact_case("steps", "sampling", {"sampler": "auto", "steps": 0, "eta": 0.0, "guidance_scale": 1.0}),
]


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A phantom dataset, a 2-step model and a 2-sample synthetic set (so data/encoder.pt exists);
    an experiment and a registered model to upload crafted checkpoints to."""
    root = tmp_path_factory.mktemp("safety")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose_config([*TINY, *FAST, f"paths.output={root / 'out'}", f"mlflow.tracking_uri={uri}",
                          *phantom_overrides(*write_phantom(root / "raw"))])
    run_stage("preprocess", cfg)
    checkpoint = run_stage("train", cfg)
    run_stage("generate", cfg)
    assert (Path(cfg.paths.data) / "encoder.pt").is_file()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("crafted", artifact_location=(root / "artifacts").as_uri())
    client.create_registered_model(REGISTERED)
    return {"root": root, "uri": uri, "cfg": cfg, "checkpoint": checkpoint, "state": load_checkpoint(checkpoint),
            "client": client, "experiment": experiment}


def crafted_file(trained: dict[str, Any], case: Case, planted: Planted, folder: Path) -> tuple[Path, str]:
    """The trained checkpoint with ``case`` applied, saved under ``folder``; and the pattern its refusal names."""
    state = copy.deepcopy(dict(trained["state"]))
    pattern = case.craft(state, planted)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "crafted.pt"
    torch.save(state, path)
    return path, pattern


def assert_refused(call: Callable[[], Any], *, pattern: str, names: str, planted: Planted) -> str:
    """``call`` raises one line that names ``names`` (the file) and matches ``pattern`` (the key); nothing planted changed."""
    with pytest.raises(MedsynthError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    assert names in message, message
    assert re.search(pattern, message), message
    planted.intact()
    return message


def with_paths(cfg: PipelineSettings, tmp_path: Path, **changes: Any) -> PipelineSettings:
    """``cfg`` writing under ``tmp_path`` but reading the fixture's dataset; other groups replaced by ``changes``."""
    paths = dataclasses.replace(PathsSettings.under(str(tmp_path / "out")), data=cfg.paths.data)
    return dataclasses.replace(cfg, paths=paths, **changes)


ids = [case.id for case in CASES]


# ------------------------------------------------------------------ a generator checkpoint's paths


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_generator_from_checkpoint_refuses(case: Case, trained: dict[str, Any], planted: Planted, tmp_path: Path) -> None:
    path, pattern = crafted_file(trained, case, planted, tmp_path)
    assert_refused(lambda: Generator.from_checkpoint(path), pattern=pattern, names=str(path), planted=planted)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_generate_refuses(case: Case, trained: dict[str, Any], planted: Planted, tmp_path: Path) -> None:
    """`medsynth generate generate.checkpoint=<crafted>`: refused, no synthetic set written."""
    path, pattern = crafted_file(trained, case, planted, tmp_path)
    cfg = trained["cfg"]
    settings = with_paths(cfg, tmp_path, generate=dataclasses.replace(cfg.generate, checkpoint=str(path)))
    assert_refused(lambda: run_stage("generate", settings), pattern=pattern, names=str(path), planted=planted)
    assert not (Path(settings.paths.synthetic) / "manifest.csv").exists()


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_resume_refuses(case: Case, trained: dict[str, Any], planted: Planted, tmp_path: Path) -> None:
    """`medsynth train trainer.resume=<crafted>.pt`: refused, no checkpoint written."""
    path, pattern = crafted_file(trained, case, planted, tmp_path)
    cfg = trained["cfg"]
    settings = with_paths(cfg, tmp_path, trainer=dataclasses.replace(cfg.trainer, resume=str(path), max_steps=3))
    assert_refused(lambda: run_stage("train", settings), pattern=pattern, names=str(path), planted=planted)
    assert not list(Path(settings.paths.checkpoints).glob("*.pt"))


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_evaluate_refuses(case: Case, trained: dict[str, Any], planted: Planted, tmp_path: Path) -> None:
    """`medsynth evaluate` of a synthetic set whose manifest names the crafted file (with its true hash)."""
    path, pattern = crafted_file(trained, case, planted, tmp_path)
    cfg = trained["cfg"]
    settings = with_paths(cfg, tmp_path)
    synthetic = Path(settings.paths.synthetic)
    shutil.copytree(cfg.paths.synthetic, synthetic)
    manifest = synthetic / "manifest.csv"
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["checkpoint"], row["checkpoint_sha256"] = str(path), file_sha256(path)
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert_refused(lambda: run_stage("evaluate", settings), pattern=pattern, names=str(path), planted=planted)
    assert not (Path(settings.paths.evaluation) / "metrics.json").exists()


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_run_id_and_registered_model_refuse(case: Case, trained: dict[str, Any], planted: Planted, tmp_path: Path) -> None:
    """The crafted file as a run's logged generator (``generator/artifacts/checkpoint.pt``) and as a
    registered version: refused through the run id, runs:/ and models:/."""
    path, pattern = crafted_file(trained, case, planted, tmp_path / "crafted")
    client: MlflowClient = trained["client"]
    run_id = client.create_run(trained["experiment"]).info.run_id
    staged = tmp_path / "staged"
    (staged / "artifacts").mkdir(parents=True)
    shutil.copy(path, staged / "artifacts" / "checkpoint.pt")
    (staged / "MLmodel").write_text("flavors: {}\n")
    client.log_artifacts(run_id, str(staged), artifact_path="generator")
    client.set_terminated(run_id)
    source = f"{client.get_run(run_id).info.artifact_uri}/generator"
    version = client.create_model_version(REGISTERED, source, run_id=run_id).version
    for name in (run_id, f"runs:/{run_id}", f"models:/{REGISTERED}/{version}"):
        assert_refused(lambda: Generator.from_checkpoint(name, tracking_uri=trained["uri"], download_dir=tmp_path / "downloads"),
                pattern=pattern, names=name, planted=planted)


# ----------------------------------------------------------------------------- the two caches


@pytest.fixture(scope="module")
def latent(trained: dict[str, Any]) -> dict[str, Any]:
    """A tiny latent model and a real ``autoencoder.pt`` for it (its weights as built, saved as train saves them)."""
    cfg = compose_config([*TINY, *LATENT, f"paths.output={trained['root'] / 'latent'}", f"paths.data={trained['cfg'].paths.data}",
                          f"mlflow.tracking_uri={trained['uri']}"])
    model = build_denoiser(cfg.model, num_classes=3)
    cache = {"weights": model.autoencoder.state_dict(),
             "config": {"network": to_mapping(cfg.model.autoencoder), "settings": to_mapping(cfg.trainer.autoencoder)}}
    images = torch.rand(4, 1, 16, 16)
    data = LabelledArrays(images, torch.zeros_like(images, dtype=torch.long), [str(i) for i in range(4)], [])
    return {"cfg": cfg, "model": model, "cache": cache, "data": data}


def _fit(latent: dict[str, Any], path: Path) -> float:
    cfg = latent["cfg"]
    return fit_autoencoder(latent["model"], latent["data"], network=cfg.model.autoencoder, settings=cfg.trainer.autoencoder,
                           path=path, device=torch.device("cpu"), progress=False, save=False)


AUTOENCODER_CASES = [
    *(pytest.param(f"weights:{kind}", id=f"weights:{kind}") for kind in WEIGHT_KINDS),
    *(pytest.param(f"target:{target}", id=f"model.autoencoder.network={target}") for target in SIDE_EFFECTS),
    pytest.param("nested", id="nested:model.autoencoder.network.channels[1]"),
]


@pytest.mark.parametrize("case", AUTOENCODER_CASES)
def test_autoencoder_cache_refuses(case: str, latent: dict[str, Any], planted: Planted, tmp_path: Path) -> None:
    """``checkpoints/autoencoder.pt`` (latent diffusion's first stage, reused when its settings match)."""
    good = tmp_path / "good" / "autoencoder.pt"
    save_checkpoint(good, latent["cache"])
    assert _fit(latent, good) > 0  # the real cache is taken as it is
    cache = copy.deepcopy(latent["cache"])
    kind, _, detail = case.partition(":")
    if kind == "weights":
        key = poison_weights(cache["weights"], detail, planted)
        pattern = rf"weights.*{re.escape(repr(key))}"
    elif kind == "target":
        cache["config"]["network"]["network"] = SIDE_EFFECTS[detail](planted)
        pattern = re.escape("model.autoencoder.network._target_")
    else:
        cache["config"]["network"]["network"]["channels"][1] = SIDE_EFFECTS["os.system"](planted)
        pattern = re.escape("model.autoencoder.network.channels[1]._target_")
    path = tmp_path / "autoencoder.pt"
    torch.save(cache, path)
    assert_refused(lambda: _fit(latent, path), pattern=pattern, names=str(path), planted=planted)


def test_train_stage_refuses_a_crafted_autoencoder_cache(latent: dict[str, Any], planted: Planted, tmp_path: Path) -> None:
    """The same through `medsynth train` of a latent model: refused before any training, nothing written."""
    cache = copy.deepcopy(latent["cache"])
    key = poison_weights(cache["weights"], "float64", planted)
    settings = with_paths(latent["cfg"], tmp_path)
    path = Path(settings.paths.checkpoints) / "autoencoder.pt"
    path.parent.mkdir(parents=True)
    torch.save(cache, path)
    assert_refused(lambda: run_stage("train", settings), pattern=re.escape(repr(key)), names=str(path), planted=planted)
    assert [p.name for p in path.parent.iterdir()] == ["autoencoder.pt"]


ENCODER_CASES = [
    *(pytest.param(f"weights:{kind}", id=f"state:{kind}") for kind in WEIGHT_KINDS),
    pytest.param("settings:channels", id="settings.channels=os.remove"),
    pytest.param("settings:target", id="settings._target_=os.system"),
]


def _data_copy(trained: dict[str, Any], folder: Path) -> Path:
    shutil.copytree(trained["cfg"].paths.data, folder)
    return folder


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_encoder_cache_refuses(case: str, trained: dict[str, Any], planted: Planted, tmp_path: Path) -> None:
    """``data/encoder.pt`` (the feature encoder of the privacy gate and the audit, reused for its manifest)."""
    data = _data_copy(trained, tmp_path / "data")
    cfg = trained["cfg"]
    assert saved_encoder(data, settings=cfg.encoder) is not None  # the real cache is taken as it is
    saved = dict(load_checkpoint(data / "encoder.pt"))
    kind, _, detail = case.partition(":")
    if kind == "weights":
        key = poison_weights(saved["state"], detail, planted)
        pattern = rf"state.*{re.escape(repr(key))}"
    elif detail == "channels":
        saved["settings"]["channels"] = SIDE_EFFECTS["os.remove"](planted)
        pattern = re.escape("encoder.channels")
    else:
        saved["settings"].update(SIDE_EFFECTS["os.system"](planted))
        pattern = re.escape("encoder._target_")
    path = data / "encoder.pt"
    torch.save(saved, path)
    assert_refused(lambda: saved_encoder(data, settings=cfg.encoder), pattern=pattern, names=str(path), planted=planted)


def test_generate_refuses_a_crafted_encoder_cache(trained: dict[str, Any], planted: Planted, tmp_path: Path) -> None:
    """The same through `medsynth generate` (its privacy gate measures with the dataset's encoder)."""
    data = _data_copy(trained, tmp_path / "data")
    saved = dict(load_checkpoint(data / "encoder.pt"))
    key = poison_weights(saved["state"], "list", planted)
    torch.save(saved, data / "encoder.pt")
    settings = dataclasses.replace(with_paths(trained["cfg"], tmp_path), paths=dataclasses.replace(
        PathsSettings.under(str(tmp_path / "out")), data=str(data)))
    settings = dataclasses.replace(settings, generate=dataclasses.replace(settings.generate, checkpoint=str(trained["checkpoint"])))
    assert_refused(lambda: run_stage("generate", settings), pattern=re.escape(repr(key)), names=str(data / "encoder.pt"),
            planted=planted)
    assert not (Path(settings.paths.synthetic) / "manifest.csv").exists()


# ------------------------------------------------------------------------------ the served model


def test_mlflow_models_serve_refuses_a_crafted_artifact(trained: dict[str, Any], planted: Planted, tmp_path: Path) -> None:
    """A logged generator whose ``artifacts/checkpoint.pt`` was swapped for a crafted one: `mlflow
    models serve` does not serve it (the model fails to load with the one-line reason)."""
    client: MlflowClient = trained["client"]
    run_id = client.create_run(trained["experiment"]).info.run_id
    log_generator(trained["checkpoint"], run_id=run_id, tracking_uri=trained["uri"])
    model_dir = Path(client.download_artifacts(run_id, "generator", str(tmp_path)))
    case = next(c for c in CASES if c.id == "model.network=os.remove")
    crafted, pattern = crafted_file(trained, case, planted, tmp_path / "crafted")
    shutil.copy(crafted, model_dir / "artifacts" / "checkpoint.pt")

    port = free_port()
    log_path = tmp_path / "serve.log"
    server = serve_model(str(model_dir), port=port, log_path=log_path)
    try:
        deadline, status = time.monotonic() + 90, None
        while server.poll() is None and time.monotonic() < deadline:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                                 data=b'{"dataframe_records": [{"seed": 1}]}',
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    status = response.status
                break
            except urllib.error.HTTPError as err:
                status = err.code
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        text = log_path.read_text(errors="replace")
        assert status != 200, f"the crafted model was served:\n{text[-3000:]}"
        assert server.poll() is not None or status is not None, f"the server neither exited nor answered:\n{text[-3000:]}"
        assert re.search(pattern, text) and "checkpoint.pt" in text, text[-3000:]
    finally:
        stop(server)
    planted.intact()


# ---------------------------------------------------------------------------- the validator itself


def test_a_good_checkpoint_loads_on_every_path(trained: dict[str, Any], tmp_path: Path) -> None:
    """The checks refuse only what is wrong: the real checkpoint loads as a generator, resumes, and
    a loaded checkpoint saved again still loads weights-only."""
    generator = Generator.from_checkpoint(trained["checkpoint"])
    assert generator.label_names == ["background", "outer", "inner"] and generator.image_size == (16, 16)
    again = tmp_path / "again.pt"
    save_checkpoint(again, load_checkpoint(trained["checkpoint"]))
    assert Generator.from_checkpoint(again).info == generator.info
    cfg = trained["cfg"]
    settings = with_paths(cfg, tmp_path, trainer=dataclasses.replace(cfg.trainer, resume=str(trained["checkpoint"]), max_steps=3))
    assert load_checkpoint(run_stage("train", settings))["step"] == 3

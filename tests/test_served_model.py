"""The trained generator as an MLflow pyfunc model: logged, registered, loaded, served over HTTP, found again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medsynth import MedsynthError
from medsynth.diffusion.generator import Generator
from medsynth.tracking.registry import log_generator, resolve_checkpoint
from medsynth.tracking.serving import GeneratorInputError, parse_prompt
from medsynth.training import load_checkpoint
from tests.conftest import TINY, compose_config, phantom_overrides, run_stage, write_phantom
from tests.servers import free_port, post, serve_model, stop, wait_until_up

NAME = "medsynth-tiny-class"
FAST = ["trainer.max_steps=2", "trainer.grid.num=1", "trainer.grid.steps=1", "trainer.validation.timestep_fractions=[0.5]",
        "trainer.sampling.steps=3"]  # the served model's default steps (the checkpoint's sampling)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One phantom dataset; a class-conditional model (logged and registered) and a mask model (trained only)."""
    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = [*TINY, *FAST, f"mlflow.tracking_uri={uri}", *phantom_overrides(*write_phantom(root / "raw"))]
    class_cfg = compose_config([*common, f"paths.output={root / 'class'}", "model.conditioning=class", "model.class_key=level"])
    run_stage("preprocess", class_cfg)
    mask_cfg = compose_config([*common, f"paths.output={root / 'mask'}", f"paths.data={class_cfg.paths.data}"])
    class_ckpt, mask_ckpt = run_stage("train", class_cfg), run_stage("train", mask_cfg)
    class_run = load_checkpoint(class_ckpt)["run_id"]
    model_uri = log_generator(class_ckpt, run_id=class_run, tracking_uri=uri, registered_name=NAME)
    return {"root": root, "uri": uri, "class_ckpt": class_ckpt, "class_run": class_run, "model_uri": model_uri,
            "mask_ckpt": mask_ckpt, "mask_run": load_checkpoint(mask_ckpt)["run_id"]}


def reference(checkpoint_path: Path, condition: str, seeds: list[int], *, labels: torch.Tensor | None = None,
              prompts: list[str] | None = None) -> np.ndarray:
    """What medsynth's own Generator draws for these seeds, in one batch, with the checkpoint's
    sampling settings, as ``(N, *spatial)``."""
    sampling = load_checkpoint(checkpoint_path)["sampling"]
    generator = Generator.from_checkpoint(checkpoint_path)
    codes = torch.cat([generator.model.encode_attributes(parse_prompt(p)) for p in prompts]) if prompts else None
    drawn = generator.sample(seeds, labels=labels, codes=codes, steps=sampling["steps"], eta=sampling["eta"],
                             sampler=sampling["sampler"],
                             guidance_scale=sampling["guidance_scale"] if condition == "class" else 1.0)
    return drawn.images[:, 0].numpy()


def test_parse_prompt() -> None:
    assert parse_prompt("level=2 sex=F") == {"level": "2", "sex": "F"}
    assert parse_prompt("") == {} and parse_prompt(None) == {}
    with pytest.raises(GeneratorInputError, match="not key=value"):
        parse_prompt("level")


def test_registered_generator_predicts_what_sample_draws(trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """``mlflow.pyfunc.load_model("models:/<name>/1")`` gives medsynth's own samples for the same seeds and prompts."""
    assert trained["model_uri"] == f"models:/{NAME}/1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    model = mlflow.pyfunc.load_model(trained["model_uri"])
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["seed", "prompt", "steps", "guidance_scale"]
    assert model.metadata.metadata["vocabulary"] == {"level": ["1", "2", "3"]}

    out = model.predict(pd.DataFrame({"seed": [7, 8], "prompt": ["level=2", "level=1"]}))
    assert list(out.columns) == ["seed", "image", "label", "shape"] and out["seed"].tolist() == [7, 8]
    images = np.array(out["image"].tolist())
    assert images.shape == (2, 16, 16) and out["shape"].tolist() == [[16, 16], [16, 16]]
    assert out["label"].isna().all()
    expected = reference(trained["class_ckpt"], "class", [7, 8], prompts=["level=2", "level=1"])
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)
    # a sample depends on its own seed and prompt only, not on what else is in the request
    alone = np.array(model.predict(pd.DataFrame({"seed": [8], "prompt": ["level=1"]}))["image"].tolist())
    np.testing.assert_allclose(alone[0], images[1], rtol=0, atol=1e-6)

    with pytest.raises(GeneratorInputError, match=r"level='9' is not one the model was trained with: \['1', '2', '3'\]"):
        model.predict(pd.DataFrame({"seed": [1], "prompt": ["level=9"]}))
    with pytest.raises(GeneratorInputError, match=r"unknown attribute\(s\) \['sex'\]"):
        model.predict(pd.DataFrame({"seed": [1], "prompt": ["sex=F"]}))
    with pytest.raises(GeneratorInputError, match="steps must be >= 1"):
        model.predict(pd.DataFrame({"seed": [1], "steps": [0]}))


def test_mask_generator_takes_a_label_map(trained: dict[str, Any]) -> None:
    """A mask model generates an image for each given label map and returns that label map with it."""
    client = MlflowClient(tracking_uri=trained["uri"])
    run_id = client.create_run(client.get_run(trained["mask_run"]).info.experiment_id, run_name="generator").info.run_id
    model_uri = log_generator(trained["mask_ckpt"], run_id=run_id, tracking_uri=trained["uri"])
    assert model_uri == f"runs:/{run_id}/generator"
    location = f"{client.get_run(run_id).info.artifact_uri}/generator"
    model = mlflow.pyfunc.load_model(location)
    label_maps = np.zeros((2, 16, 16), dtype=np.int64)
    label_maps[0, 4:12, 4:12], label_maps[1, 2:8, 2:14] = 1, 2
    out = model.predict(pd.DataFrame({"seed": [3, 4], "label_map": [m.tolist() for m in label_maps]}))
    expected = reference(trained["mask_ckpt"], "mask", [3, 4], labels=torch.from_numpy(label_maps)[:, None])
    np.testing.assert_allclose(np.array(out["image"].tolist()), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.array(out["label"].tolist()), label_maps)

    with pytest.raises(GeneratorInputError, match=r"label_map has shape \[4, 4\], the model generates \[16, 16\]"):
        model.predict(pd.DataFrame({"seed": [1], "label_map": [np.zeros((4, 4), int).tolist()]}))
    with pytest.raises(GeneratorInputError, match=r"values must be in 0..2 \(background, outer, inner\), got 0..7"):
        model.predict(pd.DataFrame({"seed": [1], "label_map": [(7 * np.eye(16, dtype=int)).tolist()]}))
    with pytest.raises(MlflowException, match="missing inputs \\['label_map'\\]"):  # the signature asks for it
        model.predict(pd.DataFrame({"seed": [1]}))
    with pytest.raises(GeneratorInputError, match="give label_map"):  # without MLflow's schema check
        model.unwrap_python_model().predict(None, pd.DataFrame({"seed": [1]}))


def _post(url: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, body = post(url, payload)
    return status, json.loads(body)


def test_mlflow_models_serve_answers_over_http(trained: dict[str, Any]) -> None:
    """``mlflow models serve -m models:/<name>/1 --env-manager local`` on loopback returns the same samples."""
    port = free_port()
    log_path = trained["root"] / "serve.log"
    server = serve_model(trained["model_uri"], port=port, log_path=log_path, env={"MLFLOW_TRACKING_URI": trained["uri"]})
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(base, server, log_path)
        except RuntimeError as err:
            pytest.fail(str(err))

        payload = {"dataframe_split": {"columns": ["seed", "prompt"], "data": [[11, "level=3"], [12, "level=1"]]}}
        status, body = _post(f"{base}/invocations", payload)
        assert status == 200, body
        served = body["predictions"]
        assert [p["seed"] for p in served] == [11, 12]
        images = np.array([p["image"] for p in served])
        assert images.shape == (2, 16, 16) and images.min() >= 0.0 and images.max() <= 1.0
        assert all(p["shape"] == [16, 16] and p["label"] is None for p in served)
        local = mlflow.pyfunc.load_model(f"{MlflowClient(tracking_uri=trained['uri']).get_run(trained['class_run']).info.artifact_uri}/generator")
        expected = np.array(local.predict(pd.DataFrame({"seed": [11, 12], "prompt": ["level=3", "level=1"]}))["image"].tolist())
        np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)

        status, body = _post(f"{base}/invocations", {"dataframe_records": [{"seed": 1, "prompt": "level=9"}]})
        assert status == 400 and "level='9' is not one the model was trained with" in body["message"]
    finally:
        stop(server)


def test_resolve_checkpoint_by_path_run_and_registered_name(trained: dict[str, Any], tmp_path: Path) -> None:
    """A checkpoint comes from a path, a run id (its logged generator, else its output folder) or models:/name/version."""
    uri = trained["uri"]
    assert resolve_checkpoint(str(trained["class_ckpt"]), tracking_uri=uri, download_dir=tmp_path) == trained["class_ckpt"]
    weights = load_checkpoint(trained["class_ckpt"])["ema"]["shadow"]
    for source in (trained["class_run"], f"runs:/{trained['class_run']}", f"models:/{NAME}/1"):
        path = resolve_checkpoint(source, tracking_uri=uri, download_dir=tmp_path)
        assert path.is_relative_to(tmp_path)
        logged = load_checkpoint(path)
        assert "optimizer" not in logged and logged["run_id"] == trained["class_run"]
        assert all(torch.equal(logged["ema"]["shadow"][k], v) for k, v in weights.items())
    # a train run without a logged generator: checkpoints/last.pt under its output folder (tag medsynth.output)
    assert resolve_checkpoint(trained["mask_run"], tracking_uri=uri, download_dir=tmp_path) == trained["mask_ckpt"]
    # ... unless a later training wrote over that file
    client = MlflowClient(tracking_uri=uri)
    other = client.create_run(client.get_run(trained["mask_run"]).info.experiment_id,
                              tags={"medsynth.output": str(trained["mask_ckpt"].parents[1])}).info.run_id
    with pytest.raises(MedsynthError, match=f"holds a checkpoint of MLflow run {trained['mask_run']}, not of run {other}"):
        resolve_checkpoint(other, tracking_uri=uri, download_dir=tmp_path)


def test_resolve_checkpoint_errors(trained: dict[str, Any], tmp_path: Path) -> None:
    """Unknown run ids, model names and versions, and missing files each give one clear error."""
    uri = trained["uri"]
    with pytest.raises(MedsynthError, match=f"no MLflow run '{'0' * 32}' in the store"):
        resolve_checkpoint("0" * 32, tracking_uri=uri, download_dir=tmp_path)
    with pytest.raises(MedsynthError, match=f"no MLflow run '{'f' * 32}'"):
        resolve_checkpoint(f"runs:/{'f' * 32}", tracking_uri=uri, download_dir=tmp_path)
    with pytest.raises(MedsynthError, match=f"no registered model 'nope' .*registered: \\['{NAME}'\\]"):
        resolve_checkpoint("models:/nope/1", tracking_uri=uri, download_dir=tmp_path)
    with pytest.raises(MedsynthError, match=rf"'{NAME}' has no version '9'; versions: \[1\]"):
        resolve_checkpoint(f"models:/{NAME}/9", tracking_uri=uri, download_dir=tmp_path)
    with pytest.raises(MedsynthError, match="neither a file nor an MLflow run id"):
        resolve_checkpoint(str(tmp_path / "missing.pt"), tracking_uri=uri, download_dir=tmp_path)

"""Limits of the served generator: what a request may ask, refusals with a reason, a time budget, a clean stop.

The unit tests check :func:`serve_limits`, :func:`decode_request`, :func:`check_request` and the
time budget in this process; the server tests run a real ``mlflow models serve`` of a registered
tiny generator on 127.0.0.1 (docs/serving-limits.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest

from medsynth import MedsynthError
from medsynth.tracking.registry import log_generator, serving_config
from medsynth.tracking.serving import (
    LIMIT_KEYS,
    GeneratorInputError,
    GeneratorModel,
    RequestBudget,
    RequestStopped,
    SamplingTurns,
    ServeLimits,
    check_request,
    decode_request,
    limit_variable,
    serve_limits,
)
from medsynth.training import load_checkpoint
from tests.conftest import TINY, compose_config, phantom_overrides, run_stage, write_phantom
from tests.servers import (dump_server_stacks, free_port, group_alive, post, serve_model, stop, wait_group_gone,
                           wait_until_up)

NAME = "medsynth-limits"
TIMESTEPS = 100
"""The tiny model's training schedule: up to 100 steps per sample, so a slow request is easy to send."""
MODEL_CONFIG = {"max_rows": 64, "max_body_bytes": 50_000, "batch_size": 4}
"""Limits stored with the registered model."""
SERVER_ENV = {"MEDSYNTH_SERVE_MAX_STEPS": "80", "MEDSYNTH_SERVE_TIME_LIMIT": "3",
              "SERVING_MODEL_CONFIG": json.dumps({"max_body_bytes": 20_000})}
"""The server's environment: two limits as variables, and ``max_body_bytes`` as a load-time ``model_config``."""
SLOW = {"dataframe_records": [{"seed": i, "steps": 80} for i in range(64)]}
"""A request within every limit that samples for several seconds (16 batches of 80 steps)."""
COLUMNS = ("seed", "prompt", "steps", "guidance_scale")


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny class-conditional model with a 100-step schedule, registered with :data:`MODEL_CONFIG` as its limits."""
    root = tmp_path_factory.mktemp("limits")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tiny = [o for o in TINY if not o.startswith("scheduler.num_train_timesteps=")]
    cfg = compose_config([*tiny, f"scheduler.num_train_timesteps={TIMESTEPS}", "trainer.max_steps=1",
                          "trainer.grid.num=1", "trainer.grid.steps=1", "trainer.validation.timestep_fractions=[0.5]",
                          "trainer.sampling.steps=2", f"mlflow.tracking_uri={uri}", f"paths.output={root / 'out'}",
                          *phantom_overrides(*write_phantom(root / "raw")), "model.conditioning=class",
                          "model.class_key=level"])
    run_stage("preprocess", cfg)
    checkpoint = run_stage("train", cfg)
    run_id = load_checkpoint(checkpoint)["run_id"]
    model_uri = log_generator(checkpoint, run_id=run_id, tracking_uri=uri, registered_name=NAME,
                              serve_limits=MODEL_CONFIG)
    return {"root": root, "uri": uri, "checkpoint": checkpoint, "model_uri": model_uri}


# ------------------------------------------------------------------------------------------ limits


def test_serve_limits_defaults_config_and_environment() -> None:
    """Defaults, then ``model_config``, then ``MEDSYNTH_SERVE_<NAME>``; blank variables and ``None`` mean "the default"."""
    assert serve_limits(None, environ={}) == ServeLimits()
    assert ServeLimits().max_rows == 256 and ServeLimits().max_body_bytes == 64 * 2**20
    limits = serve_limits({"max_rows": 8, "time_limit": 2.5, "max_steps": None}, environ={})
    assert (limits.max_rows, limits.time_limit, limits.max_steps) == (8, 2.5, None)
    environ = {"MEDSYNTH_SERVE_MAX_ROWS": "4", "MEDSYNTH_SERVE_TIME_LIMIT": "0.5", "MEDSYNTH_SERVE_BATCH_SIZE": " ",
               "MEDSYNTH_SERVE_MAX_BODY_BYTES": "1e3"}
    limits = serve_limits({"max_rows": 8, "batch_size": 2, "time_limit": 2.5}, environ=environ)
    assert (limits.max_rows, limits.time_limit, limits.batch_size, limits.max_body_bytes) == (4, 0.5, 2, 1000)
    assert [limit_variable(k) for k in LIMIT_KEYS] == [
        "MEDSYNTH_SERVE_MAX_ROWS", "MEDSYNTH_SERVE_BATCH_SIZE", "MEDSYNTH_SERVE_MAX_STEPS", "MEDSYNTH_SERVE_TIME_LIMIT",
        "MEDSYNTH_SERVE_MAX_BODY_BYTES"]


@pytest.mark.parametrize(("config", "environ", "message"), [
    ({}, {"MEDSYNTH_SERVE_MAX_ROWS": "many"}, "MEDSYNTH_SERVE_MAX_ROWS must be an integer >= 1, got 'many'"),
    ({}, {"MEDSYNTH_SERVE_MAX_STEPS": "0"}, "MEDSYNTH_SERVE_MAX_STEPS must be an integer >= 1, got '0'"),
    ({}, {"MEDSYNTH_SERVE_TIME_LIMIT": "inf"}, "MEDSYNTH_SERVE_TIME_LIMIT must be a number of seconds > 0, got 'inf'"),
    ({}, {"MEDSYNTH_SERVE_TIME_LIMIT": "-1"}, "MEDSYNTH_SERVE_TIME_LIMIT must be a number of seconds > 0, got '-1'"),
    ({"max_rows": 1.5}, {}, "model_config max_rows must be an integer >= 1, got 1.5"),
    ({"batch_size": True}, {}, "model_config batch_size must be an integer >= 1, got True"),
    ({"time_limit": "nan"}, {}, "model_config time_limit must be a number of seconds > 0, got 'nan'"),
    ({"max_body_bytes": [1]}, {}, r"model_config max_body_bytes must be an integer >= 1, got \[1\]"),
    ({"max_row": 3}, {}, r"model_config: unknown serving limit\(s\) \['max_row'\]; known: \['max_rows', "),
    # a bad value in the environment is refused even where the config gives a good one
    ({"max_rows": 3}, {"MEDSYNTH_SERVE_MAX_ROWS": "-2"}, "MEDSYNTH_SERVE_MAX_ROWS must be an integer >= 1, got '-2'"),
])
def test_serve_limits_refuse_bad_values(config: dict[str, Any], environ: dict[str, str], message: str) -> None:
    with pytest.raises(MedsynthError, match=message) as caught:
        serve_limits(config, environ=environ)
    assert "\n" not in str(caught.value)


def test_resolved_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_steps`` is capped by the schedule; no ``time_limit`` means 5 s under MLflow's request timeout."""
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "30")
    assert ServeLimits().resolved(num_train_timesteps=100) == ServeLimits(max_steps=100, time_limit=25.0)
    assert ServeLimits(max_steps=500, time_limit=2).resolved(num_train_timesteps=100).max_steps == 100
    assert ServeLimits(max_steps=20).resolved(num_train_timesteps=100).max_steps == 20
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "3")
    assert ServeLimits().resolved(num_train_timesteps=10).time_limit == 1.0


def test_serving_config_stores_every_limit() -> None:
    """The logged ``model_config`` names every limit, so each can also be set when the model is loaded."""
    assert serving_config(None) == dict.fromkeys(LIMIT_KEYS)
    assert serving_config({"max_rows": 4}) == {**dict.fromkeys(LIMIT_KEYS), "max_rows": 4}
    with pytest.raises(MedsynthError, match="model_config time_limit must be a number of seconds > 0, got 0"):
        serving_config({"time_limit": 0})


# ------------------------------------------------------------------------------------ the request check


def check(payload: Any, *, max_rows: int = 4, columns: tuple[str, ...] = COLUMNS,
          image_size: tuple[int, ...] = (4, 4)) -> int:
    required = [c for c in ("seed", "label_map") if c in columns]
    return check_request(payload, columns=columns, required=required, image_size=image_size, max_rows=max_rows)


def test_decode_request_refusals() -> None:
    assert decode_request(b'{"inputs": [{"seed": 1}]}', "application/json; charset=utf-8") == {"inputs": [{"seed": 1}]}
    cases = [
        (b'{"dataframe_records": [', "application/json", "the body is not JSON: Expecting value at line 1 column 24"),
        (b'{"inputs": [{"seed": NaN}]}', "application/json", "the body holds NaN, which is not a JSON number"),
        (b'{"inputs": [{"seed": -Infinity}]}', "application/json", "the body holds -Infinity, which is not a JSON number"),
        (b'{"inputs": [{"prompt": "\xff"}]}', "application/json", r"the body is not UTF-8 text \(byte 24\)"),
        (b"seed\n1\n", "text/csv", "send the rows as JSON with Content-Type: application/json, got Content-Type 'text/csv'"),
        (b"{}", None, "got Content-Type 'none'"),
        (b"{}", "application/json; charset=latin-1", "the body must be UTF-8 JSON, got charset 'latin-1'"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", "nests JSON arrays or objects deeper than the server parses"),
    ]
    for body, content_type, message in cases:
        with pytest.raises(GeneratorInputError, match=message) as caught:
            decode_request(body, content_type)
        assert "\n" not in caught.value.reason and "Traceback" not in caught.value.reason


@pytest.mark.parametrize(("payload", "message"), [
    ({"dataframe_records": [{"seed": i} for i in range(5)]},
     r"the request has 5 rows; at most 4 per request \(MEDSYNTH_SERVE_MAX_ROWS\): split it"),
    ({"dataframe_records": []}, "no rows: give one row per sample"),
    ([{"seed": 1}], r"the body must be an object with one of \['dataframe_split', .*got a JSON array"),
    ({"dataframe_records": [{"seed": 1}], "params": {"steps": 3}},
     r"and nothing else; it has \['params'\]; settings are per-row columns, not params"),
    ({"inputs": [{"seed": 1}], "instances": [{"seed": 2}]}, r"and nothing else; it has \['inputs', 'instances'\]"),
    ({"dataframe_split": {"columns": ["seed", "steps"], "data": [[1, 2], [3]]}},
     "dataframe_split.data must be a list of rows of 2 values each"),
    ({"dataframe_split": {"columns": ["seed", "seed"], "data": [[1, 2]]}}, "dataframe_split.columns names a column twice"),
    ({"inputs": {"seed": [1, 2], "steps": [3]}}, "inputs: columns have different lengths"),
    ({"dataframe_records": {"seed": [1]}}, "dataframe_records must be a list of row objects$"),
    ({"dataframe_records": [{"seed": 1.5}]}, "row 0: seed must be an integer, got a JSON number"),
    ({"dataframe_records": [{"seed": 1}, {"seed": True}]}, "row 1: seed must be an integer, got a JSON boolean"),
    ({"dataframe_records": [{"seed": 1, "steps": "9"}]}, "row 0: steps must be an integer, got a JSON string"),
    ({"dataframe_records": [{"seed": 2**64}]}, r"row 0: seed is out of range \(more than 64 bits\)"),
    ({"dataframe_records": [{"steps": 3}]}, "row 0: seed is required"),
    ({"dataframe_records": [{"seed": 1, "label_map": [[0]]}]},
     r"row 0: unknown column\(s\) \['label_map'\]; this model takes"),
])
def test_check_request_refusals(payload: Any, message: str) -> None:
    with pytest.raises(GeneratorInputError, match=message) as caught:
        check(payload)
    assert "\n" not in caught.value.reason


def test_check_request_steps() -> None:
    """Steps above the limit are refused before sampling, naming the limit (the schedule's length or the setting)."""
    rows = {"dataframe_records": [{"seed": 1, "steps": 10}, {"seed": 2, "steps": 11}]}
    assert check(rows) == 2  # not checked without a limit
    assert check_request(rows, columns=COLUMNS, required=["seed"], image_size=(4, 4), max_rows=4, max_steps=11) == 2
    with pytest.raises(GeneratorInputError, match=r"row 1: steps must be at most 10 \(the training schedule has 10 "
                                                  r"timesteps\), got 11"):
        check_request(rows, columns=COLUMNS, required=["seed"], image_size=(4, 4), max_rows=4, max_steps=10,
                      num_train_timesteps=10)
    with pytest.raises(GeneratorInputError, match=r"row 0: steps must be at most 5 \(the serving limit is 5 "
                                                  r"\(MEDSYNTH_SERVE_MAX_STEPS\)\), got 10"):
        check_request(rows, columns=COLUMNS, required=["seed"], image_size=(4, 4), max_rows=4, max_steps=5,
                      num_train_timesteps=100)
    with pytest.raises(GeneratorInputError, match="row 0: steps must be >= 1, got 0"):
        check_request({"inputs": [{"seed": 1, "steps": 0}]}, columns=COLUMNS, required=["seed"], image_size=(4, 4),
                      max_rows=4, max_steps=5)


def test_check_request_label_maps() -> None:
    """A mask model's label maps must be integer grids of its image size (an optional channel axis of 1)."""
    columns = ("seed", "label_map", "steps")
    grid = np.zeros((4, 4), int).tolist()
    assert check({"dataframe_split": {"columns": ["seed", "label_map"], "data": [[1, grid], [2, [grid]]]}},
                 columns=columns) == 2
    for label_map, message in [
        (np.zeros((4, 5), int).tolist(), r"row 0: label_map has shape \[4, 5\], the model generates \[4, 4\]"),
        ([[0, 1], [0]], r"row 0: label_map must be a nested list of integers of shape \[4, 4\]; it is ragged"),
        (np.full((4, 4), 0.5).tolist(), "row 0: label_map must hold integers, got float64"),
        (np.zeros((4, 4), bool).tolist(), "row 0: label_map must hold integers, got booleans"),
        ("0000", "row 0: label_map must be a nested list of integers, got a JSON string"),
    ]:
        with pytest.raises(GeneratorInputError, match=message):
            check({"dataframe_records": [{"seed": 1, "label_map": label_map}]}, columns=columns)
    with pytest.raises(GeneratorInputError, match="row 0: label_map is required"):
        check({"dataframe_records": [{"seed": 1}]}, columns=columns)


def test_guard_checks_large_bodies_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guarded endpoint checks a body on the event loop, or in a worker thread past 1 MiB, and refuses with a reason."""
    import asyncio
    from types import SimpleNamespace

    from starlette.requests import Request
    from starlette.responses import Response

    from medsynth.tracking import serving

    model = SimpleNamespace(limits=ServeLimits(max_rows=4, max_steps=5, time_limit=5), columns=COLUMNS, image_size=(4, 4),
                            generator=SimpleNamespace(scheduler=SimpleNamespace(num_train_timesteps=10)))
    on_loop: list[bool] = []
    check_body = serving._check_body

    def spy(*args: Any) -> None:
        on_loop.append(threading.current_thread() is threading.main_thread())
        check_body(*args)

    monkeypatch.setattr(serving, "_check_body", spy)
    monkeypatch.setattr(serving, "_install_stop_handler", lambda: None)  # no signal handlers in the test process

    async def endpoint(request: Request) -> Response:
        return Response(b"sampled " + await request.body())

    guarded = serving.guard_endpoint(endpoint, model)

    def call(body: bytes) -> Any:
        async def run() -> Any:
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop()
                await asyncio.sleep(3600)  # the client stays connected
                return {"type": "http.disconnect"}

            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers, "query_string": b""}
            return await guarded(Request(scope, receive))

        return asyncio.run(run())

    good, bad = b'{"inputs": [{"seed": 1}]}', b'{"inputs": [{"seed": 1, "steps": 6}]}'
    reason = "row 0: steps must be at most 5 (the serving limit is 5 (MEDSYNTH_SERVE_MAX_STEPS)), got 6"
    for inline in (2**20, 10):
        monkeypatch.setattr(serving, "_INLINE_CHECK_BYTES", inline)
        response = call(good)
        assert response.status_code == 200 and response.body == b"sampled " + good
        response = call(bad)
        assert response.status_code == 400
        assert json.loads(response.body) == {"error_code": "INVALID_PARAMETER_VALUE", "message": reason}
    assert on_loop == [True, True, False, False]


# ------------------------------------------------------------------------------- the model in-process


def test_model_config_at_load_time_and_steps_limit(registered: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits logged with the model hold in ``mlflow.pyfunc.load_model``; its ``model_config`` and the environment
    override them."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    for key in LIMIT_KEYS:
        monkeypatch.delenv(limit_variable(key), raising=False)
    model = mlflow.pyfunc.load_model(registered["model_uri"])
    assert model.model_config == {**dict.fromkeys(LIMIT_KEYS), **MODEL_CONFIG}
    with pytest.raises(GeneratorInputError, match=r"the request has 65 rows; at most 64 per request"):
        model.predict(pd.DataFrame({"seed": range(65)}))
    with pytest.raises(GeneratorInputError, match=rf"row 0: steps must be at most {TIMESTEPS} \(the training schedule "
                                                  rf"has {TIMESTEPS} timesteps\), got {TIMESTEPS + 1}"):
        model.predict(pd.DataFrame({"seed": [1], "steps": [TIMESTEPS + 1]}))

    model = mlflow.pyfunc.load_model(registered["model_uri"], model_config={"max_rows": 2, "max_steps": 5})
    assert len(model.predict(pd.DataFrame({"seed": [1, 2], "steps": [5, 5]}))) == 2
    with pytest.raises(GeneratorInputError, match=r"the request has 3 rows; at most 2 per request"):
        model.predict(pd.DataFrame({"seed": [1, 2, 3]}))
    with pytest.raises(GeneratorInputError, match=r"row 0: steps must be at most 5 \(the serving limit is 5 "
                                                  r"\(MEDSYNTH_SERVE_MAX_STEPS\)\), got 6"):
        model.predict(pd.DataFrame({"seed": [1], "steps": [6]}))

    monkeypatch.setenv("MEDSYNTH_SERVE_MAX_ROWS", "1")
    model = mlflow.pyfunc.load_model(registered["model_uri"], model_config={"max_rows": 2})
    with pytest.raises(GeneratorInputError, match=r"the request has 2 rows; at most 1 per request"):
        model.predict(pd.DataFrame({"seed": [1, 2]}))
    monkeypatch.setenv("MEDSYNTH_SERVE_MAX_ROWS", "0")
    with pytest.raises(MedsynthError, match="MEDSYNTH_SERVE_MAX_ROWS must be an integer >= 1, got '0'"):
        mlflow.pyfunc.load_model(registered["model_uri"])


def test_sampling_turns_go_in_order_of_arrival() -> None:
    """Waiting requests sample in the order they came; one whose budget runs out leaves the queue, holding nothing."""
    turns = SamplingTurns()
    holder = RequestBudget.start(60)
    turns.acquire(holder)
    order: list[int] = []
    stopped: list[str] = []

    def wait(index: int, budget: RequestBudget) -> None:
        try:
            turns.acquire(budget, poll=0.01)
        except Exception as err:  # noqa: BLE001 - the budget's stop, recorded
            stopped.append(getattr(err, "why", repr(err)))
            return
        order.append(index)
        turns.release()

    threads = []
    for index in range(6):
        budget = RequestBudget.start(0.2 if index == 2 else 60)  # the third one gives up while waiting
        threads.append(threading.Thread(target=wait, args=(index, budget)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while len(turns._waiting) + len(stopped) < index + 1 and time.monotonic() < deadline:
            time.sleep(0.005)  # queued before the next one starts
    time.sleep(0.4)
    assert stopped == ["time"] and len(turns._waiting) == 5
    turns.release()
    for thread in threads:
        thread.join(timeout=10)
    assert order == [0, 1, 3, 4, 5]
    turns.acquire(holder)  # free again: taken at once
    turns.release()


def test_time_limit_stops_a_slow_request(registered: dict[str, Any]) -> None:
    """A request past its time budget stops at its next sampling step, with a reason naming the limit."""
    model = GeneratorModel().load(registered["checkpoint"], device="cpu", limits=ServeLimits(time_limit=2.0, batch_size=4))
    steps_run = []
    make_sampler = model.generator.sampler

    def slow_sampler(name: str | None = None) -> Any:
        sampler = make_sampler(name)
        step = sampler.step

        def slow_step(*args: Any, **kwargs: Any) -> Any:
            steps_run.append(time.monotonic())
            time.sleep(0.1)
            return step(*args, **kwargs)

        sampler.step = slow_step
        return sampler

    model.generator.sampler = slow_sampler
    # 8 rows in 2 batches of 4, 50 steps each: 100 steps of >= 0.1 s, far past 2 s (a budget that also leaves a
    # loaded machine time to prepare the request before its first step)
    rows = pd.DataFrame({"seed": range(8), "steps": [50] * 8})
    started = time.monotonic()
    with pytest.raises(RequestStopped, match=r"the request ran past the serving time limit of 2 s "
                                             r"\(MEDSYNTH_SERVE_TIME_LIMIT\) with 0 of 8 samples drawn; "
                                             r"send fewer rows or steps per request") as caught:
        model.predict(None, rows)
    elapsed = time.monotonic() - started
    assert caught.value.get_http_status_code() == 503
    assert 0 < len(steps_run) < 50, len(steps_run)  # stopped within the first batch
    assert elapsed < 2.0 + 1.5 and steps_run[-1] - started < 2.0 + 0.3
    # the same model answers a request that fits its budget (a generous one: a loaded machine is slow)
    model.limits = dataclasses.replace(model.limits, time_limit=60.0)
    steps_run.clear()
    out = model.predict(None, pd.DataFrame({"seed": [1, 2], "steps": [3, 3]}))
    assert len(out) == 2 and len(steps_run) == 3


# ----------------------------------------------------------------------------- a real server on loopback


@pytest.fixture(scope="module")
def server(registered: dict[str, Any]) -> Any:
    """``mlflow models serve`` of the registered model on 127.0.0.1, with :data:`SERVER_ENV`; always stopped."""
    port = free_port()
    log_path = registered["root"] / "serve.log"
    env = {"MLFLOW_TRACKING_URI": registered["uri"], **{limit_variable(k): "" for k in LIMIT_KEYS}, **SERVER_ENV}
    process = serve_model(registered["model_uri"], port=port, log_path=log_path, env=env)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", process, log_path)
        yield {"url": f"http://127.0.0.1:{port}/invocations", "process": process, "log": log_path}
    finally:
        stop(process)


BAD_REQUESTS: list[tuple[str, bytes | dict[str, Any], str, str]] = [
    # (what, body, content type, the reason the client must get)
    ("malformed JSON", b'{"dataframe_records": [{"seed": 1}', "application/json",
     "the body is not JSON: Expecting ',' delimiter at line 1 column 35"),
    ("NaN", b'{"dataframe_records": [{"seed": NaN}]}', "application/json", "the body holds NaN, which is not a JSON number"),
    ("Infinity", b'{"dataframe_records": [{"seed": 1, "guidance_scale": Infinity}]}', "application/json",
     "the body holds Infinity, which is not a JSON number"),
    ("too many rows", {"dataframe_records": [{"seed": i} for i in range(65)]}, "application/json",
     "the request has 65 rows; at most 64 per request (MEDSYNTH_SERVE_MAX_ROWS): split it"),
    ("steps above the limit", {"dataframe_records": [{"seed": 1, "steps": 81}]}, "application/json",
     "row 0: steps must be at most 80 (the serving limit is 80 (MEDSYNTH_SERVE_MAX_STEPS)), got 81"),
    ("oversize body", {"dataframe_records": [{"seed": 1, "prompt": "x" * 25_000}]}, "application/json",
     f"the request body has {25_000 + 50} bytes; at most 20000 per request (MEDSYNTH_SERVE_MAX_BODY_BYTES): "
     "send fewer rows"),
    ("ragged rows", {"dataframe_split": {"columns": ["seed", "steps"], "data": [[1, 3], [2]]}}, "application/json",
     "dataframe_split.data must be a list of rows of 2 values each"),
    ("a label map for a class model", {"dataframe_records": [{"seed": 1, "label_map": [[0, 1], [1, 0]]}]},
     "application/json",
     "row 0: unknown column(s) ['label_map']; this model takes ['seed', 'prompt', 'steps', 'guidance_scale']"),
    ("a fractional seed", {"dataframe_records": [{"seed": 1.5}]}, "application/json",
     "row 0: seed must be an integer, got a JSON number"),
    ("an unknown attribute value", {"dataframe_records": [{"seed": 1, "prompt": "level=9"}]}, "application/json",
     "row 0: prompt 'level=9': attribute level='9' is not one the model was trained with: ['1', '2', '3']"),
    ("CSV", b"seed\n1\n", "text/csv",
     "send the rows as JSON with Content-Type: application/json, got Content-Type 'text/csv'"),
]


def _assert_clean_refusal(status: int, body: bytes, reason: str) -> None:
    """A 400 whose JSON body is ``{"error_code", "message"}`` with the reason alone: no traceback, no echo."""
    assert status == 400, (status, body[:500])
    answer = json.loads(body)
    assert answer == {"error_code": "INVALID_PARAMETER_VALUE", "message": reason}, answer
    assert b"Traceback" not in body and b'File \\"' not in body and len(body) < 2000


def test_concurrent_clients_get_answers_and_bad_requests_get_400(server: dict[str, Any]) -> None:
    """Four clients with good requests and one cycling through bad ones for 3 s: every good one 200, every bad one 400."""
    stop_at = time.monotonic() + 3.0
    good: list[tuple[int, bytes]] = []
    bad: list[tuple[int, bytes, str]] = []
    errors: list[BaseException] = []

    def good_client(index: int) -> None:
        seed = 1000 * index
        try:
            for turn in range(10_000):  # at least 2 each, however slow the machine
                if turn >= 2 and time.monotonic() >= stop_at:
                    break
                rows = [{"seed": seed, "prompt": "level=2", "steps": 3}, {"seed": seed + 1, "steps": 3}]
                good.append(post(server["url"], {"dataframe_records": rows}))
                seed += 2
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def bad_client() -> None:
        try:
            for turn in range(10_000):
                if turn >= len(BAD_REQUESTS) and time.monotonic() >= stop_at:
                    break
                _, body, content_type, reason = BAD_REQUESTS[turn % len(BAD_REQUESTS)]
                bad.append((*post(server["url"], body, content_type=content_type), reason))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=good_client, args=(i,)) for i in range(4)] + [threading.Thread(target=bad_client)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(good) >= 8 and len(bad) >= len(BAD_REQUESTS)
    for status, body in good:
        assert status == 200, body[:500]
        predictions = json.loads(body)["predictions"]
        assert len(predictions) == 2 and all(p["shape"] == [16, 16] for p in predictions)
    for status, body, reason in bad:
        _assert_clean_refusal(status, body, reason)


def _load_benchmark() -> Any:
    """``benchmarks/serve_load.py`` as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_load_benchmark_short_run(registered: dict[str, Any], server: dict[str, Any]) -> None:
    """The load benchmark's clients, 10 of them for 3 s with a third of bad requests: no 5xx, nothing unexpected."""
    bench = _load_benchmark()
    limits = ServeLimits(max_rows=64, max_steps=80, max_body_bytes=20_000, batch_size=4, time_limit=3)
    model = GeneratorModel().load(registered["checkpoint"], device="cpu", limits=limits)
    requests = bench.make_requests(model, rows=2, steps=3,
                                   limits={"max_rows": 64, "max_steps": 80, "max_body_bytes": 20_000})
    records = bench.run_load(server["url"], requests, clients=10, seconds=3.0, bad_fraction=0.3)
    load = bench.summarize(records, seconds=3.0, rows=2)
    assert load["good"] >= 10 and load["bad"] >= len(requests.bad), load
    assert load["5xx"] == 0 and load["unexpected"] == 0 and set(load["statuses"]) == {200, 400}, load
    assert load["samples_per_s"] > 0 and load["good_p50_ms"] <= load["good_p99_ms"]
    memory = bench.server_memory_mib(server["process"])
    assert memory["VmHWM"] >= memory["VmRSS"] > 50
    stop_row = {"in_flight": True, "status": 503, "message": "m", "exit_s": 1.0, "answered_s": 0.1}
    report = bench.table(load, load, {"now": memory}, stop_row, clients=10, seconds=3.0)
    assert "| served, 10 clients, 3 s |" in report and "| now |" in report


def test_oversize_chunked_body_is_refused(server: dict[str, Any]) -> None:
    """A body sent in chunks (no Content-Length) is refused once it passes ``max_body_bytes``."""
    import http.client

    host, port = server["url"].split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        chunks = [b'{"dataframe_records": [{"seed": 1, "prompt": "'] + [b"x" * 1000] * 30 + [b'"}]}']
        connection.request("POST", "/invocations", body=iter(chunks), headers={"Content-Type": "application/json"},
                           encode_chunked=True)
        response = connection.getresponse()
        _assert_clean_refusal(response.status, response.read(), "the request body has more than 20000 bytes; at most 20000 "
                                                          "per request (MEDSYNTH_SERVE_MAX_BODY_BYTES): send fewer rows")
    finally:
        connection.close()


def test_request_past_its_time_limit_is_stopped(server: dict[str, Any]) -> None:
    """A request still sampling at the time limit (3 s here) is answered 503 with the reason; the server goes on."""
    started = time.monotonic()
    status, body = post(server["url"], SLOW)
    elapsed = time.monotonic() - started
    assert status == 503, body[:500]
    message = json.loads(body)["message"]
    assert message.startswith("the request ran past the serving time limit of 3 s (MEDSYNTH_SERVE_TIME_LIMIT) with ")
    assert message.endswith(" of 64 samples drawn; send fewer rows or steps per request") and b"Traceback" not in body
    assert 3.0 <= elapsed < 3.0 + 2.0, elapsed
    status, body = post(server["url"], {"dataframe_records": [{"seed": 5, "steps": 2}]})
    assert status == 200 and len(json.loads(body)["predictions"]) == 1


NESTED_SIGNALS = """
import os, signal, sys
from medsynth.tracking import serving

calls = 0
def uvicorn_handler(number, frame):
    global calls
    calls += 1

signal.signal(signal.SIGTERM, uvicorn_handler)
serving._install_stop_handler()
signals_left = 3
def inside_set(frame, event, arg):
    global signals_left
    if event == "line" and signals_left:
        signals_left -= 1
        os.kill(os.getpid(), signal.SIGTERM)  # handled before set() returns: the handler is re-entered there
    return inside_set
sys.settrace(lambda frame, event, arg: inside_set if frame.f_code.co_name == "set" else None)
os.kill(os.getpid(), signal.SIGTERM)
for _ in range(1000):
    pass
sys.settrace(None)
print("stopping", serving._SERVER_STOPPING.is_set(), "calls", calls)
"""


def test_stop_handler_survives_a_signal_arriving_inside_it() -> None:
    """A SIGTERM landing while the stop handler marks the server stopping does not wedge the main thread.

    uvicorn gets two SIGTERMs when `mlflow models serve`'s process group is signalled (one directly,
    one as the parent-death signal of the ``mlflow`` process), and Python runs a handler in the main
    thread between bytecodes, so the second can run inside the first. A lock taken in the handler
    (``threading.Event.set`` takes one) is then waited for by its own nested call, for ever: the
    server neither answers nor shuts down. Here a signal is sent at each line the flag's ``set``
    runs (a tracer), deterministically.
    """
    done = subprocess.run([sys.executable, "-c", NESTED_SIGNALS], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    words = done.stdout.split()
    assert words[:3] == ["stopping", "True", "calls"] and int(words[3]) >= 2, done.stdout  # uvicorn's handler still runs


def test_sigusr1_writes_every_thread_stack_to_the_log(server: dict[str, Any]) -> None:
    """SIGUSR1 to uvicorn dumps its threads' stacks (the event loop's among them) to the log; serving goes on."""
    log = dump_server_stacks(server["process"], Path(server["log"]))
    assert "Current thread" in log and "uvicorn/server.py" in log, log[-3000:]
    status, body = post(server["url"], {"dataframe_records": [{"seed": 5, "steps": 2}]})
    assert status == 200 and len(json.loads(body)["predictions"]) == 1


def test_sigterm_stops_the_server_mid_request(server: dict[str, Any]) -> None:
    """SIGTERM while a request samples: that request is answered 503 "shutting down" and the server exits in seconds.

    Runs last: it ends the module's server.
    """
    process = server["process"]
    answer: list[tuple[int, bytes]] = []
    client = threading.Thread(target=lambda: answer.append(post(server["url"], SLOW)))
    client.start()
    time.sleep(1.0)  # the request now samples: it takes several seconds and its limit is 3 s
    assert not answer and group_alive(process)
    signalled = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    client.join(timeout=10)
    answered = time.monotonic() - signalled
    if not answer:
        pytest.fail(f"no answer 10 s after SIGTERM; the server's log, with its stacks:\n"
                    f"{dump_server_stacks(process, Path(server['log']))}")
    assert answered < 2.0, answered
    status, body = answer[0]
    assert status == 503, body[:500]
    message = json.loads(body)["message"]
    assert message.startswith("the server is shutting down; the request was stopped with ")
    assert message.endswith(" of 64 samples drawn: send it again")
    assert wait_group_gone(process, timeout=5.0), "the server still runs 5 s after SIGTERM"
    log = Path(server["log"]).read_text(errors="replace")
    assert "Finished server process" in log and "Traceback" not in log, log[-3000:]

"""A served generator under load: N clients against ``mlflow models serve`` on 127.0.0.1 for S seconds.

Usage:
    python benchmarks/serve_load.py [--clients 10] [--seconds 60] [--rows 2] [--steps 10] [--bad-fraction 0.2]
        [--model-uri models:/NAME/VERSION --tracking-uri URI] [--set KEY=VALUE ...] [--limit KEY=VALUE ...]
        [--out DIR] [--json PATH]

Without ``--model-uri`` a tiny generator is trained on the demo data (``data=demo``, 32x32 slices,
mask conditioning; ``--set`` adds training overrides) in ``--out`` (default a temporary folder)
and registered there. With it, that registered generator is served from ``--tracking-uri``.

The model is served by ``mlflow models serve --env-manager local --workers 1`` on a free port of
127.0.0.1, with the serving limits of ``--limit`` in its environment (``MEDSYNTH_SERVE_<NAME>``,
docs/serving-limits.md; by default ``max_body_bytes=1000000``). Then ``--clients`` threads send
requests back to back for ``--seconds``: a share ``--bad-fraction`` of them are bad requests
(malformed JSON, NaN, too many rows, steps above the limit, a body over the size limit, a
misshapen row, the wrong content type), the rest ``--rows`` samples at ``--steps`` steps each.

Reported: requests and throughput (requests/s, samples/s of good requests), client-side latency
p50/p95/p99 of good and bad requests, HTTP status counts, 5xx count (must be 0), requests answered
otherwise than expected (a good one not 200, a bad one not a 400 with a clean reason; must be 0),
and the server's resident memory after warm-up, at the end and at its peak. The baseline row is
the same good request through the model in this process (no HTTP, one client) for a few seconds.
Last, one long request is sent and the server gets SIGTERM while it samples: the table gives what
that request was answered and how long the server took to exit.

The script exits with status 1 when a 5xx other than that last request or an unexpected answer
was seen.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers import free_port, group_alive, wait_until_up  # noqa: E402
from tests.servers import serve_model as start_server  # noqa: E402

TINY = [
    "data=demo",
    "data.size=[32,32]",
    "model.conditioning=mask",
    "model.network.channels=[8,16]",
    "model.network.attention_levels=[false,true]",
    "model.network.num_head_channels=8",
    "model.network.norm_num_groups=8",
    "trainer.max_steps=20",
    "trainer.batch_size=8",
    "trainer.warmup_steps=1",
    "trainer.grid.num=1",
    "trainer.grid.steps=1",
    "trainer.validation.timestep_fractions=[0.5]",
    "trainer.sampling.steps=10",
    "progress=false",
]
"""Training overrides of the default tiny generator (about 0.05M parameters, seconds on a CPU)."""

DEFAULT_LIMITS = {"max_body_bytes": "1000000"}
"""Serving limits set in the server's environment unless ``--limit`` gives them."""


# ----------------------------------------------------------------------------------- the model


def build_tiny_generator(out: Path, overrides: Sequence[str]) -> tuple[str, str]:
    """Preprocess the demo data, train a tiny generator and register it, each stage a fresh process.

    Returns:
        The registered model's URI and the tracking URI of the store holding it.
    """
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    common = [*TINY, *overrides, f"paths.output={out}", f"mlflow.tracking_uri={tracking_uri}"]
    for stage in ("preprocess", "train"):
        subprocess.run([str(Path(sys.executable).parent / "medsynth"), stage, *common], cwd=out, check=True,
                       stdout=subprocess.DEVNULL)
    from medsynth.tracking.registry import log_generator
    from medsynth.training import load_checkpoint

    checkpoint = out / "checkpoints" / "last.pt"
    run_id = load_checkpoint(checkpoint)["run_id"]
    return log_generator(checkpoint, run_id=run_id, tracking_uri=tracking_uri, registered_name="serve-load"), tracking_uri


def logged_limits(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """The serving limits stored in a logged generator's ``model_config`` (what the server starts from)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return dict(mlflow.models.Model.load(model_uri).flavors.get("python_function", {}).get("config") or {})


@dataclasses.dataclass
class Requests:
    """The bodies the clients send, built for one model."""

    good: Callable[[int], bytes]
    bad: list[tuple[str, bytes, str]]
    slow: bytes
    rows: int


def make_requests(model: Any, *, rows: int, steps: int, limits: dict[str, int]) -> Requests:
    """Good, bad and slow request bodies for ``model`` (a loaded :class:`~medsynth.tracking.serving.GeneratorModel`).

    Args:
        model: The served model, loaded here for its columns, image size, labels and vocabulary.
        rows: Samples per good request.
        steps: Sampling steps of each good sample.
        limits: The server's ``max_rows``, ``max_steps`` and ``max_body_bytes``.

    Returns:
        The request bodies.
    """
    columns = model.columns
    size = tuple(model.image_size)
    label_map = None
    if "label_map" in columns:  # nested rings of every label, largest first
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in size], indexing="ij"))
        radius = np.sqrt((grid**2).sum(0))
        classes = len(model.label_names)
        label_map = np.clip((classes - radius * classes).astype(int), 0, classes - 1).tolist()
    prompts = [""]
    if "prompt" in columns:
        vocabulary = model.generator.model.vocabulary
        prompts = [f"{key}={value}" for key, values in vocabulary.items() for value in values] or [""]

    def row(seed: int, row_steps: int = steps) -> dict[str, Any]:
        item: dict[str, Any] = {"seed": seed, "steps": row_steps}
        if label_map is not None:
            item["label_map"] = label_map
        if "prompt" in columns:
            item["prompt"] = prompts[seed % len(prompts)]
        return item

    def encode(value: Any) -> bytes:
        return json.dumps(value).encode()

    def good(index: int) -> bytes:
        return encode({"dataframe_records": [row(rows * index + k) for k in range(rows)]})

    wrong = {"seed": 1, "label_map": [[0]]} if label_map is not None else {"seed": 1, "label_map": [[0]], "steps": 1}
    bad = [
        ("malformed JSON", b'{"dataframe_records": [{"seed": 1}', "application/json"),
        ("NaN", b'{"dataframe_records": [{"seed": NaN}]}', "application/json"),
        ("too many rows", encode({"dataframe_records": [{"seed": i} for i in range(limits["max_rows"] + 1)]}),
         "application/json"),
        ("steps above the limit", encode({"dataframe_records": [row(1, limits["max_steps"] + 1)]}), "application/json"),
        ("body over the limit", b" " * (limits["max_body_bytes"] + 1) + encode({"dataframe_records": [row(1)]}),
         "application/json"),
        ("misshapen row", encode({"dataframe_records": [wrong]}), "application/json"),
        ("a string seed", encode({"dataframe_records": [{**row(1), "seed": "1"}]}), "application/json"),
        ("CSV", b"seed\n1\n", "text/csv"),
    ]
    slow_rows = min(limits["max_rows"], 64)
    slow = encode({"dataframe_records": [row(i, limits["max_steps"]) for i in range(slow_rows)]})
    return Requests(good=good, bad=bad, slow=slow, rows=rows)


# ---------------------------------------------------------------------------------- the server


def stop_group(process: subprocess.Popen, *, grace: float = 20.0) -> float:
    """SIGTERM to the server's process group (SIGKILL after ``grace`` s); seconds until every process ended."""
    started = time.monotonic()
    if group_alive(process):
        os.killpg(process.pid, signal.SIGTERM)
    while group_alive(process):
        if time.monotonic() - started > grace:
            os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.02)
    process.wait()
    return time.monotonic() - started


def server_memory_mib(process: subprocess.Popen) -> dict[str, float]:
    """Resident and peak resident memory (MiB) of the uvicorn process in the server's group."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            pid = int(status.parent.name)
            if os.getpgid(pid) != process.pid or pid == process.pid:
                continue
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except (OSError, ValueError):
            continue
        return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM") if key in fields}
    return {}


# ------------------------------------------------------------------------------------- the load


def post(url: str, body: bytes, content_type: str, *, timeout: float = 120.0) -> tuple[int, bytes]:
    """POST ``body``; the HTTP status (0 when the connection failed) and the response body."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        return 0, str(err).encode()


def clean_refusal(status: int, body: bytes) -> bool:
    """Whether an answer is a 400 whose JSON body has a one-line reason and no traceback."""
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    message = answer.get("message") if isinstance(answer, dict) else None
    return (status == 400 and isinstance(message, str) and "\n" not in message and "Traceback" not in message
            and set(answer) == {"error_code", "message"})


@dataclasses.dataclass
class Record:
    """One request: what it was, its status, its latency in seconds and whether the answer was the expected one."""

    kind: str
    status: int
    seconds: float
    expected: bool


def run_load(url: str, requests: Requests, *, clients: int, seconds: float, bad_fraction: float) -> list[Record]:
    """``clients`` threads sending requests back to back to ``url`` for ``seconds``.

    Request ``k`` of a client is bad when ``floor((k + 1) * bad_fraction)`` passes an integer, so
    each client sends the same mix; bad requests cycle through ``requests.bad``.

    Returns:
        One record per request, in no particular order.
    """
    records: list[Record] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        k = 0
        while time.monotonic() < stop_at:
            bad = int((k + 1) * bad_fraction) > int(k * bad_fraction)
            if bad:
                what, body, content_type = requests.bad[(index + k) % len(requests.bad)]
            else:
                what, body, content_type = "good", requests.good(index * 1_000_000 + k), "application/json"
            started = time.perf_counter()
            status, answer = post(url, body, content_type)
            elapsed = time.perf_counter() - started
            expected = clean_refusal(status, answer) if bad else status == 200 and _rows_of(answer) == requests.rows
            with lock:
                records.append(Record("bad" if bad else "good", status, elapsed, expected))
            if not expected:
                print(f"unexpected answer to {what!r}: {status} {answer[:300]!r}", file=sys.stderr)
            k += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def _rows_of(answer: bytes) -> int:
    try:
        return len(json.loads(answer)["predictions"])
    except (ValueError, KeyError, TypeError):
        return -1


def summarize(records: Sequence[Record], *, seconds: float, rows: int) -> dict[str, Any]:
    """Counts, throughput and latency percentiles (ms) of a load run."""
    good = [r.seconds for r in records if r.kind == "good" and r.status == 200]
    bad = [r.seconds for r in records if r.kind == "bad"]
    statuses = Counter(r.status for r in records)

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) * 1000 if values else None

    return {
        "requests": len(records), "good": sum(r.kind == "good" for r in records), "bad": len(bad),
        "requests_per_s": len(records) / seconds, "samples_per_s": len(good) * rows / seconds,
        "good_p50_ms": pct(good, 50), "good_p95_ms": pct(good, 95), "good_p99_ms": pct(good, 99),
        "bad_p50_ms": pct(bad, 50), "bad_p99_ms": pct(bad, 99),
        "statuses": dict(sorted(statuses.items())), "5xx": sum(n for s, n in statuses.items() if s >= 500),
        "unexpected": sum(not r.expected for r in records),
    }


def in_process_baseline(model: Any, requests: Requests, *, seconds: float) -> dict[str, Any]:
    """The good request through ``model.predict`` in this process, one at a time, for ``seconds``."""
    latencies = []
    stop_at = time.monotonic() + seconds
    k = 0
    while time.monotonic() < stop_at or k < 3:
        rows = json.loads(requests.good(k))["dataframe_records"]
        started = time.perf_counter()
        model.generate(rows)
        latencies.append(time.perf_counter() - started)
        k += 1
    total = sum(latencies)
    return {"requests": k, "requests_per_s": k / total, "samples_per_s": k * requests.rows / total,
            **{f"good_p{q}_ms": float(np.percentile(latencies, q)) * 1000 for q in (50, 95, 99)}}


def sigterm_mid_request(url: str, process: subprocess.Popen, requests: Requests, *, after: float = 1.0) -> dict[str, Any]:
    """Send the slow request, SIGTERM the server ``after`` seconds later; its answer and the time to exit."""
    answer: list[tuple[int, bytes, float]] = []

    def send() -> None:
        status, body = post(url, requests.slow, "application/json")
        answer.append((status, body, time.monotonic()))

    client = threading.Thread(target=send, daemon=True)
    client.start()
    time.sleep(after)
    in_flight = not answer
    signalled = time.monotonic()
    exit_seconds = stop_group(process)
    client.join(timeout=30)
    status, body, answered = answer[0] if answer else (0, b"", None)
    try:
        message = json.loads(body).get("message", "")
    except (ValueError, AttributeError):
        message = body[:200].decode(errors="replace")
    return {"in_flight": in_flight, "status": status, "message": message, "exit_s": exit_seconds,
            "answered_s": answered - signalled if answered is not None else None}


# -------------------------------------------------------------------------------------- report


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(load: dict[str, Any], baseline: dict[str, Any], memory: dict[str, dict[str, float]], stop: dict[str, Any],
          *, clients: int, seconds: float) -> str:
    """The figures as markdown."""
    lines = [
        "| run | requests | req/s | samples/s | p50 ms | p95 ms | p99 ms | bad p50 ms | bad p99 ms | statuses | 5xx "
        "| unexpected |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| served, {clients} clients, {seconds:g} s | {load['requests']} ({load['good']} good, {load['bad']} bad) | "
        f"{_cell(load['requests_per_s'])} | {_cell(load['samples_per_s'])} | {_cell(load['good_p50_ms'])} | "
        f"{_cell(load['good_p95_ms'])} | {_cell(load['good_p99_ms'])} | {_cell(load['bad_p50_ms'])} | "
        f"{_cell(load['bad_p99_ms'])} | {', '.join(f'{s}: {n}' for s, n in load['statuses'].items())} | "
        f"{load['5xx']} | {load['unexpected']} |",
        f"| baseline: in-process predict, 1 client | {baseline['requests']} | {_cell(baseline['requests_per_s'])} | "
        f"{_cell(baseline['samples_per_s'])} | {_cell(baseline['good_p50_ms'])} | {_cell(baseline['good_p95_ms'])} | "
        f"{_cell(baseline['good_p99_ms'])} | - | - | - | - | - |",
        "",
        "| server memory | RSS MiB | peak RSS MiB |",
        "|---|---|---|",
    ]
    for when, figures in memory.items():
        lines.append(f"| {when} | {_cell(figures.get('VmRSS'))} | {_cell(figures.get('VmHWM'))} |")
    lines += [
        "",
        "| SIGTERM mid-request | in flight at SIGTERM | status | answered after s | server gone after s | reason |",
        "|---|---|---|---|---|---|",
        f"| slow request | {stop['in_flight']} | {stop['status']} | {_cell(stop['answered_s'], 2)} | "
        f"{_cell(stop['exit_s'], 2)} | {stop['message']} |",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rows", type=int, default=2, help="samples per good request")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps of each good sample")
    parser.add_argument("--bad-fraction", type=float, default=0.2)
    parser.add_argument("--baseline-seconds", type=float, default=5.0)
    parser.add_argument("--model-uri", help="a registered generator (models:/NAME/VERSION); default: train a tiny one")
    parser.add_argument("--tracking-uri", help="the store holding --model-uri")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="training override of the tiny model")
    parser.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                        help="serving limit for the server (MEDSYNTH_SERVE_<KEY>)")
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.model_uri and not args.tracking_uri:
        parser.error("--model-uri needs --tracking-uri")
    if not 0.0 <= args.bad_fraction < 1.0 or args.clients < 1 or args.seconds <= 0 or args.rows < 1 or args.steps < 1:
        parser.error("need --clients >= 1, --seconds > 0, --rows >= 1, --steps >= 1 and 0 <= --bad-fraction < 1")

    from medsynth import MedsynthError
    from medsynth.tracking.serving import LIMIT_KEYS, limit_variable, serve_limits

    if any("=" not in item for item in args.limit):
        parser.error("--limit takes KEY=VALUE")
    given = dict(item.split("=", 1) for item in args.limit)
    unknown = sorted(set(given) - set(LIMIT_KEYS))
    if unknown:
        parser.error(f"--limit: unknown limit(s) {unknown}; known: {list(LIMIT_KEYS)}")
    limit_env = {limit_variable(k): v for k, v in {**DEFAULT_LIMITS, **given}.items()}
    try:
        serve_limits(None, environ=limit_env)
        return measure(args, limit_env)
    except MedsynthError as err:
        print(f"serve_load: {err}", file=sys.stderr)
        return 2


def measure(args: argparse.Namespace, limit_env: dict[str, str]) -> int:
    """Build or find the model, measure it served under load, print the figures; 1 when a 5xx or unexpected answer came."""
    from medsynth import MedsynthError
    from medsynth.tracking.registry import resolve_checkpoint
    from medsynth.tracking.serving import GeneratorModel, serve_limits

    with tempfile.TemporaryDirectory(prefix="serve_load_") as scratch:
        out = (args.out or Path(scratch)).resolve()
        out.mkdir(parents=True, exist_ok=True)
        if args.model_uri:
            model_uri, tracking_uri = args.model_uri, args.tracking_uri
        else:
            started = time.monotonic()
            model_uri, tracking_uri = build_tiny_generator(out, args.set)
            print(f"built and registered {model_uri} in {time.monotonic() - started:.0f} s", file=sys.stderr)
        checkpoint = resolve_checkpoint(model_uri, tracking_uri=tracking_uri, download_dir=out / "download")
        limits = serve_limits(logged_limits(model_uri, tracking_uri), environ=limit_env)
        model = GeneratorModel().load(checkpoint, limits=limits)
        resolved = model.limits
        if args.steps > int(resolved.max_steps):
            raise MedsynthError(f"--steps {args.steps} is above the model's max_steps {resolved.max_steps}")
        requests = make_requests(model, rows=args.rows, steps=args.steps,
                                 limits={"max_rows": resolved.max_rows, "max_steps": int(resolved.max_steps),
                                         "max_body_bytes": resolved.max_body_bytes})
        baseline = in_process_baseline(model, requests, seconds=args.baseline_seconds)
        del model

        port = free_port()
        log_path = out / "serve.log"
        process = start_server(model_uri, port=port, env={"MLFLOW_TRACKING_URI": tracking_uri, **limit_env},
                               log_path=log_path)
        url = f"http://127.0.0.1:{port}/invocations"
        memory: dict[str, dict[str, float]] = {}
        try:
            wait_until_up(f"http://127.0.0.1:{port}", process, log_path)
            run_load(url, requests, clients=args.clients, seconds=min(2.0, args.seconds), bad_fraction=args.bad_fraction)
            memory["after warm-up"] = server_memory_mib(process)
            records = run_load(url, requests, clients=args.clients, seconds=args.seconds, bad_fraction=args.bad_fraction)
            memory["after the load"] = server_memory_mib(process)
            stop = sigterm_mid_request(url, process, requests)
        finally:
            if group_alive(process):
                stop_group(process)
        load = summarize(records, seconds=args.seconds, rows=args.rows)
        log = log_path.read_text(errors="replace")
        load["tracebacks_in_log"] = log.count("Traceback")

    print(table(load, baseline, memory, stop, clients=args.clients, seconds=args.seconds))
    print(f"\nmodel {model_uri}, {args.rows} rows x {args.steps} steps per good request, "
          f"{args.bad_fraction:g} bad, limits {limit_env}; tracebacks in the server log: {load['tracebacks_in_log']}")
    if args.json:
        args.json.write_text(json.dumps({"load": load, "baseline": baseline, "memory": memory, "sigterm": stop}, indent=2))
    return 1 if load["5xx"] or load["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())

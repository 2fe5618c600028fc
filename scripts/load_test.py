#!/usr/bin/env python
"""Load-test the served pipeline: throughput, p50/p95/p99 latency, errors and Triton's own batch statistics per
concurrency level — bounded in requests and time, loopback only.

    python scripts/load_test.py --url 127.0.0.1:8000 --concurrency 1,8,32 --requests 1000
    python scripts/load_test.py --engines engines/X --dynamic-batching on,off --concurrency 1,8,32 --requests 1000

``--url``: a running server (runtime/serve.py). ``--engines``: the script generates the repository and runs a
server per ``--dynamic-batching`` setting itself, on free loopback ports. Each request is one (image, question) row
of ``--jsonl`` (default: the README's samples), cycled; every level sends ``--requests`` requests from
``--concurrency`` threads (one client each), and stops early at ``--max-seconds``. An answer that differs from the
one the server gave the same row alone, before the level, counts as an error. Writes results.json and
load_test.png into --out. Exit codes: 0 done with no error, 1 errors (or a server failure), 2 a usage error.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from runtime.errors import BackendError, UsageError, cli_errors, emit

REPO = Path(__file__).resolve().parents[1]
MODEL = "vtprune"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="load_test.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="host:port of a running server's HTTP endpoint (loopback only)")
    target.add_argument("--engines", type=Path, help="serve this engines folder for the test (free loopback ports)")
    parser.add_argument("--dynamic-batching", default="on", help="with --engines: on, off or on,off (default on)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (default 1,8,32)")
    parser.add_argument("--requests", type=int, default=200, help="requests per level (default 200)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop a level after this long (default 300)")
    parser.add_argument("--jsonl", type=Path, default=REPO / "samples" / "questions.jsonl",
                        help='{"image": PATH, "question": TEXT} lines (default: samples/questions.jsonl)')
    parser.add_argument("--max-new-tokens", type=int, default=10, help="per request (default 10)")
    parser.add_argument("--out", type=Path, default=REPO / "engines" / "_triton_load", help="results folder")
    return parser.parse_args(argv)


def levels(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--concurrency takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"--concurrency levels must be at least 1, got {text!r}")
    return values


def check_loopback(url: str) -> None:
    host = url.rsplit(":", 1)[0].strip("[]")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise UsageError(f"--url {url}: cannot resolve {host!r}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise UsageError(f"--url {url} is not a loopback address: this load test only targets this machine")


def read_rows(path: Path) -> list[tuple[bytes, str]]:
    from runtime.infer import read_jsonl

    return [(Path(image).read_bytes(), question) for image, question in read_jsonl(path)]


def make_inputs(httpclient, image: bytes, question: str, max_new_tokens: int) -> list:
    values = {"image": np.array([[image]], dtype=np.object_), "question": np.array([[question.encode()]], dtype=np.object_),
              "max_new_tokens": np.array([[max_new_tokens]], dtype=np.int32)}
    inputs = []
    for name, value in values.items():
        tensor = httpclient.InferInput(name, list(value.shape), "BYTES" if value.dtype == np.object_ else "INT32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def statistics(httpclient, url: str) -> dict:
    with httpclient.InferenceServerClient(url) as client:
        return client.get_inference_statistics(MODEL)["model_stats"][0]


def batch_histogram(before: dict, after: dict) -> dict[int, int]:
    """Executions per batch size during the level (Triton's batch_stats, after minus before)."""
    counts = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in after.get("batch_stats", [])}
    for b in before.get("batch_stats", []):
        counts[int(b["batch_size"])] -= int(b["compute_infer"]["count"])
    return {size: count for size, count in sorted(counts.items()) if count}


def run_level(url: str, rows, reference: list[str], concurrency: int, total: int, max_seconds: float,
              max_new_tokens: int) -> dict:
    import tritonclient.http as httpclient

    latencies, errors, lock, issued = [], [], threading.Lock(), [0]
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        with httpclient.InferenceServerClient(url, network_timeout=max_seconds) as client:
            while True:
                with lock:
                    if issued[0] >= total or time.monotonic() > deadline:
                        return
                    index = issued[0]
                    issued[0] += 1
                image, question = rows[index % len(rows)]
                start = time.perf_counter()
                try:
                    result = client.infer(MODEL, make_inputs(httpclient, image, question, max_new_tokens))
                    answer = result.as_numpy("answer")[0, 0].decode()
                    problem = None if answer == reference[index % len(rows)] else f"answer {answer!r} differs"
                except Exception as err:  # noqa: BLE001 - every failure of a request is counted, not raised
                    problem = str(err).splitlines()[0][:200]
                elapsed = time.perf_counter() - start
                with lock:
                    (errors.append(problem) if problem else latencies.append(elapsed))

    before = statistics(httpclient, url)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()  # a worker that could not even make its client is a failure of the run
    wall = time.perf_counter() - start
    after = statistics(httpclient, url)
    executions = int(after["execution_count"]) - int(before["execution_count"])
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    ms = np.array(latencies) * 1e3
    return {
        "concurrency": concurrency, "requests": issued[0], "completed": len(latencies), "errors": len(errors),
        "first_errors": sorted(set(errors))[:3], "seconds": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 2) if wall else 0.0,
        "latency_ms": {f"p{q}": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)} if len(ms) else {},
        "triton": {"executions": executions, "inferences": inferences,
                   "mean_batch": round(inferences / executions, 2) if executions else 0.0,
                   "batch_histogram": batch_histogram(before, after)},
    }


def reference_answers(url: str, rows, max_new_tokens: int) -> list[str]:
    """The server's answer to each row sent alone: what every answer under load must equal."""
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(url) as client:
        return [client.infer(MODEL, make_inputs(httpclient, image, question, max_new_tokens)).as_numpy("answer")[0, 0]
                .decode() for image, question in rows]


def run_series(url: str, args, rows, say) -> list[dict]:
    reference = reference_answers(url, rows, args.max_new_tokens)
    results = []
    for concurrency in levels(args.concurrency):
        say(f"load_test.py: concurrency {concurrency}: {args.requests} requests ...")
        level = run_level(url, rows, reference, concurrency, args.requests, args.max_seconds, args.max_new_tokens)
        say(f"load_test.py:   {level['throughput_rps']} req/s, p50 {level['latency_ms'].get('p50')} ms, "
            f"p99 {level['latency_ms'].get('p99')} ms, errors {level['errors']}, mean batch {level['triton']['mean_batch']}")
        results.append(level)
    return results


def serve_and_run(args, rows, batching: bool, say) -> list[dict]:
    from runtime.manifest import Manifest
    from runtime.triton.repository import RepoSettings, write_repository
    from runtime.triton.server import TritonServer

    work = Path(tempfile.mkdtemp(prefix="vtprune-load-"))
    write_repository(Manifest.load(args.engines), work / "repository", RepoSettings(dynamic_batching=batching))
    say(f"load_test.py: serving {args.engines} (dynamic batching {'on' if batching else 'off'})")
    with TritonServer(work / "repository", work) as server:
        return run_series(server.http_url, args, rows, say)


def plot(series: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for number, (name, results) in enumerate(series.items()):
        color = f"C{number}"
        x = [r["concurrency"] for r in results]
        left.plot(x, [r["throughput_rps"] for r in results], marker="o", color=color, label=name)
        for q, style in (("p50", "-"), ("p99", "--")):
            right.plot(x, [r["latency_ms"].get(q, np.nan) for r in results], style, marker="o", color=color,
                       label=f"{name} {q}")
    for axis, label in ((left, "answers / s"), (right, "latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("vtprune on Triton (python flavour, this machine)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    args = parse_args(argv)
    with cli_errors("load_test.py"):
        say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        levels(args.concurrency)
        if args.requests < 1 or args.max_seconds <= 0:
            raise UsageError("--requests must be at least 1 and --max-seconds positive")
        try:
            import tritonclient.http  # noqa: F401
        except ImportError:
            raise UsageError("tritonclient is not installed: pip install '.[serve]'") from None
        rows = read_rows(args.jsonl)
        series: dict[str, list[dict]] = {}
        if args.url:
            check_loopback(args.url)
            series["server"] = run_series(args.url, args, rows, say)
        else:
            settings = [s.strip() for s in args.dynamic_batching.split(",")]
            if not settings or set(settings) - {"on", "off"}:
                raise UsageError(f"--dynamic-batching takes on, off or on,off, got {args.dynamic_batching!r}")
            for setting in settings:
                series[f"dynamic batching {setting}"] = serve_and_run(args, rows, setting == "on", say)
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"target": args.url or str(args.engines), "requests_per_level": args.requests,
                  "max_new_tokens": args.max_new_tokens, "rows": len(rows), "series": series}
        (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        plot(series, args.out / "load_test.png")
        emit(str(args.out / "results.json"))
        if any(level["errors"] for results in series.values() for level in results):
            raise BackendError("some requests failed or answered differently: see first_errors in results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The real ``tritonserver`` (nvidia-pytriton's) on a generated repository of the default engines, on free loopback
ports: answers over HTTP and gRPC equal ``infer.py``'s (one row, several rows, concurrent requests batched by
Triton), bad requests get a clear error and the server serves on, and stopping leaves no process. Skipped where no
``tritonserver`` can run here; a server that runs and then fails is a failure."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.triton
SAMPLES = REPO / "samples"
ROWS = [(record["image"], record["question"]) for record in
        map(json.loads, (SAMPLES / "questions.jsonl").read_text().splitlines())]  # the README's samples


def usable_tritonserver():
    """The tritonserver install, or a skip where there is none or it cannot run on this machine."""
    from runtime.errors import UnsupportedError
    from runtime.triton.server import find_tritonserver

    pytest.importorskip("tritonclient.http")
    pytest.importorskip("tritonclient.grpc")
    try:
        install = find_tritonserver()
    except UnsupportedError as err:
        pytest.skip(str(err))
    env = {**os.environ, "LD_LIBRARY_PATH": str(install.libraries or "")}
    probe = subprocess.run([str(install.binary), "--help"], capture_output=True, env=env)
    if b"--model-repository" not in probe.stdout + probe.stderr:
        pytest.skip(f"{install.binary} does not run here (exit {probe.returncode})")
    return install


def python_env_or_skip():
    from runtime.errors import BackendError
    from runtime.triton.server import ensure_python_env

    try:
        return ensure_python_env()
    except BackendError as err:  # no package registry to make the backend's numpy<2 environment
        pytest.skip(str(err))


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def expected_answers(engines: Path, rows=ROWS) -> list[dict]:
    args = []
    for image, question in rows:
        args += ["--image", SAMPLES / image, "--question", question]
    result = run_cli("runtime/infer.py", "--engines", engines, *args, "--json", "--backend", "ort-cpu", check=True)
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def default_engines(tmp_path_factory):
    from export.builder import BuildOptions, build
    from export.pruning import PruningConfig

    return build(BuildOptions(model=REPO / "models" / "blip2-easyvqa", out=tmp_path_factory.mktemp("triton") / "e",
                              pruning=PruningConfig(ratio=0.5)), REPO / "engines", quiet=True)


@pytest.fixture(scope="module")
def server(default_engines, tmp_path_factory):
    from runtime.manifest import Manifest
    from runtime.triton.repository import RepoSettings, write_repository
    from runtime.triton.server import TritonServer

    install = usable_tritonserver()
    python = python_env_or_skip()
    work = tmp_path_factory.mktemp("triton-server")
    write_repository(Manifest.load(default_engines), work / "repository", RepoSettings())
    with TritonServer(work / "repository", work, install, python) as running:
        yield running


def request_inputs(module, rows, extra: dict | None = None):
    images = np.array([[(SAMPLES / image).read_bytes() if isinstance(image, str) else image] for image, _ in rows],
                      dtype=np.object_)
    questions = np.array([[question.encode()] for _, question in rows], dtype=np.object_)
    inputs = []
    for name, value in (("image", images), ("question", questions), *(extra or {}).items()):
        value = value if isinstance(value, np.ndarray) else np.full((len(rows), 1), value, dtype=np.int32)
        tensor = module.InferInput(name, list(value.shape), "BYTES" if value.dtype == np.object_ else "INT32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def as_records(result) -> list[dict]:
    token_ids = result.as_numpy("token_ids")
    return [{"answer": result.as_numpy("answer")[row, 0].decode(), "finish_reason": result.as_numpy("finish_reason")[row, 0].decode(),
             "kept_indices": result.as_numpy("kept_indices")[row].tolist(),
             "token_ids": [t for t in token_ids[row].tolist() if t >= 0]} for row in range(token_ids.shape[0])]


def strip(records: list[dict]) -> list[dict]:
    keys = ("answer", "finish_reason", "kept_indices", "token_ids")
    return [{key: record[key] for key in keys} for record in records]


def test_http_and_grpc_answer_as_infer_py(server, default_engines):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    expected = strip(expected_answers(default_engines))
    with httpclient.InferenceServerClient(server.http_url) as http:
        one_by_one = [as_records(http.infer("vtprune", request_inputs(httpclient, [row])))[0] for row in ROWS]
    assert one_by_one == expected
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert as_records(grpc.infer("vtprune", request_inputs(grpcclient, ROWS))) == expected  # 4 rows in one request
    finally:
        grpc.close()


def concurrently(url: str, requests: list, threads: int = 8) -> list:
    """Each request (a list of rows) sent from its own thread and client (the way load_test.py sends them; tritonclient's
    gevent async_infer sends one at a time from one thread); a refused request's outcome is its exception."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    def send(rows):
        with httpclient.InferenceServerClient(url) as http:
            try:
                return as_records(http.infer("vtprune", request_inputs(httpclient, rows)))[0]
            except InferenceServerException as err:
                return err

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(send, requests))


def test_concurrent_requests_are_batched_and_answered_alike(server, default_engines):
    import tritonclient.http as httpclient

    expected = strip(expected_answers(default_engines))
    with httpclient.InferenceServerClient(server.http_url) as http:
        before = http.get_inference_statistics("vtprune")["model_stats"][0]
        answers = concurrently(server.http_url, [[ROWS[n % 4]] for n in range(32)])
        after = http.get_inference_statistics("vtprune")["model_stats"][0]
    assert answers == [expected[n % 4] for n in range(32)]
    assert after["inference_count"] - before["inference_count"] == 32
    # fewer executions than requests: Triton's dynamic batcher handed the model several at once
    assert after["execution_count"] - before["execution_count"] < 32


@pytest.mark.parametrize("rows, extra, message", [
    ([(b"this is not an image", "what is the red shape?")], None, "cannot read image of row 1"),
    ([(b"", "what is the red shape?")], None, "image is empty"),
    ([("easyvqa-test-0.png", "   ")], None, "question is empty"),
    ([("easyvqa-test-0.png", "what " * 400)], None, "too long for this model"),
    ([("easyvqa-test-0.png", "what is the red shape?")], {"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ([("easyvqa-test-0.png", "what is the red shape?")], {"num_beams": 99}, "more than the max batch"),
])
def test_a_bad_request_is_refused_clearly_and_the_server_serves_on(server, rows, extra, message):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    with httpclient.InferenceServerClient(server.http_url) as http:
        with pytest.raises(InferenceServerException) as refused:
            http.infer("vtprune", request_inputs(httpclient, rows, extra))
        assert message in refused.value.message() and "Traceback" not in refused.value.message()
        assert refused.value.status() == "400"
        good = as_records(http.infer("vtprune", request_inputs(httpclient, [ROWS[0]])))
    assert good[0]["answer"] == "triangle"


def test_a_bad_request_among_concurrent_ones_fails_alone(server):
    requests = [[ROWS[0]], [(b"corrupt", "what is the red shape?")], [ROWS[3]]] * 4
    outcomes = concurrently(server.http_url, requests)
    for rows, outcome in zip(requests, outcomes):
        if rows[0][0] == b"corrupt":
            assert "cannot read image" in outcome.message()
        else:
            assert outcome["answer"] in ("triangle", "yellow", "blue")


def test_load_test_script_on_the_running_server(server, tmp_path):
    """scripts/load_test.py, tiny: every figure present and positive, no error, Triton's batch statistics adding up
    (no timing assertions); a non-loopback --url is refused before anything is sent."""
    result = run_cli("scripts/load_test.py", "--url", server.http_url, "--concurrency", "1,4", "--requests", "12",
                     "--out", tmp_path, check=True)
    record = json.loads((tmp_path / "results.json").read_text())
    assert result.stdout.strip() == str(tmp_path / "results.json") and (tmp_path / "load_test.png").stat().st_size > 0
    (levels,) = record["series"].values()
    assert [level["concurrency"] for level in levels] == [1, 4]
    for level in levels:
        assert level["requests"] == level["completed"] == 12 and level["errors"] == 0
        assert level["throughput_rps"] > 0 and 0 < level["latency_ms"]["p50"] <= level["latency_ms"]["p99"]
        assert level["triton"]["inferences"] == 12
        assert sum(int(size) * count for size, count in level["triton"]["batch_histogram"].items()) == 12
    refused = run_cli("scripts/load_test.py", "--url", "192.0.2.1:8000", "--out", tmp_path / "x")
    assert refused.returncode == 2 and "not a loopback address" in refused.stderr
    assert not (tmp_path / "x").exists()


def test_stopping_leaves_no_process(server):
    """Last in this module: the server and its Python backend stubs (one per model instance) all end."""
    processes = processes_mentioning(str(server.repository))
    assert len(processes) >= 6  # the server, and a stub for the vtprune model and for each graph
    regions = server.shared_memory_regions()
    assert len(regions) == len(processes) - 1  # one shared-memory region per stub
    group = server.process.pid
    server.stop()
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
    assert processes_mentioning(str(server.repository)) == []
    assert not [region for region in regions if Path("/dev/shm", region).exists()]


def test_serve_names_the_servers_own_error_when_it_cannot_start(default_engines):
    """A port already taken: one line quoting tritonserver's reason and naming its log; nothing left running; the same
    binary found explicitly (--tritonserver) as by default."""
    import socket

    from runtime.triton.server import find_tritonserver

    install = usable_tritonserver()
    python_env_or_skip()
    assert find_tritonserver(install.binary) == install
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("runtime/serve.py", "--engines", default_engines, "--http-port", port, "--grpc-port", 0,
                         "--metrics-port", 0, "--tritonserver", install.binary)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "tritonserver exited during start-up" in error and f"127.0.0.1:{port}' already in use" in error
    log = Path(error.rsplit("log: ", 1)[1])
    assert log.is_file() and processes_mentioning(str(log.parent)) == []
    shutil.rmtree(log.parent)  # kept by serve.py for the user to read


@pytest.mark.slow
def test_serve_cli_starts_answers_and_stops_on_sigterm_and_ctrl_c(default_engines):
    """The README's command: endpoints printed once ready, a tritonclient answer as infer.py's, and SIGTERM or SIGINT
    stop it (exit 0) with its temporary folder and every process gone."""
    import tritonclient.http as httpclient

    usable_tritonserver()
    python_env_or_skip()
    expected = strip(expected_answers(default_engines, ROWS[:1]))
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        serve = subprocess.Popen([sys.executable, str(REPO / "runtime" / "serve.py"), "--engines", str(default_engines),
                                  "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            lines = [serve.stdout.readline() for _ in range(3)]
            assert [line.split()[0] for line in lines] == ["http", "grpc", "metrics"], lines
            url = lines[0].split()[1]
            with httpclient.InferenceServerClient(url) as http:
                assert as_records(http.infer("vtprune", request_inputs(httpclient, ROWS[:1]))) == expected
            serve.send_signal(stop_signal)
            assert serve.wait(60) == 0
            stderr = serve.stderr.read()
            workdir = stderr.split("log: ")[1].split()[0].rsplit("/", 1)[0]
            assert not Path(workdir).exists() and processes_mentioning(workdir) == []
            assert "Traceback" not in stderr
        finally:
            serve.kill()


@pytest.mark.slow
def test_mllama_engines_served_answer_as_infer_py(tmp_path):
    """The other family: the trained Mllama default at ratio 0.5 (Trimmed Llama), through the same generated
    repository kind and server, over gRPC, equal to infer.py."""
    import tritonclient.grpc as grpcclient
    from export.builder import BuildOptions, build
    from export.pruning import PruningConfig
    from runtime.manifest import Manifest
    from runtime.triton.repository import RepoSettings, write_repository
    from runtime.triton.server import TritonServer

    install = usable_tritonserver()
    python = python_env_or_skip()
    engines = build(BuildOptions(model=REPO / "models" / "mllama-easyvqa", out=tmp_path / "e",
                                 pruning=PruningConfig(method="trim-sum", ratio=0.5)), REPO / "engines", quiet=True)
    expected = strip(expected_answers(engines))
    write_repository(Manifest.load(engines), tmp_path / "repository", RepoSettings())
    with TritonServer(tmp_path / "repository", tmp_path, install, python) as running:
        client = grpcclient.InferenceServerClient(running.grpc_url)
        try:
            assert as_records(client.infer("vtprune", request_inputs(grpcclient, ROWS))) == expected
            assert [as_records(client.infer("vtprune", request_inputs(grpcclient, [row])))[0] for row in ROWS] == expected
        finally:
            client.close()
    assert processes_mentioning(str(tmp_path / "repository")) == []

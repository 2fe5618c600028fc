#!/usr/bin/env python
"""Serve an engines folder with Triton Inference Server, locally: the repository's ``python`` flavour generated in
a temporary folder and run by a real ``tritonserver`` (KServe v2 over HTTP and gRPC, Prometheus metrics).

    python runtime/serve.py --engines engines/X [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]

The server is the one ``nvidia-pytriton`` bundles (pip install --no-deps nvidia-pytriton==0.7.0), one on PATH, or
--tritonserver PATH. Its Python backend needs numpy<2: the first run makes a venv for it under ~/.cache/vtprune
(this environment keeps numpy 2), or give --python an interpreter whose environment has numpy<2 and onnxruntime.
Bound to 127.0.0.1 unless --host says otherwise. Prints the endpoints once ready; Ctrl-C or SIGTERM stops the
server and every process it started, and removes the temporary folder.
Exit codes: 0 stopped on request, 1 the server failed (its log is kept and named), 2 a usage error.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from runtime.errors import cli_errors, emit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from runtime.triton_repo import add_repository_flags

    parser = argparse.ArgumentParser(prog="serve.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True, help="folder written by export/build.py")
    parser.add_argument("--host", default="127.0.0.1", help="address every endpoint binds to (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP (default 8000; 0: a free port)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC (default 8001; 0: a free port)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics (default 8002; 0: free)")
    parser.add_argument("--tritonserver", type=Path, default=None, help="the tritonserver binary to run")
    parser.add_argument("--python", type=Path, default=None,
                        help="interpreter for Triton's Python backend (numpy<2 + onnxruntime; default: made once)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness (300)")
    add_repository_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cli_errors("serve.py"):
        from runtime.manifest import Manifest
        from runtime.triton.repository import write_repository
        from runtime.triton.server import TritonServer, find_tritonserver
        from runtime.triton_repo import repository_settings

        settings = repository_settings(args, "python")
        settings.check()
        manifest = Manifest.load(args.engines)
        install = find_tritonserver(args.tritonserver)
        workdir = Path(tempfile.mkdtemp(prefix="vtprune-triton-"))
        write_repository(manifest, workdir / "repository", settings)
        server = TritonServer(workdir / "repository", workdir, install, args.python, args.host,
                              args.http_port, args.grpc_port, args.metrics_port)
        stopping = []

        def on_signal(number, _frame):
            stopping.append(number)
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_signal)
        say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        try:
            say(f"serve.py: starting tritonserver ({install.binary}); log: {server.log_path}")
            server.start(args.ready_timeout)
            emit(f"http    {server.http_url}   (KServe v2: POST /v2/models/vtprune/infer)")
            emit(f"grpc    {server.grpc_url}")
            emit(f"metrics http://{args.host}:{server.metrics_port}/metrics")
            sys.stdout.flush()
            say("serve.py: ready; Ctrl-C stops it")
            status = server.process.wait()
            raise SystemExit(f"serve.py: error: tritonserver exited by itself (exit {status}); log: {server.log_path}")
        except KeyboardInterrupt:
            say("serve.py: stopping")
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            return 0
        except BaseException:
            server.stop()  # the log stays, named in the error
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

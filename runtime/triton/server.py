"""Run a real ``tritonserver`` on a generated repository: find the binary, give its Python backend an environment
that works, start it on loopback ports, wait for readiness, stop it with every child process.

Facts found by running the ``tritonserver`` that the ``nvidia-pytriton`` 0.7.0 wheel bundles (Triton 2.51, Python
backend only), each handled here:
- the wheel keeps one Python backend stub per Python version (``python_backend_stubs/3.X``) outside the backend
  folder: the server is given a backend folder of its own with the right stub linked in;
- the stub links ``libpython3.X.so`` by name, which may resolve to the system's build rather than the interpreter's
  (pyenv, conda): the interpreter's ``LIBDIR`` goes first on ``LD_LIBRARY_PATH``;
- the stub takes its environment (``sys.prefix``, site-packages) from the ``python3`` first on ``PATH``;
- the stub exchanges wrong tensor bytes with numpy 2 (it was built against numpy 1): the backend's environment
  needs numpy<2 — a venv made once by ``ensure_python_env`` (the rest of this project keeps numpy 2);
- the wheel's bundled libraries (``nvidia_pytriton.libs``) go on ``LD_LIBRARY_PATH`` for the binary run directly.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import BackendError, UnsupportedError, UsageError

INSTALL_HINT = ("no tritonserver found: pip install --no-deps nvidia-pytriton==0.7.0 (its bundled server; --no-deps: "
                "the wheel pins numpy<2, which the server does not need in this environment), put tritonserver on "
                "PATH, or give --tritonserver PATH")
# The Python backend's environment: the versions this environment has, but numpy 1 (see the module docstring).
ENV_NUMPY = "numpy==1.26.4"
SHM_PREFIX = "triton_python_backend_shm_region_"
ENV_PACKAGES = ("onnxruntime", "pillow", "tokenizers", "jinja2", "pydantic")


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py [+ the stub]
    stubs: Path | None = None  # nvidia-pytriton: python_backend_stubs/<X.Y>/triton_python_backend_stub
    libraries: Path | None = None  # nvidia-pytriton: its bundled shared libraries

    def stub_for(self, python_version: str) -> Path:
        own = self.python_backend / "triton_python_backend_stub"
        if own.exists():
            return own
        stub = (self.stubs or Path("/nonexistent")) / python_version / "triton_python_backend_stub"
        if not stub.exists():
            raise UnsupportedError(f"{self.binary} has no Python backend stub for Python {python_version}")
        return stub


def install_at(binary: Path) -> TritonInstall:
    """The install around ``bin/tritonserver``: Triton's own layout (``backends/python`` beside ``bin``, the stub in
    it) or nvidia-pytriton's (stubs per Python version beside ``backends``, its libraries two folders up)."""
    root = binary.parents[1]
    stubs, libraries = root / "python_backend_stubs", root.parents[1] / "nvidia_pytriton.libs"
    return TritonInstall(binary, root / "backends" / "python", stubs if stubs.is_dir() else None,
                         libraries if libraries.is_dir() else None)


def find_tritonserver(explicit: str | Path | None = None) -> TritonInstall:
    """``explicit`` (a Triton install's ``bin/tritonserver``), else the one ``nvidia-pytriton`` bundles, else
    ``tritonserver`` on PATH."""
    if explicit is None:
        spec = importlib.util.find_spec("pytriton")  # located without importing it (its imports need its pins)
        if spec is not None and spec.submodule_search_locations:
            binary = Path(list(spec.submodule_search_locations)[0]) / "tritonserver" / "bin" / "tritonserver"
            if binary.exists():
                return install_at(binary)
        explicit = shutil.which("tritonserver")
        if explicit is None:
            raise UnsupportedError(INSTALL_HINT)
    binary = Path(explicit).resolve()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise UsageError(f"--tritonserver {explicit} is not an executable file")
    return install_at(binary)


def python_facts(python: Path) -> dict:
    """The interpreter's version, LIBDIR, numpy version (None without numpy) and whether onnxruntime imports."""
    probe = ("import json, sys, sysconfig, importlib.util as u\n"
             "numpy = None\n"
             "try:\n    import numpy; numpy = numpy.__version__\nexcept Exception: pass\n"
             "print(json.dumps({'version': '%d.%d' % sys.version_info[:2], 'libdir': sysconfig.get_config_var('LIBDIR'),"
             " 'numpy': numpy, 'onnxruntime': u.find_spec('onnxruntime') is not None}))")
    try:
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise UsageError(f"--python {python} could not be run: {err}") from None
    return json.loads(out.strip().splitlines()[-1])


def usable_for_backend(facts: dict) -> bool:
    return facts["numpy"] is not None and int(facts["numpy"].split(".")[0]) < 2 and facts["onnxruntime"]


def env_requirements() -> list[str]:
    from importlib import metadata

    pinned = []
    for package in ENV_PACKAGES:
        try:
            pinned.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pinned.append(package)
    return [ENV_NUMPY, *pinned]


def cache_folder() -> Path:
    base = os.environ.get("VTPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vtprune")
    return Path(base)


def ensure_python_env(progress=lambda line: print(line, file=sys.stderr, flush=True)) -> Path:
    """This interpreter when its environment can host the Python backend (numpy<2, onnxruntime), else a venv made
    once under the cache folder (``VTPRUNE_CACHE``, default ~/.cache/vtprune) with the same versions of the
    runtime's packages and numpy 1.26 — built beside its final name and renamed when complete."""
    if usable_for_backend(python_facts(Path(sys.executable))):
        return Path(sys.executable)
    requirements = env_requirements()
    key = hashlib.sha256(json.dumps([sys.version, requirements]).encode()).hexdigest()[:12]
    folder = cache_folder() / f"triton-python-{sys.version_info[0]}.{sys.version_info[1]}-{key}"
    python = folder / "bin" / "python3"
    if python.exists():
        return python
    staging = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    progress(f"serve: making the Python backend's environment (numpy<2) once: {folder}")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, capture_output=True, text=True)
        subprocess.run([str(staging / "bin" / "python3"), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", *requirements], check=True, capture_output=True, text=True)
        try:
            os.rename(staging, folder)  # only `python3 -m ...` is used: the venv's script shebangs do not matter
        except OSError:
            if not python.exists():  # another serve.py made it meanwhile, else a real failure
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except subprocess.CalledProcessError as err:
        shutil.rmtree(staging, ignore_errors=True)
        last = (err.stderr or err.stdout or "").strip().splitlines()[-1:] or ["?"]
        raise BackendError(f"could not make the Python backend's environment ({' '.join(err.cmd[:4])} ...): "
                           f"{last[0]}") from None
    return python


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TritonServer:
    """``tritonserver`` on ``repository``: ``start()`` returns once it is ready (or raises one line naming the log),
    ``stop()`` ends its whole process group (the Python backend stubs too). A context manager."""

    repository: Path
    workdir: Path  # the server's backend folder and log live here
    install: TritonInstall = field(default_factory=find_tritonserver)
    python: Path | None = None  # the Python backend's interpreter (None: ensure_python_env)
    host: str = "127.0.0.1"
    http_port: int = 0  # 0: a free port
    grpc_port: int = 0
    metrics_port: int = 0
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "tritonserver.log"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def environment(self, facts: dict) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["PATH"] = os.pathsep.join([str(self.python.parent), env.get("PATH", "")])
        libraries = [facts["libdir"] or "", str(self.install.libraries or ""), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libraries if p)
        return env

    def backend_folder(self, python_version: str) -> Path:
        """A backend folder whose ``python`` backend has the stub for the backend's Python version."""
        folder = self.workdir / "backends" / "python"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            link = folder / name
            if not link.exists():
                link.symlink_to(self.install.python_backend / name)
        stub = folder / "triton_python_backend_stub"
        if not stub.exists():
            stub.symlink_to(self.install.stub_for(python_version))
        return folder.parent

    def command(self, backends: Path) -> list[str]:
        return [str(self.install.binary), "--model-repository", str(self.repository), "--backend-directory",
                str(backends), "--http-address", self.host, "--http-port", str(self.http_port), "--grpc-address",
                self.host, "--grpc-port", str(self.grpc_port), "--metrics-address", self.host, "--metrics-port",
                str(self.metrics_port), "--exit-on-error", "true", "--exit-timeout-secs", "10"]

    def start(self, timeout: float = 180.0) -> "TritonServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.python is None:
            self.python = ensure_python_env()
        facts = python_facts(self.python)
        if not usable_for_backend(facts):
            raise UsageError(f"--python {self.python}: its environment needs numpy<2 and onnxruntime for Triton's "
                             f"Python backend (has numpy {facts['numpy']}, onnxruntime "
                             f"{'yes' if facts['onnxruntime'] else 'no'})")
        for name in ("http_port", "grpc_port", "metrics_port"):
            if getattr(self, name) == 0:
                setattr(self, name, free_port())
        backends = self.backend_folder(facts["version"])
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(backends), env=self.environment(facts), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)  # its own process group: stopped as one
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendError(f"tritonserver exited during start-up (exit {self.process.returncode}): "
                                   f"{self.first_error()}; log: {self.log_path}")
            if self.ready():
                return
            time.sleep(0.25)
        raise BackendError(f"tritonserver was not ready after {timeout:.0f} s; log: {self.log_path}")

    def first_error(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        for line in lines:
            if "failed to load" in line or "UNAVAILABLE" in line or line.startswith("error:"):
                return line.strip()[:400]
        errors = [line for line in lines if line.startswith("E")]
        return (errors[-1] if errors else (lines[-1] if lines else "empty log")).strip()[:400]

    def shared_memory_regions(self) -> set[str]:
        """The Python backend's shared-memory regions of this server (named on its stubs' command lines): a server
        that exits on its exit timeout, or is killed, leaves them in /dev/shm."""
        regions = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                arguments = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if arguments and str(self.workdir).encode() in arguments[0]:
                regions |= {a.decode() for a in arguments if a.startswith(SHM_PREFIX.encode())}
        return regions

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds, then its leftover shared-memory
        regions removed; returns its exit status."""
        if self.process is None:
            return None
        regions = self.shared_memory_regions()
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        try:  # anything left in the group (a stub that outlived the server)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for region in regions:
            Path("/dev/shm", region).unlink(missing_ok=True)
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

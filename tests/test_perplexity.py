"""Perplexity on WikiText-2 (-c 512, 40 chunks) within ±1% of llama-perplexity's figures."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from conftest import DATA, need_reference
from tinyinfer.engine import Engine
from tinyinfer.tools.perplexity import perplexity
from test_inference import model_path

# llama-perplexity -c 512 --chunks 40 on wikitext2-test.txt (../shared/reference/README.md)
REFERENCE_PPL = {"F16": 18.9781, "Q8_0": 19.0464, "Q4_1": 18.9959, "Q4_0": 22.4595}
GEMMA3_PPL = 14.6819
QWEN25_PPL = 26.7976     # Qwen2.5-Coder-0.5B-Instruct Q4_K_M (../shared/reference/README.md, qwen2/)

# All four types by default; TINYINFER_PPL_TYPES=Q4_0,F16 narrows a quick local run.
TYPES = [t for t in os.environ.get("TINYINFER_PPL_TYPES", "Q4_1,Q4_0,Q8_0,F16").split(",") if t]
# Two threads in one pytest process; one in each pytest-xdist worker (.ci/run: a worker per core
# already fills the cores: two threads each only wait on each other's barriers, ~1.6x the CPU per chunk)
THREADS = 1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else 2


def wikitext() -> str:
    p = need_reference("..", "data", "wikitext2-test.txt")
    return p.read_text(encoding="utf-8")


@pytest.mark.parametrize("typ", TYPES)
def test_smollm2_perplexity_matches_llama_cpp(typ, smollm2_path):
    need_reference("smollm2")
    eng = Engine(model_path(typ, smollm2_path), n_ctx=512, n_batch=512, n_threads=THREADS)
    out = io.StringIO()
    ppl, unc, running = perplexity(eng, wikitext(), n_ctx=512, n_chunks=40, out=out)
    print(f"{typ}: PPL = {ppl:.4f} +/- {unc:.5f} (llama.cpp {REFERENCE_PPL[typ]})")
    assert len(running) == 40
    assert "Final estimate: PPL = " in out.getvalue()
    assert abs(ppl / REFERENCE_PPL[typ] - 1) <= 0.01


def test_gemma3_perplexity_matches_llama_cpp(gemma3_path):
    need_reference("gemma3")
    eng = Engine(gemma3_path, n_ctx=512, n_batch=512, n_threads=THREADS)
    ppl, unc, _ = perplexity(eng, wikitext(), n_ctx=512, n_chunks=40, out=io.StringIO())
    print(f"gemma3 Q4_K_M: PPL = {ppl:.4f} +/- {unc:.5f} (llama.cpp {GEMMA3_PPL})")
    assert abs(ppl / GEMMA3_PPL - 1) <= 0.01


def test_qwen25_perplexity_matches_llama_cpp(qwen25_path):
    """A qwen2 file (no BOS added to the chunks: add_bos_token is false), 40 chunks of 512."""
    need_reference("qwen2")
    eng = Engine(qwen25_path, n_ctx=512, n_batch=512, n_threads=THREADS)
    ppl, unc, running = perplexity(eng, wikitext(), n_ctx=512, n_chunks=40, out=io.StringIO())
    print(f"qwen2.5 Q4_K_M: PPL = {ppl:.4f} +/- {unc:.5f} (llama.cpp {QWEN25_PPL})")
    assert len(running) == 40
    assert abs(ppl / QWEN25_PPL - 1) <= 0.01


def test_perplexity_cli_output_shape(smollm2_path, tmp_path):
    text = wikitext()[:20000]
    f = tmp_path / "small.txt"
    f.write_text(text, encoding="utf-8")
    p = subprocess.run([sys.executable, "-m", "tinyinfer", "perplexity", "-m", str(smollm2_path), "-f", str(f),
                        "-c", "128", "--chunks", "2", "-t", "2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert re.search(r"\[1\]\d+\.\d{4},\[2\]\d+\.\d{4},", p.stdout)
    assert re.search(r"Final estimate: PPL = \d+\.\d{4} \+/- \d+\.\d{5}", p.stdout)


def test_perplexity_text_too_short_is_an_error(smollm2_path, tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("just a few words", encoding="utf-8")
    p = subprocess.run([sys.executable, "-m", "tinyinfer", "perplexity", "-m", str(smollm2_path), "-f", str(f)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "fewer than one chunk" in p.stderr and "Traceback" not in p.stderr

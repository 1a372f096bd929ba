"""``serve`` against its own /openapi.json: schemathesis, all checks, coverage + fuzzing phases, on a real
server on loopback (SmolLM2): no server error and no conformance failure (a status or content type the
document does not list, a schema-valid request rejected, an invalid one accepted, a reply that breaks its
schema). benchmarks/api_conformance.py is the run; here with a fixed seed and a bounded budget
(``--max-time``, ``-n`` per operation), so CI's slow pass (.ci/run: ``pytest -m slow``) takes ~3 minutes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_schemathesis_finds_nothing(smollm2_path):
    need_module("schemathesis")               # the test extra installs it
    r = subprocess.run([sys.executable, "benchmarks/api_conformance.py", "-m", str(smollm2_path),
                        "--max-time", "120", "--examples", "4", "--seed", "26"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    tail = out[-8000:]
    summary = out.rpartition("SUMMARY")[2]
    ops = re.search(r"Selected:\s+(\d+)/\d+\s+Tested:\s+(\d+)", summary)
    assert ops and int(ops.group(1)) >= 15 and ops.group(2) == ops.group(1), tail    # every operation tested
    assert "Failures:" not in summary and "Errors:" not in summary, tail
    assert r.returncode == 0, tail

"""Shared fixtures: real models from the package index, llama.cpp reference data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("TINYINFER_REFERENCE", ROOT.parent / "shared" / "reference"))
DATA = REFERENCE.parent / "data"


def need_reference(*parts) -> Path:
    p = REFERENCE.joinpath(*parts)
    if not p.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"llama.cpp reference data not found at {p}: under CI missing evidence is a failure")
        pytest.skip(f"llama.cpp reference data not found at {p} (../shared/reference beside the project)")
    return p


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

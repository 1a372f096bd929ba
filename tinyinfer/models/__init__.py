"""Architectures by ``general.architecture``: one file each."""

from __future__ import annotations

import importlib

from .hparams import ModelError

# architecture name -> "module:Class" (imported on demand)
ARCHITECTURES = {
    "llama": "llama:LlamaModel",
    "gemma3": "gemma3:Gemma3Model",
    "qwen2": "qwen2:Qwen2Model",
    "qwen3": "qwen3:Qwen3Model",
    "phi3": "phi3:Phi3Model",
    "smollm3": "smollm3:SmolLM3Model",
    "qwen3moe": "qwen3moe:Qwen3MoeModel",
    "olmoe": "olmoe:OlmoeModel",
    "granitemoe": "granitemoe:GraniteMoeModel",
    "qwen2moe": "qwen2moe:Qwen2MoeModel",
    "bert": "bert:BertModel",
    "nomic-bert": "nomic_bert:NomicBertModel",
    "gemma-embedding": "gemma_embedding:GemmaEmbeddingModel",
}


def supported() -> list:
    return sorted(ARCHITECTURES)


def load_model(g, layers=None):
    """Build the model object for an opened GGUF file (``layers=(lo, hi)``: only those blocks)."""
    arch = g.architecture
    if not arch:
        raise ModelError(f"{g.path}: no general.architecture in the file")
    spec = ARCHITECTURES.get(arch)
    if spec is None:
        raise ModelError(f"{g.path}: architecture {arch!r} is not supported; supported: {', '.join(supported())}")
    mod, cls = spec.split(":")
    return getattr(importlib.import_module(f".{mod}", __name__), cls)(g, layers=layers)

"""tinyinfer: run quantized GGUF language models on small CPUs, in pure Python (numpy + numba)."""

__version__ = "0.1.0"

__all__ = ["Llama", "LlamaGrammar", "LlamaPromptLookupDecoding", "GGUFFile", "GGUFError", "__version__"]


def __getattr__(name):  # keep `import tinyinfer` (and `--help`) light: load on first use
    if name in ("Llama", "LlamaGrammar"):
        from . import api
        return getattr(api, name)
    if name == "LlamaPromptLookupDecoding":
        from . import speculative
        return speculative.LlamaPromptLookupDecoding
    if name in ("GGUFFile", "GGUFError"):
        from . import gguf
        return getattr(gguf, name)
    raise AttributeError(f"module 'tinyinfer' has no attribute {name!r}")

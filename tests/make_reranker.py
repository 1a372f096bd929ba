"""A synthetic BERT cross-encoder (reranker) checkpoint, deterministic: all-MiniLM-L6-v2's encoder with a
seeded classification head (``classifier.dense`` 384x384 + tanh, ``classifier.out_proj`` 1x384), as a
Hugging Face folder (``BertForSequenceClassification``, one label) that ``tinyinfer convert`` turns into
a ``bert`` GGUF with ``cls`` / ``cls.output`` tensors: the file tests compare with llama-server's
/v1/rerank (tests/data/embeddings/README.md).

    python tests/make_reranker.py OUT_DIR        # then: python -m tinyinfer convert OUT_DIR --outtype f16
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np


def make(dst) -> Path:
    from tinyinfer.fetch import checkpoint_dir
    from tinyinfer.tools.convert import read_safetensors, write_safetensors
    src = checkpoint_dir("all-minilm")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["BertForSequenceClassification"], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, dst / f)
    st = {k: np.asarray(v, np.float32) for k, v in read_safetensors(src / "model.safetensors").items()}
    rng = np.random.default_rng(20261206)
    d = cfg["hidden_size"]
    st["classifier.dense.weight"] = (rng.standard_normal((d, d)) * 0.15).astype(np.float32)
    st["classifier.dense.bias"] = (rng.standard_normal(d) * 0.05).astype(np.float32)
    st["classifier.out_proj.weight"] = (rng.standard_normal((1, d)) * 0.3).astype(np.float32)
    st["classifier.out_proj.bias"] = np.array([0.1], np.float32)
    write_safetensors(dst / "model.safetensors", st)
    return dst


if __name__ == "__main__":
    print(make(sys.argv[1]))

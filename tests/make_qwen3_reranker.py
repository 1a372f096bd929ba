"""A synthetic Qwen3-Reranker GGUF, laid out as llama.cpp's convert_hf_to_gguf.py writes a real one: the
synthetic qwen3 decoder (../shared/tools/make_arch_models.py) with ``qwen3.pooling_type`` = 4 (rank),
``qwen3.classifier.output_labels`` = [yes, no], the ``rerank`` chat template, and ``cls.output.weight``
= the output head's rows of the tokens "yes" and "no" (the head is tied to token_embd in this file).
The file tests compare with llama-server's /v1/rerank (tests/data/embeddings/README.md).

    python tests/make_qwen3_reranker.py synthetic-qwen3-F16.gguf OUT.gguf
"""

from __future__ import annotations

import sys

import numpy as np

RERANK_TEMPLATE = (   # convert_hf_to_gguf.py's, for Qwen3-Reranker
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
    "<|im_start|>user\n<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: {query}\n<Document>: {document}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def make(src, dst) -> None:
    import gguf
    from gguf import GGUFValueType as VT

    r = gguf.GGUFReader(src)
    arch = "qwen3"
    w = gguf.GGUFWriter(dst, arch)
    tokens = None
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.name == "tokenizer.ggml.tokens":
            tokens = f.contents()
        sub = f.types[1] if f.types[0] == VT.ARRAY and len(f.types) > 1 else None
        if f.name == f"{arch}.pooling_type":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    w.add_uint32(f"{arch}.pooling_type", 4)
    w.add_array(f"{arch}.classifier.output_labels", ["yes", "no"])
    w.add_string("tokenizer.chat_template.rerank", RERANK_TEMPLATE)
    yes, no = tokens.index("yes"), tokens.index("no")
    head = {t.name: t for t in r.tensors}
    head = head.get("output.weight") or head["token_embd.weight"]     # tied when there is no output.weight
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type if t.data.dtype == np.uint8 else None)
    rows = np.ascontiguousarray(np.asarray(head.data)[[yes, no]])     # (2, n_embd) in the head's type
    w.add_tensor("cls.output.weight", rows, raw_dtype=head.tensor_type if rows.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    make(sys.argv[1], sys.argv[2])

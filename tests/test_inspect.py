"""``tinyinfer.tools.inspect``: what it prints for the real models, the memory arithmetic
(KV cache incl. Gemma 3's sliding window), the verdict, and one-line errors (never a
traceback) for missing, malformed and mutated files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_gguf import QT, VT, GGUFBuilder  # noqa: E402

from tinyinfer.gguf import GGUFFile  # noqa: E402
from tinyinfer.tools import inspect as ins  # noqa: E402
from tinyinfer.tools.inspect import KV_BYTES  # noqa: E402


def run_json(capsys, *argv):
    assert ins.main([*map(str, argv), "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.count("\n") == 1  # one JSON object on one line
    return json.loads(out)


def assert_one_line_error(capsys, rc, path=None):
    out, err = capsys.readouterr()
    assert rc == 1
    assert out == ""
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err
    if path is not None:
        assert str(path) in err
    return err


# -- the real models ----------------------------------------------------------------------------

def test_smollm2_text(capsys, smollm2_path):
    assert ins.main([str(smollm2_path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for s in ["architecture  llama", "Smollm2 135M", "MOSTLY_Q4_1", "context length            8192",
              "embedding length          576", "block count               30", "attention KV heads        3",
              "rope freq base            100000.0", "head dim (n_embd / heads) 64", "GQA ratio                 3",
              "gpt2", "BPE", "pre-tokenizer smollm", "49152 tokens", "48900 merges", "Q4_1       210",
              "Q8_0         1", "F32         61", "134,515,008 parameters", "bits per weight",
              "memory at context 4096 (the file's context length 8192 capped at 4096",
              "KV cache                     90.00 MiB   30 layers, K f16, V f16", "weights (mmapped)", "available on this machine", "verdict"]:
        assert s in out, s
    assert ("verdict                   fits" in out) or ("does not fit" in out)


def test_smollm2_json(capsys, smollm2_path):
    j = run_json(capsys, smollm2_path)
    f = GGUFFile(smollm2_path)
    assert j["general"]["architecture"] == "llama"
    d = j["hparams"]["derived"]
    assert (d["n_layer"], d["n_embd"], d["n_head"], d["n_head_kv"], d["n_ff"], d["n_ctx_train"]) == \
        (30, 576, 9, 3, 1536, 8192)
    assert d["n_embd_head_k"] == d["n_embd_head_v"] == 64 and d["rope_freq_base"] == 100000.0
    assert j["hparams"]["arch_keys"]["llama.vocab_size"] == 49152
    assert j["tokenizer"] == {"model": "gpt2", "kind": "BPE (GPT-2 style byte-level)", "pre": "smollm",
                              "vocab_size": 49152, "n_merges": 48900, "bos_token_id": 1, "eos_token_id": 2,
                              "add_bos_token": False, "chat_template": True}
    t = j["tensors"]
    assert t["count"] == 272 and t["params"] == sum(x.n_elements for x in f.tensors.values())
    assert t["bytes"] == sum(x.nbytes for x in f.tensors.values())
    assert t["by_type"]["Q4_1"]["count"] == 210 and t["by_type"]["Q8_0"]["count"] == 1
    assert sum(e["count"] for e in t["by_type"].values()) == 272
    assert abs(t["bits_per_weight"] - 8 * t["bytes"] / t["params"]) < 1e-3
    m = j["memory"]
    assert m["n_ctx"] == 4096 and "capped" in m["n_ctx_source"]
    assert m["kv_bytes"] == 30 * 4096 * 3 * (64 + 64) * KV_BYTES
    assert m["kv"]["sliding_layers"] == 0
    assert m["weights_bytes"] == t["bytes"]
    w = m["work"]
    assert w["logits"] == 49152 * 4
    assert w["attention_scores"] == 512 * 9 * 4096 * 4
    assert m["work_bytes"] == w["logits"] + w["activations"] + w["attention_scores"]
    assert m["total_bytes"] == m["weights_bytes"] + m["kv_bytes"] + m["work_bytes"]
    assert m["available_bytes"] > 0
    assert m["fits"] == (m["total_bytes"] <= m["available_bytes"])
    assert m["verdict"] == ("fits" if m["fits"] else "does not fit")


def test_gemma3_sliding_window(capsys, gemma3_path):
    j = run_json(capsys, gemma3_path)
    d = j["hparams"]["derived"]
    assert (d["n_layer"], d["n_head"], d["n_head_kv"], d["n_embd_head_k"], d["n_swa"]) == (18, 4, 1, 256, 512)
    m = j["memory"]
    assert m["n_ctx"] == 4096 and "32768 capped at 4096" in m["n_ctx_source"]
    # layers 5, 11, 17 ((il + 1) % 6 == 0) are global; the other 15 keep a ring of window + batch cells
    assert (m["kv"]["global_layers"], m["kv"]["sliding_layers"], m["kv"]["window"]) == (3, 15, 512)
    assert m["kv_bytes"] == (3 * 4096 + 15 * (512 + 512)) * 1 * (256 + 256) * KV_BYTES
    assert j["tokenizer"]["model"] == "llama" and j["tokenizer"]["vocab_size"] == 262144
    assert j["general"]["file_type"] == "MOSTLY_Q4_K_M"
    assert set(j["tensors"]["by_type"]) == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}
    # a context shorter than the window: every layer holds n_ctx cells
    m = run_json(capsys, gemma3_path, "-c", 256)["memory"]
    assert m["n_ctx"] == 256 and m["n_ctx_source"] == "-c"
    assert m["kv_bytes"] == 18 * 256 * 512 * KV_BYTES
    # the full trained context
    m = run_json(capsys, gemma3_path, "-c", 32768)["memory"]
    assert m["kv_bytes"] == (3 * 32768 + 15 * (512 + 512)) * 512 * KV_BYTES


def test_gemma3_text(capsys, gemma3_path):
    assert ins.main([str(gemma3_path), "-c", "8192"]) == 0
    out = capsys.readouterr().out
    for s in ["architecture  gemma3", "sliding window            512", "key length (head dim)     256",
              "SentencePiece", "262144 tokens", "15 sliding (window 512) + 3 global", "memory at context 8192 (-c"]:
        assert s in out, s


def test_ctx_beyond_training_and_batch(capsys, smollm2_path):
    m = run_json(capsys, smollm2_path, "-c", 16384, "-b", 32)["memory"]
    assert "beyond the trained context length 8192" in m["n_ctx_source"]
    assert m["kv_bytes"] == 30 * 16384 * 3 * 128 * KV_BYTES
    assert m["n_batch"] == 32 and m["work"]["attention_scores"] == 32 * 9 * 16384 * 4


def test_ctx_zero_is_the_trained_context(capsys, gemma3_path):
    m = run_json(capsys, gemma3_path, "-c", 0)["memory"]
    assert m["n_ctx"] == 32768 and m["n_ctx_source"].startswith("-c 0")
    assert m["kv_bytes"] == (3 * 32768 + 15 * (512 + 512)) * 512 * KV_BYTES


def test_verdict_does_not_fit(capsys, monkeypatch, smollm2_path):
    import psutil

    class VM:
        available = 100 << 20  # 100 MiB: less than SmolLM2 needs at 4096

    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM)
    j = run_json(capsys, smollm2_path)
    assert j["memory"]["available_bytes"] == 100 << 20
    assert j["memory"]["fits"] is False and j["memory"]["verdict"] == "does not fit"
    assert ins.main([str(smollm2_path)]) == 0
    assert "does not fit" in capsys.readouterr().out


def test_subprocess_module(tmp_path, smollm2_path):
    r = subprocess.run([sys.executable, "-m", "tinyinfer.tools.inspect", str(smollm2_path), "--json", "-c", "2048"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["memory"]["n_ctx"] == 2048
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    r = subprocess.run([sys.executable, "-m", "tinyinfer.tools.inspect", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# -- errors -------------------------------------------------------------------------------------

def test_missing_file(capsys, tmp_path):
    p = tmp_path / "nope.gguf"
    err = assert_one_line_error(capsys, ins.main([str(p)]), p)
    assert "cannot open" in err


def test_directory(capsys, tmp_path):
    assert_one_line_error(capsys, ins.main([str(tmp_path)]), tmp_path)


@pytest.mark.parametrize("data", [b"", b"hello world, not a model", b"GGUF", b"GGUF\x01\x00\x00\x00" + b"\0" * 16,
                                  b"GGUF\x03\x00\x00\x00" + b"\xff" * 16])
def test_bad_files(capsys, tmp_path, data):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    assert_one_line_error(capsys, ins.main([str(p)]), p)
    assert_one_line_error(capsys, ins.main([str(p), "--json"]), p)


def test_truncated_real_header(capsys, tmp_path, smollm2_path):
    f = GGUFFile(smollm2_path)
    p = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(f.data_offset))  # the header only: every tensor runs past the end
    err = assert_one_line_error(capsys, ins.main([str(p)]), p)
    assert "runs past the end" in err


def test_usage_errors(capsys, smollm2_path):
    assert ins.main([]) == 2
    assert ins.main([str(smollm2_path), "-c", "-1"]) == 2
    assert ins.main([str(smollm2_path), "-b", "0"]) == 2
    assert ins.main([str(smollm2_path), "-c", "many"]) == 2
    assert ins.main(["--help"]) == 0
    capsys.readouterr()


# -- files that parse but are unusual --------------------------------------------------------

def test_vocab_only_reference_file(capsys):
    from conftest import need_reference
    p = need_reference("vocab", "ggml-vocab-llama-spm.gguf")
    j = run_json(capsys, p)
    assert j["tensors"]["count"] == 0 and j["tensors"]["bits_per_weight"] is None
    assert j["tokenizer"]["model"] == "llama" and j["tokenizer"]["vocab_size"] > 0
    assert j["memory"]["weights_bytes"] == 0
    assert ins.main([str(p)]) == 0
    assert "tensors" in capsys.readouterr().out


def test_no_architecture(capsys, tmp_path):
    p = tmp_path / "bare.gguf"
    GGUFBuilder().add("x", VT.UINT8, 1).write(p)
    j = run_json(capsys, p)
    assert j["general"]["architecture"] is None
    assert j["memory"]["kv_bytes"] is None and "unknown" in j["memory"]["note"]
    assert j["memory"]["verdict"] == "unknown"
    assert ins.main([str(p)]) == 0
    out = capsys.readouterr().out
    assert "general.architecture missing" in out and "verdict                   unknown" in out


def _llama_like(path, arch="llama", **over):
    b = GGUFBuilder()
    b.add("general.architecture", VT.STRING, arch)
    hp = {"context_length": (VT.UINT32, 2048), "embedding_length": (VT.UINT32, 64),
          "block_count": (VT.UINT32, 4), "feed_forward_length": (VT.UINT32, 128),
          "attention.head_count": (VT.UINT32, 4), "attention.head_count_kv": (VT.UINT32, 2)}
    hp.update(over)
    for k, (vt, v) in hp.items():
        if v is not None:
            b.add(f"{arch}.{k}", vt, v)
    b.add("tokenizer.ggml.model", VT.STRING, "llama")
    b.add("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, ["<unk>", "<s>", "</s>", "a"]))
    b.add_tensor("token_embd.weight", (64, 4), QT.F16)
    b.write(path)


def test_per_layer_kv_heads(capsys, tmp_path):
    """llama.cpp allows per-layer head counts (OpenELM): the KV cache sums over layers."""
    p = tmp_path / "pl.gguf"
    _llama_like(p, **{"attention.head_count_kv": (VT.ARRAY, (VT.INT32, [1, 2, 3, 4])),
                      "attention.head_count": (VT.ARRAY, (VT.INT32, [4, 4, 8, 8]))})
    m = run_json(capsys, p, "-c", 100)["memory"]
    # head dim = 64 / max(heads) = 8; K + V = 16 per KV head
    assert m["kv_bytes"] == 100 * (1 + 2 + 3 + 4) * 16 * KV_BYTES
    assert ins.main([str(p)]) == 0
    capsys.readouterr()


def test_sliding_window_pattern_key_and_unknown_arch(capsys, tmp_path):
    p = tmp_path / "swa.gguf"
    _llama_like(p, arch="gemma3", **{"attention.sliding_window": (VT.UINT32, 16),
                                     "attention.sliding_window_pattern": (VT.ARRAY, (VT.BOOL, [1, 0, 1, 0]))})
    m = run_json(capsys, p, "-c", 100)["memory"]
    assert m["kv"]["sliding_layers"] == 2 and m["kv_bytes"] == (2 * 100 + 2 * 100) * 2 * 32 * KV_BYTES  # window 16 + batch 512 > 100
    p2 = tmp_path / "swa2.gguf"
    _llama_like(p2, arch="newarch", **{"attention.sliding_window": (VT.UINT32, 16)})
    m = run_json(capsys, p2, "-c", 100)["memory"]
    assert m["kv"]["sliding_layers"] == 0 and "unknown" in m["kv"]["note"]
    assert m["kv_bytes"] == 4 * 100 * 2 * 32 * KV_BYTES  # an upper bound: every layer at full context


def test_missing_hparams_say_so(capsys, tmp_path):
    p = tmp_path / "m.gguf"
    _llama_like(p, **{"block_count": (VT.UINT32, None)})
    j = run_json(capsys, p)
    assert j["memory"]["kv_bytes"] is None and "block_count" in j["memory"]["note"]


_HP_VALUES = st.one_of(
    st.tuples(st.just(VT.UINT32), st.integers(0, 2**32 - 1)),
    st.tuples(st.just(VT.INT32), st.integers(-2**31, 2**31 - 1)),
    st.tuples(st.just(VT.UINT64), st.integers(0, 2**64 - 1)),
    st.tuples(st.just(VT.FLOAT32), st.floats(width=32)),
    st.tuples(st.just(VT.STRING), st.text(max_size=5)),
    st.tuples(st.just(VT.BOOL), st.booleans()),
    st.tuples(st.just(VT.ARRAY), st.tuples(st.sampled_from([VT.INT32, VT.UINT8, VT.FLOAT32, VT.BOOL]),
                                           st.lists(st.integers(0, 100), max_size=6))),
    st.tuples(st.just(VT.UINT32), st.none()),
)
_HP_KEYS = ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "attention.key_length", "attention.value_length",
            "attention.sliding_window", "attention.sliding_window_pattern", "attention.key_length_swa",
            "rope.freq_base"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(arch=st.sampled_from(["llama", "gemma3", "gemma2", "x"]),
       hp=st.fixed_dictionaries({}, optional={k: _HP_VALUES for k in _HP_KEYS}))
def test_hypothesis_odd_hparams_never_crash(tmp_path_factory, arch, hp):
    p = tmp_path_factory.mktemp("hp") / "h.gguf"
    def fix(vt, v):  # array items of the drawn element type
        if vt != VT.ARRAY:
            return vt, v
        et, items = v
        conv = {VT.FLOAT32: float, VT.BOOL: lambda x: bool(x % 2)}.get(et, int)
        return vt, (et, [conv(x) for x in items])
    hp = {k: fix(*tv) for k, tv in hp.items()}
    _llama_like(p, arch=arch, **hp)
    with GGUFFile(p) as f:
        info = ins.analyze(f, n_ctx=None, available=1 << 30)
        ins.render(info)
        json.dumps(ins._jsonable(info), allow_nan=False)


def test_mutated_files_one_line_or_output(capsys, tmp_path):
    """inspect over mutated files: exit 0 with output, or exit 1 with one line on stderr."""
    from test_gguf_fuzz import make_bases, mutate

    bases = make_bases(with_real=False)
    p = tmp_path / "m.gguf"
    counts = {0: 0, 1: 0}
    for i in range(300):
        name, data, fields, he = bases[i % len(bases)]
        mutated, desc = mutate(random.Random(i), data, fields, he)
        p.write_bytes(mutated)
        rc = ins.main([str(p), "--json"] if i % 2 else [str(p)])
        out, err = capsys.readouterr()
        assert rc in (0, 1), (i, desc, rc)
        counts[rc] += 1
        if rc == 0:
            assert out and err == "", (i, desc, err)
            if i % 2:
                json.loads(out)
        else:
            assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (i, desc, err)
            assert "internal error" not in err, (i, desc, err)  # the reader's GGUFError, not a bug here
    assert counts[0] > 10 and counts[1] > 100, counts


def test_json_values_are_plain(capsys, smollm2_path):
    j = run_json(capsys, smollm2_path)

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        else:
            assert v is None or isinstance(v, (str, int, float, bool)), v
    walk(j)
    assert isinstance(np.float64(j["hparams"]["derived"]["rope_freq_base"]), float)

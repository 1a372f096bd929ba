"""A model split by layers over Ray actors (tinyinfer/models/split.py).

Without Ray: the layer plan, and shards built by ``load_model(g, layers=(lo, hi))`` chained in
one process give the full model's logits bit for bit. With Ray: a two-node cluster on this
machine (a second raylet, both on 127.0.0.1, one CPU each) and ``STRICT_SPREAD`` placement, so
the two shards run on different nodes and hidden states cross between raylets: first-step
logits within 1e-5 of one process (SmolLM2 F16, Qwen2.5-Coder Q4_K_M), the same greedy text
through ``Llama(split=2)``, the CLI's ``--split 2`` and the server's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import cache_lock, need_module

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The three primary colors are"
IDS = np.array([1, 504, 3458, 282, 4649, 314, 28, 253], np.int64)


@pytest.fixture(scope="module")
def smollm2_f16():
    from tinyinfer.tools.quantize import ensure_requantized
    with cache_lock():
        return ensure_requantized("F16")


def test_plan_layers_balances_bytes():
    from tinyinfer.models.split import plan_layers
    assert plan_layers([10] * 30, 1) == [(0, 30)]
    assert plan_layers([10] * 30, 2) == [(0, 15), (15, 30)]
    assert plan_layers([10] * 30, 3) == [(0, 10), (10, 20), (20, 30)]
    # the output projection weighs on the last range
    assert plan_layers([10] * 30, 2, head_bytes=100) == [(0, 20), (20, 30)]
    for n in range(1, 8):
        r = plan_layers([1, 5, 2, 9, 3, 3, 7], n)
        assert len(r) == n and r[0][0] == 0 and r[-1][1] == 7 and all(lo < hi for lo, hi in r)
        assert all(a[1] == b[0] for a, b in zip(r, r[1:]))
    with pytest.raises(ValueError, match="cannot split 7 layers into 8"):
        plan_layers([1] * 7, 8)


def test_shards_in_one_process_equal_the_model(smollm2_f16):
    from tinyinfer.gguf import GGUFFile
    from tinyinfer.models import ModelError, load_model
    g = GGUFFile(smollm2_f16)
    full = load_model(g)
    a, b = load_model(g, layers=(0, 11)), load_model(g, layers=(11, 30))
    assert a.output is None and b.output is not None
    assert all(L is None for L in a.layers[11:]) and all(L is None for L in b.layers[:11])
    ref = full.forward(IDS, 0, full.new_cache(64))
    ca, cb = a.new_cache(64, lo=0, hi=11), b.new_cache(64, lo=11, hi=30)
    assert len(ca.k) == 11 and len(cb.k) == 19
    x = a.forward_layers(a.embed(IDS), 0, ca, 0, 11)
    out = b.head(b.forward_layers(x, 0, cb, 11, 30))
    assert np.array_equal(out, ref)
    with pytest.raises(ModelError, match="layer range 20..40 is not inside the model's 0..30"):
        load_model(g, layers=(20, 40))


def _ray_processes() -> set:
    import psutil
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "raylet" in cmd or "gcs_server" in cmd or "ray/_private" in cmd or "dashboard/agent" in cmd:
            out.add(p.info["pid"])
    return out


def test_a_failed_split_run_leaves_no_ray_process(smollm2_f16, tmp_path):
    """The CLI starts a local Ray instance for --split; a run that fails (here: a KV cache type the
    split model refuses) says so in one line, and no Ray process outlives it."""
    need_module("ray")
    import time
    before = _ray_processes()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "tinyinfer", "-m", str(smollm2_f16), "-p", "Hi", "-n", "2", "-c", "64",
                        "--split", "2", "-ctk", "q8_0", "--prompt-cache", str(tmp_path / "c.bin")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env={**env, "NUMBA_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert lines == ["error: --split runs f16 KV caches of one sequence: no -ctk/-ctv or --parallel with it"], \
        r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for _ in range(20):            # Ray's processes stop within moments of the driver's shutdown
        left = _ray_processes() - before
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"Ray processes left behind: {sorted(left)}"


# --- two Ray nodes on loopback -----------------------------------------------------------------

@pytest.fixture(scope="module")
def two_nodes():
    need_module("ray")
    from tinyinfer.distributed import ensure_ray, use_loopback
    use_loopback()
    import ray
    from ray.cluster_utils import Cluster
    assert not ray.is_initialized()
    node = dict(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=80 << 20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    cluster.add_node(**node)                 # the second raylet: a second board stands in here
    cluster.wait_for_nodes()
    ensure_ray(cluster.address)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    old = os.environ.get("TINYINFER_SPLIT_PLACEMENT")
    os.environ["TINYINFER_SPLIT_PLACEMENT"] = "STRICT_SPREAD"
    yield cluster
    if old is None:
        os.environ.pop("TINYINFER_SPLIT_PLACEMENT", None)
    ray.shutdown()
    cluster.shutdown()


def _first_step_diff(path) -> tuple:
    from tinyinfer.models.split import SplitModel
    from tinyinfer.gguf import GGUFFile
    from tinyinfer.models import load_model
    g = GGUFFile(path)
    full = load_model(g)
    ids = IDS[: 6]
    c = full.new_cache(64)
    ref = [full.forward(ids, 0, c), full.forward(IDS[6:7], 6, c)]
    sm = SplitModel(g, 2)
    try:
        nodes = {i["node"] for i in sm.shard_info}
        sc = sm.new_cache(64)
        out = [sm.forward(ids, 0, sc), sm.forward(IDS[6:7], 6, sc)]
        moved = sm.bytes_moved
        diff = max(float(np.abs(o - r).max()) for o, r in zip(out, ref))
        return diff, nodes, sm.ranges, moved, full.n_embd, full.n_vocab
    finally:
        sm.close()


def test_two_nodes_same_logits_smollm2_f16(two_nodes, smollm2_f16):
    diff, nodes, ranges, moved, n_embd, n_vocab = _first_step_diff(smollm2_f16)
    assert len(nodes) == 2, "both shards landed on one node"
    assert ranges[0][0] == 0 and ranges[-1][1] == 30 and len(ranges) == 2
    assert diff <= 1e-5
    # ids in, one boundary of hidden states, logits out: 6-token prompt then one token
    assert moved == 7 * 8 + 7 * n_embd * 4 + 2 * n_vocab * 4


def test_two_nodes_same_logits_qwen25(two_nodes, qwen25_path):
    diff, nodes, ranges, *_ = _first_step_diff(qwen25_path)
    assert len(nodes) == 2 and diff <= 1e-5


def test_llama_cli_and_server_split(two_nodes, smollm2_f16, tmp_path):
    import ray
    from tinyinfer import Llama
    greedy = dict(max_tokens=12, temperature=0, repeat_penalty=1.0)
    one = Llama(str(smollm2_f16), n_ctx=128, verbose=False)
    want = one.create_completion(PROMPT, **greedy)["choices"][0]["text"]
    del one
    two = Llama(str(smollm2_f16), n_ctx=128, verbose=False, split=2)
    model = two._engine.model
    assert len({i["node"] for i in model.shard_info}) == 2
    assert two.create_completion(PROMPT, **greedy)["choices"][0]["text"] == want
    model.close()
    del two
    # the CLI joins the same cluster through RAY_ADDRESS
    env = dict(os.environ, RAY_ADDRESS=two_nodes.address, NUMBA_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tinyinfer", "-m", str(smollm2_f16), "-p", PROMPT, "-n", "12", "--temp", "0",
           "-c", "128", "--no-display-prompt"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    split = subprocess.run(cmd + ["--split", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert plain.returncode == 0 and split.returncode == 0, split.stderr[-3000:]
    assert split.stdout == plain.stdout and want.strip() in plain.stdout
    # the server: --split 2 on the same cluster, the same greedy answer over HTTP
    from test_server import _start_server, _stop
    os.environ["RAY_ADDRESS"] = two_nodes.address
    try:
        srv = _start_server(smollm2_f16, tmp_path, "--split", "2", "-t", "1")
    finally:
        os.environ.pop("RAY_ADDRESS", None)
    try:
        r = srv.post("/v1/completions", {"prompt": PROMPT, **greedy})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    finally:
        _stop(srv.proc)
    assert ray.cluster_resources().get("CPU") == 2


def test_split_saved_state_and_context_shift(two_nodes, smollm2_f16, tmp_path):
    """The model interface in full over Ray: a state saved split loads unsplit and back (the same
    bytes), a context shift gives the tokens of the single-process engine, and the CLI's
    --prompt-cache with --split 2 reuses its file."""
    from tinyinfer.engine import Engine
    from tinyinfer.options import GenOptions
    from tinyinfer.sampler import SamplerParams
    greedy = GenOptions(SamplerParams(temperature=0), max_tokens=40, ignore_eos=True)
    shift = GenOptions(context_shift=True, n_keep=-1)
    one = Engine(smollm2_f16, n_ctx=32, n_threads=1, defaults=shift)
    two = Engine(smollm2_f16, n_ctx=32, n_threads=1, split=2, defaults=shift)
    try:
        ids = [int(t) for t in IDS]
        want = [s.token for s in one.generate(ids, greedy)]        # 8 + 40 tokens in 32: shifts
        got = [s.token for s in two.generate(ids, greedy)]
        assert len(want) == 40 and got == want
        two.reset()
        two.ingest_prompt(ids)
        blob = two.save_state()
        one.reset()
        one.ingest_prompt(ids)
        assert blob == one.save_state()            # the same bytes, split or not
        one.load_state(blob)
        two.load_state(one.save_state())
        assert two.tokens == ids and np.allclose(two.eval([42]), one.eval([42]), atol=1e-4)
    finally:
        two.close()
    env = dict(os.environ, RAY_ADDRESS=two_nodes.address, NUMBA_NUM_THREADS="1")
    cache = tmp_path / "c.bin"
    cmd = [sys.executable, "-m", "tinyinfer", "-m", str(smollm2_f16), "-p", PROMPT, "-n", "4", "--temp", "0",
           "-c", "128", "--split", "2", "--prompt-cache", str(cache), "--no-perf"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert first.returncode == 0 and cache.exists(), first.stderr[-3000:]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr[-3000:]
    assert "cached tokens" in again.stderr and " 0 reused" not in again.stderr

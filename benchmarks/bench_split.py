"""A model split over two Ray nodes against one process: tok/s, bytes moved per token, logits.

    python benchmarks/bench_split.py [-m MODEL] [--split 2] [-p 16] [-n 64] [-r 3] [--json OUT]

Starts a two-node Ray cluster on this machine (head + a second raylet, both on 127.0.0.1, one CPU
each: a second board stands in for the second raylet) and places one shard per node
(``STRICT_SPREAD``). For one process and for the split model, with one thread per process:
prompt processing of P tokens and generation of N tokens one at a time (llama-bench's pp/tg, greedy
decode steps through the same ``Engine.eval``), repeated R times; the best and the spread are
reported, and the CPU time per generated token of every process involved (this one, the shards,
the raylets, GCS and Ray's agents), which the machine's other load does not inflate. Bytes moved per generated token are counted by the split model (hidden states between
shards, ids in, logits out). The first-step logits of both are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_seconds(pids) -> float:
    """User + system CPU time of these processes so far (a figure the other load does not inflate)."""
    import psutil
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(eng, n_prompt: int, n_gen: int, reps: int, pids=()) -> dict:
    pids = [os.getpid(), *pids]
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 1000, n_prompt).tolist()
    pp, tg, cpu = [], [], []
    for _ in range(reps):
        eng.reset()
        t0 = time.perf_counter()
        logits = eng.eval(prompt)
        pp.append(n_prompt / (time.perf_counter() - t0))
        tok = int(np.argmax(logits))
        moved0 = getattr(eng.model, "bytes_moved", 0)
        c0 = cpu_seconds(pids)
        t0 = time.perf_counter()
        for _ in range(n_gen):
            tok = int(np.argmax(eng.eval([tok])))
        tg.append(n_gen / (time.perf_counter() - t0))
        cpu.append(1000 * (cpu_seconds(pids) - c0) / n_gen)
        moved = (getattr(eng.model, "bytes_moved", 0) - moved0) / n_gen
    return {"pp_tok_s": max(pp), "pp_all": pp, "tg_tok_s": max(tg), "tg_all": tg, "bytes_per_token": moved,
            "tg_cpu_ms_per_token": min(cpu), "tg_cpu_all": cpu}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="default: SmolLM2-135M F16 (requantized once)")
    ap.add_argument("--split", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=16)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    os.environ["NUMBA_NUM_THREADS"] = "1"
    from tinyinfer.distributed import ensure_ray, use_loopback
    use_loopback()
    import ray
    from ray.cluster_utils import Cluster
    from tinyinfer.engine import Engine
    if a.model is None:
        from tinyinfer.tools.quantize import ensure_requantized
        a.model = str(ensure_requantized("F16"))
    out = {"model": os.path.basename(a.model), "split": a.split, "n_prompt": a.n_prompt, "n_gen": a.n_gen}

    one = Engine(a.model, n_ctx=512, n_threads=1)
    out["one_process"] = measure(one, a.n_prompt, a.n_gen, a.reps)
    ids = [1, 504, 3458, 282, 4649, 314]
    one.reset()
    ref = one.eval(ids).copy()
    del one

    node = dict(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=80 << 20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    for _ in range(a.split - 1):
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    os.environ["TINYINFER_SPLIT_PLACEMENT"] = "STRICT_SPREAD"
    try:
        ensure_ray(cluster.address)
        split = Engine(a.model, n_ctx=512, n_threads=1, split=a.split)
        m = split.model
        out["ranges"] = m.ranges
        out["nodes"] = len({i["node"] for i in m.shard_info})
        out["shard_rss_mib"] = [i["rss"] >> 20 for i in m.shard_info]
        out["shard_block_mib"] = [i["block_bytes"] / 2**20 for i in m.shard_info]
        # every process the split model runs on: the shards, and each node's raylet, GCS and agents
        ray_pids = [p.pid for nd in [cluster.head_node, *cluster.worker_nodes] for _, p in nd.live_processes()]
        out["split"] = measure(split, a.n_prompt, a.n_gen, a.reps, [i["pid"] for i in m.shard_info] + ray_pids)
        split.reset()
        out["first_step_max_abs_diff"] = float(np.abs(split.eval(ids) - ref).max())
        m.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

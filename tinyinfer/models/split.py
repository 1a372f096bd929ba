"""One model split by layer ranges over Ray actors (a pipeline of hidden states).

    python -m tinyinfer -m MODEL.gguf --split 2 -p "..."          # CLI
    Llama("MODEL.gguf", split=2)                                   # library
    python -m tinyinfer serve -m MODEL.gguf --split 2              # server
    RAY_ADDRESS=127.0.0.1:6379 ... --split 2                       # on a running Ray cluster (one board per node)

::

    ids ──▶ Shard 0: embed, blocks 0..a-1 ──x──▶ Shard 1: blocks a..b-1 ──x──▶ ... ──▶ Shard N-1: blocks ..L-1, head ──▶ logits
                                      (x = hidden states, n × n_embd float32, passed as Ray objects
                                       from actor to actor; only the logits come back to the caller)

Each shard is a Ray actor that opens the GGUF file itself and builds only its blocks
(``load_model(g, layers=(lo, hi))``: the architecture's own loading and forward code, nothing
copied); its KV caches hold only its layers. Layer ranges balance the weight bytes (the last shard
also carries the output projection). The actors are placed by a Ray placement group, one
bundle of ``n_threads`` CPUs each, ``SPREAD`` over the cluster's nodes by default
($TINYINFER_SPLIT_PLACEMENT=STRICT_SPREAD: one node each).

:class:`SplitModel` implements the model interface (tinyinfer/models/interface.py: ``forward``,
``new_cache``, the cache's shift / save / load / fingerprint), so :class:`tinyinfer.engine.Engine` (``split=N``) and everything above it
(generation loop, sampler, CLI, ``Llama``, server) run unchanged. Bytes moved per evaluation are
counted (``bytes_moved``): the hidden states between shards plus the ids in and logits out.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Optional

import numpy as np

from ..distributed import ensure_ray

def layer_bytes(g) -> list:
    """Weight bytes of each block of an opened GGUF file."""
    out = [0] * int(g.metadata[f"{g.architecture}.block_count"])
    for name, t in g.tensors.items():
        m = re.match(r"blk\.(\d+)\.", name)
        if m:
            out[int(m.group(1))] += t.nbytes
    return out


def plan_layers(block_bytes: list, n: int, head_bytes: int = 0) -> list:
    """Cut blocks 0..L-1 into ``n`` contiguous ranges of about equal weight bytes, the output
    projection (``head_bytes``) counted with the last range. [(lo, hi), ...]"""
    L = len(block_bytes)
    if not 1 <= n <= L:
        raise ValueError(f"cannot split {L} layers into {n} parts (1..{L})")
    cost = list(block_bytes)
    cost[-1] += head_bytes
    total = float(sum(cost))
    cuts, acc = [0], 0.0
    for il, c in enumerate(cost):
        acc += c
        k = len(cuts)                              # the next cut to place
        remaining_layers = L - (il + 1)
        remaining_parts = n - k
        if k < n and (acc >= total * k / n or remaining_layers == remaining_parts) and remaining_layers >= remaining_parts:
            cuts.append(il + 1)
    cuts = cuts[:n] + [L]
    return list(zip(cuts[:-1], cuts[1:]))


class Shard:
    """Blocks lo..hi-1 of one model (a Ray actor). Shard 0 embeds the ids, the last one applies the head."""

    def __init__(self, model_path: str, lo: int, hi: int, n_threads: int = 1):
        from ..gguf import GGUFFile
        from ..threads import set_threads
        from . import load_model
        set_threads(n_threads)
        self.g = GGUFFile(model_path)
        self.model = load_model(self.g, layers=(lo, hi))
        self.lo, self.hi = lo, hi
        self.first, self.last = lo == 0, hi == self.model.n_layer
        self.caches = {}

    def info(self) -> dict:
        import psutil
        import ray
        weights = sum(t.nbytes for n, t in self.g.tensors.items()
                      if n.startswith("blk.") and self.lo <= int(n.split(".")[1]) < self.hi)
        return {"lo": self.lo, "hi": self.hi, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "rss": psutil.Process().memory_info().rss, "block_bytes": weights}

    def new_cache(self, cid: int, n_ctx: int, n_batch: int) -> None:
        self.caches[cid] = self.model.new_cache(n_ctx, n_batch, self.lo, self.hi)

    def free_cache(self, cid: int) -> None:
        self.caches.pop(cid, None)

    def cache_call(self, cid: int, op: str, *args):
        """The model's cache operation ``op`` (cache_shift, cache_fingerprint, ...) on cache ``cid``."""
        return getattr(self.model, op)(self.caches[cid], *args)

    def cache_parts(self, cid: int, n: int) -> tuple:
        """This shard's K and V cells 0..n-1 (sequence 0), and their sizes."""
        return self.caches[cid].save(0, n)

    def cache_load(self, cid: int, n: int, data: bytes) -> None:
        self.caches[cid].load(0, n, data)

    def forward(self, x: np.ndarray, pos0: int, cid: int, n_out: int, embeddings: bool) -> np.ndarray:
        x = self.model.embed(x) if self.first else np.array(x, dtype=np.float32)   # Ray's arrays are read-only
        x = self.model.forward_layers(x, pos0, self.caches[cid], self.lo, self.hi)
        return self.model.head(x, n_out, embeddings) if self.last else x


class SplitCache:
    """The caller's handle on one KV cache, its layers spread over the shards."""

    def __init__(self, owner: "SplitModel", cid: int, n_ctx: int):
        self.owner, self.cid, self.n_ctx = owner, cid, n_ctx

    def __del__(self):
        try:
            for s in self.owner.shards:
                s.free_cache.remote(self.cid)
        except Exception:
            pass


class SplitModel:
    """A model split over ``n`` Ray actors, with the interface :class:`~tinyinfer.engine.Engine` uses."""

    def __init__(self, g, n: int, n_threads: int = 1, strategy: Optional[str] = None, address: Optional[str] = None):
        strategy = strategy or os.environ.get("TINYINFER_SPLIT_PLACEMENT", "SPREAD")
        if strategy not in ("SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK"):
            raise ValueError(f"placement {strategy!r}: expected SPREAD, STRICT_SPREAD, PACK or STRICT_PACK")
        ray = ensure_ray(address)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        arch = g.architecture
        self.n_layer = int(g.metadata[f"{arch}.block_count"])
        out = g.tensors.get("output.weight") or g.tensors["token_embd.weight"]
        self.ranges = plan_layers(layer_bytes(g), n, head_bytes=out.nbytes)
        self.pg = placement_group([{"CPU": n_threads}] * n, strategy=strategy)     # a shard: its threads
        try:
            ray.get(self.pg.ready(), timeout=120)
        except Exception:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(f"Ray could not place {n} shards ({strategy}, {n_threads} CPU each) on its nodes: "
                               f"{ray.cluster_resources().get('CPU', 0):g} CPUs on "
                               f"{len([x for x in ray.nodes() if x['Alive']])} node(s)") from None
        actor = ray.remote(num_cpus=n_threads)(Shard)
        self.shards = [actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=i)).remote(str(g.path), lo, hi, n_threads)
            for i, (lo, hi) in enumerate(self.ranges)]
        self.shard_info = ray.get([s.info.remote() for s in self.shards])
        self.n_embd = int(g.metadata[f"{arch}.embedding_length"])
        self.n_vocab = out.n_elements // out.shape[0]
        self.n_ctx_train = int(g.metadata.get(f"{arch}.context_length", 2048))
        self._ids = itertools.count()
        self.bytes_moved = 0
        self.n_evals = 0
        self.n_tokens = 0

    def new_cache(self, n_ctx: int, n_batch: int = 512, n_seq: int = 1, type_k: str = "f16",
                  type_v: str = "f16") -> SplitCache:
        import ray
        if n_seq != 1 or (type_k, type_v) != ("f16", "f16"):
            raise ValueError("--split runs f16 KV caches of one sequence: no -ctk/-ctv or --parallel with it")
        cid = next(self._ids)
        ray.get([s.new_cache.remote(cid, n_ctx, n_batch) for s in self.shards])
        return SplitCache(self, cid, n_ctx)

    def forward(self, ids: np.ndarray, pos0: int, cache: SplitCache, n_out: int = 1,
                embeddings: bool = False) -> np.ndarray:
        import ray
        x = np.asarray(ids, dtype=np.int64)
        ref = x
        for s in self.shards:
            ref = s.forward.remote(ref, pos0, cache.cid, n_out, embeddings)
        out = ray.get(ref)
        n = x.size
        self.bytes_moved += x.nbytes + (len(self.shards) - 1) * n * self.n_embd * 4 + out.nbytes
        self.n_evals += 1
        self.n_tokens += n
        return out

    # -- the cache operations of the model interface: each shard does its layers ----------------
    def _each(self, cache: SplitCache, op: str, *args) -> list:
        import ray
        return ray.get([s.cache_call.remote(cache.cid, op, *args) for s in self.shards])

    def cache_shift(self, cache: SplitCache, seq: int, n_keep: int, n_discard: int, n_past: int) -> None:
        self._each(cache, "cache_shift", seq, n_keep, n_discard, n_past)

    def cache_save(self, cache: SplitCache, seq: int, n: int) -> bytes:
        """The bytes the single-process model writes: K of every layer, then V (a state saved split
        loads unsplit and back)."""
        import ray
        parts = ray.get([s.cache_parts.remote(cache.cid, n) for s in self.shards])
        return b"".join(k for k, _ in parts) + b"".join(v for _, v in parts)

    def cache_load(self, cache: SplitCache, seq: int, n: int, data: bytes) -> None:
        import ray
        sizes = ray.get([s.cache_call.remote(cache.cid, "cache_state_sizes", n) for s in self.shards])
        total = sum(k + v for k, v in sizes)
        if len(data) != total:
            raise ValueError(f"{len(data)} bytes of KV cells, expected {total} for {n} tokens")
        ks, off = [], 0
        for k, _ in sizes:
            ks.append(data[off:off + k])
            off += k
        refs = []
        for s, (k, v), kb in zip(self.shards, sizes, ks):
            refs.append(s.cache_load.remote(cache.cid, n, kb + data[off:off + v]))
            off += v
        ray.get(refs)

    def cache_copy(self, cache: SplitCache, src: int, dst: int, n: int) -> None:
        if src != dst:
            raise ValueError("a split model's cache holds one sequence")

    def cache_fingerprint(self, cache: SplitCache) -> dict:
        fps = self._each(cache, "cache_fingerprint")
        return {**fps[0], "n_layer": sum(f["n_layer"] for f in fps)}

    def close(self) -> None:
        """Stop the shards and free their placement (also when the model is garbage collected)."""
        import ray
        if not getattr(self, "shards", None) or not ray.is_initialized():
            return
        for s in self.shards:
            ray.kill(s)
        ray.util.remove_placement_group(self.pg)
        self.shards = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

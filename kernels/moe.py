"""A prompt batch's experts in one jitted call (llama.cpp's ``mul_mat_id`` for a whole MoE block).

    for each expert e that tokens chose (its rows of the batch, in order):
        for each chunk of at most ``chunk`` of those rows:
            xe = x[tokens of the chunk]                       # gathered rows
            a = silu(gate_e xe) * up_e xe                     # gate|up stacked: one GEMM, or two
            ys[(token, slot) of each row] = w_(token,slot) * down_e a

Each expert's weights are one slice of a stacked array of all the layer's experts, in the layout the
matmul kernels' drivers take (:mod:`.matmul`: x16 row-interleaved groups, aarch64 4-row groups, or the
file's own blocks); the drivers themselves are the matmul ones, called from here, so the per-expert
Python of a grouped batch (gather, two or three kernel calls, activation, scatter: ~100 calls a layer)
becomes one call. With several threads the experts are shared out by rows (longest first to the least
loaded thread), each expert on one thread: small GEMMs do not pay a parallel launch each.

The block and its adapters are closures over the matmul drivers, built once per (types, layouts, kernel
config) and cached on disk by numba under a key of their own (:class:`_KeyedCache`). :func:`route` is the
router's softmax and top-k for every token of a batch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numba as nb
import numpy as np
from numba import prange

from . import matmul as mm
from .ops import expf

_DRIVERS: dict = {}
_STAMP = None

try:
    from numba.core.caching import FunctionCache
except ImportError:          # pragma: no cover - numba internals moved: the functions compile, uncached
    FunctionCache = None


def layout(pw: mm.PreparedWeight) -> tuple:
    """(kind, arrays) of a prepared weight: what its matmul driver takes before (x, out)."""
    if pw.arm is not None:
        return "arm", (pw.arm,)
    if pw.packed is not None:
        return True, (pw.packed, pw.tail)
    return False, (pw.w,)


def _stamp() -> str:
    """A hash of the kernels' sources: part of each cached function's name and key, so that numba's
    on-disk cache (which does not follow the functions a cached one calls) never serves a block built
    over an older matmul driver."""
    global _STAMP
    if _STAMP is None:
        h = hashlib.sha1()
        for p in sorted(Path(__file__).parent.glob("*.py")):
            h.update(p.read_bytes())
        _STAMP = h.hexdigest()[:10]
    return _STAMP


if FunctionCache is not None:
    class _KeyedCache(FunctionCache):
        """numba's on-disk cache of one function, its index keyed by a name of ours rather than by the
        pickled closure cells. The functions here close over the matmul drivers (numba dispatchers), and
        a dispatcher pickles with a uuid drawn afresh in every process: under numba's own key a closure
        over one would be compiled again at every start and never loaded. The name says what the
        closure holds (the drivers' types and layouts, the kernel config, the kernels' sources)."""

        def __init__(self, py_func, key: str):
            super().__init__(py_func)
            self._key = key

        def _index_key(self, sig, codegen):
            return (sig, codegen.magic_tuple(), (hashlib.sha256(self._py_func.__code__.co_code).hexdigest(),
                                                 self._key))


def _njit(fn, name: str, parallel: bool = False):
    """``fn`` (a closure over matmul drivers) jitted under ``name``: its own file in numba's cache, loaded,
    not compiled, by the next process that builds the same closure (:class:`_KeyedCache`)."""
    fn.__name__ = fn.__qualname__ = name
    d = nb.njit(parallel=parallel, nogil=True, fastmath=False)(fn)
    if FunctionCache is not None:
        d._cache = _KeyedCache(fn, name)       # what ``cache=True`` sets (Dispatcher.enable_caching), keyed
    return d


@nb.njit(cache=True, nogil=True, fastmath=False)
def route(logits, k, norm_w, min_sum, chosen, w):
    """Each row's softmax over the experts, its k most probable (falling probability, the lower index
    first on a tie: a stable argsort) into ``chosen`` (n, k) int64 and their probabilities into ``w``
    (n, k) float32, renormalised to sum 1 (the sum clamped below at ``min_sum``) with ``norm_w``."""
    n, n_exp = logits.shape
    p = np.empty(n_exp, np.float32)
    for t in range(n):
        mx = logits[t, 0]
        for e in range(1, n_exp):
            mx = max(mx, logits[t, e])
        s = np.float32(0.0)
        for e in range(n_exp):
            p[e] = np.exp(logits[t, e] - mx)
            s += p[e]
        for e in range(n_exp):
            p[e] /= s
        total = np.float32(0.0)
        for j in range(k):
            best = -1
            for e in range(n_exp):
                if p[e] >= 0 and (best < 0 or p[e] > p[best]):
                    best = e
            chosen[t, j] = best
            w[t, j] = p[best]
            total += p[best]
            p[best] = -1.0          # taken
        if norm_w:
            total = max(total, min_sum)
            for j in range(k):
                w[t, j] /= total


def _kind_name(kind) -> str:
    return {True: "x16", False: "native", "arm": "arm"}[kind]


def _adapter(info, kind, cfg, tag):
    """fn(a, b, x, out) over the matmul driver of ``kind``: the x16 layouts take their groups and tail
    rows (a, b); the others one array (b unused)."""
    fn = mm.driver(info, kind, False, cfg)
    if kind is True:
        def call(a, b, x, out):
            fn(a, b, x, out)
    else:
        def call(a, b, x, out):
            fn(a, x, out)
    return _njit(call, f"moe_call_{info.name}_{_kind_name(kind)}_{tag}")


def _block(g_call, u_call, d_call, fused: bool, name: str):
    """The jitted block over these gate (gate|up when ``fused``), up and down adapters."""

    def block(x, route, experts, wflat, ys):
        order, k, groups, starts, plan, plan_starts, chunk, f = route
        ga, gb, ua, ub, da, db = experts
        d = x.shape[1]
        nthr = plan_starts.shape[0] - 1
        for t in prange(nthr):
            for i in range(plan_starts[t], plan_starts[t + 1]):
                gi = plan[i]
                e = groups[gi]
                for c0 in range(starts[gi], starts[gi + 1], chunk):
                    m = min(chunk, starts[gi + 1] - c0)
                    xe = np.empty((m, d), np.float32)
                    for r in range(m):
                        xe[r] = x[order[c0 + r] // k]
                    a = np.empty((m, f), np.float32)
                    if fused:
                        gu = np.empty((m, 2 * f), np.float32)
                        g_call(ga[e], gb[e], xe, gu)
                        for r in range(m):
                            for j in range(f):
                                v = gu[r, j]
                                a[r, j] = v / (np.float32(1.0) + expf(-v)) * gu[r, f + j]
                    else:
                        g = np.empty((m, f), np.float32)
                        u = np.empty((m, f), np.float32)
                        g_call(ga[e], gb[e], xe, g)
                        u_call(ua[e], ub[e], xe, u)
                        for r in range(m):
                            for j in range(f):
                                v = g[r, j]
                                a[r, j] = v / (np.float32(1.0) + expf(-v)) * u[r, j]
                    y = np.empty((m, ys.shape[1]), np.float32)
                    d_call(da[e], db[e], a, y)
                    for r in range(m):
                        p = order[c0 + r]
                        ys[p] = y[r] * wflat[p]

    return _njit(block, name, parallel=True)


def driver(gu_key: tuple, up_key: tuple | None, dn_key: tuple, cfg):
    """The jitted block for these (type info, layout kind) pairs: gate|up stacked in one matrix when
    ``up_key`` is None, else gate and up apart. Its arguments: x (n, d); ``route`` = (order, the flat
    (token, slot) indices sorted by expert; k slots a token; the groups' experts and their starts in
    order; plan / plan_starts, the groups each thread runs; the rows per GEMM call; the experts' width f);
    ``experts`` = the stacked gate|up (or gate), up, down arrays, two each (the x16 layouts' groups and
    tail rows); the (token, slot) weights; ys (n * k, d), each (token, slot)'s weighted output."""
    key = (gu_key[0].name, gu_key[1], up_key and (up_key[0].name, up_key[1]), dn_key[0].name, dn_key[1], cfg)
    d = _DRIVERS.get(key)
    if d is not None:
        return d
    tag = hashlib.sha1((repr(cfg) + _stamp()).encode()).hexdigest()[:10]
    g_call = _adapter(*gu_key, cfg, tag)
    u_call = _adapter(*up_key, cfg, tag) if up_key is not None else g_call
    d_call = _adapter(*dn_key, cfg, tag)
    parts = [f"{gu_key[0].name}_{_kind_name(gu_key[1])}"]
    parts.append("fused" if up_key is None else f"{up_key[0].name}_{_kind_name(up_key[1])}")
    parts.append(f"{dn_key[0].name}_{_kind_name(dn_key[1])}")
    d = _DRIVERS[key] = _block(g_call, u_call, d_call, up_key is None, "moe_block_" + "_".join(parts) + "_" + tag)
    return d


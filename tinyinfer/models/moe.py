"""The mixture-of-experts feed-forward block any architecture can use (llama.cpp's ``build_moe_ffn``).

    probs = softmax(W_router x)                       # (n_expert,) per token, float32
    chosen = top_k(probs, n_expert_used)              # the experts this token runs
    w = probs[chosen]; if norm_w: w = w / sum(w)      # qwen3moe, granitemoe renormalise; olmoe, qwen2moe do not
    y = sum over e in chosen of w_e · down_e(silu(gate_e x) * up_e x)
    [+ shared(x) · g]                                 # a shared expert (qwen2moe: g = sigmoid(w_shexp_gate · x))

The experts live in three 3-D tensors ``ffn_{gate,up,down}_exps`` (ggml shape {k, rows, n_expert}): expert
e is rows e·rows .. (e+1)·rows of the file's 2-D (n_expert·rows, row_bytes) view, a zero-copy slice of the
mmap. :class:`Experts` wraps each expert's slice for the matmul kernels on its first use: loading reads none
of the experts' bytes; a decode step reads only the chosen experts' rows, in the file's own block layout, so
the page cache (not the process) holds what was read and a file larger than RAM runs with the hot experts
resident. A prompt batch is grouped by expert (llama.cpp's ``mul_mat_id`` idea): each chosen expert runs
once on the rows of all tokens that chose it, so its weights are read once per batch. Both run in one jitted
call per layer (:mod:`..kernels.moe`): a decode step on views of the file (the GEMV kernels), a batch of at
least n_expert / n_expert_used tokens on a copy of the layer's experts stacked in the GEMM kernels' layout
(gate and up as one matrix), made on the first such batch while all copies stay within ``PACK_BUDGET``;
past it, and for smaller batches, a Python loop over the experts with per-expert copies (:class:`Experts`).
Once a layer is stacked, every batch and decode step of it runs on the copy (gate|up in one GEMV: faster
than the file's layout) and the file's pages of its experts are released: one copy stays resident, not two.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from ..gguf import GGUFFile, TensorInfo
from ..kernels import matmul as mm
from ..kernels import moe as kmoe
from ..kernels import parallel as _par
from ..kernels import ops
from ..kernels import quants
from .hparams import ModelError, Weights, meta

# the clamp llama.cpp puts on the sum of the chosen weights before renormalising (the smallest normal F16)
_MIN_WEIGHT_SUM = np.float32(6.103515625e-5)


@dataclass(frozen=True)
class ExpertParams:
    """The MoE keys of ``<arch>.*``: expert_count, expert_used_count, the expert and shared-expert widths."""
    n_expert: int
    n_expert_used: int
    n_ff_exp: int            # rows of each expert's gate / up
    n_ff_shexp: int = 0      # the shared expert's width (0: none or the architecture's default)

    @classmethod
    def from_gguf(cls, g: GGUFFile, arch: str, n_ff: int, expert_width_key: bool = True) -> "ExpertParams":
        """``expert_width_key``: the experts' width is ``expert_feed_forward_length`` (n_ff / n_expert_used
        when absent, as llama.cpp reads qwen2moe / qwen3moe); otherwise it is ``n_ff`` (olmoe, granitemoe)."""
        n_expert = int(meta(g, arch, "expert_count"))
        n_used = int(meta(g, arch, "expert_used_count"))
        if n_expert <= 0 or not 0 < n_used <= n_expert:
            raise ModelError(f"{g.path}: {arch}.expert_used_count ({n_used}) must be in 1..{arch}.expert_count "
                             f"({n_expert}), and expert_count positive")
        n_ff_exp = (int(meta(g, arch, "expert_feed_forward_length", 0)) or n_ff // n_used) if expert_width_key else n_ff
        if n_ff_exp <= 0:
            raise ModelError(f"{g.path}: {arch}.expert_feed_forward_length must be positive")
        return cls(n_expert, n_used, n_ff_exp, int(meta(g, arch, "expert_shared_feed_forward_length", 0)))


class Experts:
    """One 3-D expert tensor (n_expert matrices of ``rows`` x ``k``) kept in the file.

    ``self[e]``: expert e's weight for single-token steps, prepared on first use from its slice of the
    mapping in the file's own layout (zero-copy; the GEMV kernels read it at memory speed).
    :meth:`batched`: the same expert for a group of several tokens, prepared on its first such use with the
    matmul's default layout (for most types a row-interleaved copy: the GEMM kernels need it to be fast on a
    prompt). Only experts that a prompt batch routed tokens to get that copy, and all copies together stay
    within ``PACK_BUDGET`` (TINYINFER_MOE_PACK_MIB, 1024 by default); past it, or with ``REPACK = False``
    (TINYINFER_MOE_REPACK=0), an expert runs a batch's tokens one by one on the file's layout instead.
    """

    def __init__(self, t: TensorInfo, n_expert: int):
        quants.type_info(t.ggml_type)
        self.t, self.name = t, t.name
        self.k, self.rows, self.n_expert = t.shape[0], t.shape[1], n_expert
        self.ggml_type = t.ggml_type
        self.nbytes_expert = t.nbytes // n_expert
        if t.data.shape[0] != n_expert * self.rows:
            raise ModelError(f"tensor {t.name!r}: {t.data.shape[0]} rows, expected {n_expert} experts x {self.rows}")
        self._w = [None] * n_expert
        self._b = [None] * n_expert
        self.config = mm.current_config()     # the kernel config the model loads with, for the lazy prepares

    def _slice(self, e: int) -> np.ndarray:
        return self.t.data[e * self.rows:(e + 1) * self.rows]

    def __getitem__(self, e: int) -> mm.PreparedWeight:
        pw = self._w[e]
        if pw is None:
            pw = self._w[e] = mm.prepare(self._slice(e), self.ggml_type, self.k, repack=False,
                                                config=self.config)
        return pw

    def batched(self, e: int) -> mm.PreparedWeight | None:
        """Expert e in the GEMM layout, made on first use while the process's packed copies stay within
        PACK_BUDGET bytes; None past it (the caller then runs the rows one by one on ``self[e]``)."""
        global _packed_bytes
        pw = self._b[e]
        if pw is None:
            if _packed_bytes + self.nbytes_expert > PACK_BUDGET:
                return None
            pw = self._b[e] = mm.prepare(self._slice(e), self.ggml_type, self.k, config=self.config)
            if pw.packed is not None or pw.arm is not None:
                _packed_bytes += self.nbytes_expert
        return pw

    @property
    def n_prepared(self) -> int:
        return sum(w is not None for w in self._w)

    @property
    def n_batched(self) -> int:
        return sum(w is not None for w in self._b)


REPACK = os.environ.get("TINYINFER_MOE_REPACK", "1") != "0"
# the most bytes of packed expert copies a process makes (anonymous memory, on top of the mapped file):
# a 13 GB Qwen3-30B-A3B on a 16 GB board must not end up holding a second copy of its experts
PACK_BUDGET = int(float(os.environ.get("TINYINFER_MOE_PACK_MIB", "1024")) * (1 << 20))
_packed_bytes = 0
_STACK_LOCK = threading.Lock()
# the most rows one expert's GEMM call takes: measured on the x86 test machine, the packed Q4_K GEMM took
# ~10 us a row up to 8 rows and 40-70 us a row from 12 on (benchmarks/bench_moe.py --gemm-rows); the
# kernels' redesign may lift it
GEMM_ROWS = int(os.environ.get("TINYINFER_MOE_GEMM_ROWS", "8"))
# the fewest rows of a group for which the per-expert path makes an expert's GEMM-layout copy (fewer run
# row by row on the file's layout): x86, Dec 2026, one expert's Q4_K gate: 21 us a row as GEMV, 12 us a
# row packed at 2 rows, 6.6 at 4 (benchmarks/bench_moe.py --gemm-rows)
PACK_MIN_ROWS = int(os.environ.get("TINYINFER_MOE_PACK_MIN_ROWS", "4"))
# a decode step's experts in one jitted call (kernels/moe.py) rather than a Python loop over them
DECODE_ONE_CALL = os.environ.get("TINYINFER_MOE_DECODE_ONE_CALL", "1") != "0"
# the most rows of one expert per GEMM call in the one-call batch path (kernels/moe.py)
BATCH_ROWS = int(os.environ.get("TINYINFER_MOE_BATCH_ROWS", "16"))


class MoE:
    """The MoE feed-forward block: a callable (n, n_embd) -> (n, n_embd) like :class:`~.base.GatedMLP`.

    ``router``: a Linear of ``ffn_gate_inp`` (n_expert outputs); ``gate``, ``up``, ``down``: :class:`Experts`;
    ``norm_w``: renormalise the chosen weights to sum 1; ``shared``: an optional MLP-like callable added to
    the experts' sum, scaled per token by sigmoid(x · ``shared_gate``) when that vector is given.
    """

    def __init__(self, router, gate: Experts, up: Experts, down: Experts, n_used: int, norm_w: bool,
                 shared=None, shared_gate: np.ndarray | None = None):
        self.router, self.gate, self.up, self.down = router, gate, up, down
        self.n_used, self.norm_w = n_used, norm_w
        self.n_ff = gate.rows
        self.shared, self.shared_gate = shared, shared_gate
        self.stacked = None      # (driver, arrays) of the one-call batch path, made by _stack()
        self._stack_tried = False
        self._dec = None         # (driver, arrays, index arrays by thread count) of the one-call decode step
        self._dec_tried = False

    def route(self, x: np.ndarray) -> tuple:
        """(chosen experts (n, n_used) int64 by falling probability, their weights (n, n_used) float32)."""
        logits = self.router(x)
        n, k = logits.shape[0], self.n_used
        chosen, w = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
        kmoe.route(logits, k, self.norm_w, _MIN_WEIGHT_SUM, chosen, w)
        return chosen, w

    def expert(self, e: int, x: np.ndarray) -> np.ndarray:
        """down_e(silu(gate_e x) * up_e x) for x (m, n_embd) float32 C-contiguous."""
        m, f = x.shape[0], self.n_ff
        if m > 1 and not self._batched(e, m):
            return np.concatenate([self.expert(e, x[i:i + 1]) for i in range(m)])
        if m > GEMM_ROWS:       # the packed GEMM's time per row grows past a few rows (x86, Dec 2026): cut
            return np.concatenate([self.expert(e, x[i:i + GEMM_ROWS]) for i in range(0, m, GEMM_ROWS)])
        if m == 1:
            gu = np.empty((1, 2 * f), np.float32)      # one row: the halves are contiguous
            mm.run(self.gate[e], x, gu[:, :f])
            mm.run(self.up[e], x, gu[:, f:])
        else:   # the packed GEMM writes a strided output (a column slice) several times slower: two arrays
            gu = np.concatenate([mm.run(self.gate.batched(e), x, np.empty((m, f), np.float32)),
                                 mm.run(self.up.batched(e), x, np.empty((m, f), np.float32))], axis=1)
        a = np.empty((m, f), np.float32)
        ops.silu_mul_split(gu, a)
        return mm.run(self.down.batched(e) if m > 1 else self.down[e], a, np.empty((m, self.down.rows), np.float32))

    def _batched(self, e: int, m: int) -> bool:
        """Whether expert e runs a group of m > 1 rows on its GEMM-layout copies (made here on first use,
        within PACK_BUDGET, for a group of at least PACK_MIN_ROWS rows: an engine's 2-token warm-up or a
        few sequences' decode step copies nothing)."""
        if not REPACK or (m < PACK_MIN_ROWS and self.gate._b[e] is None):
            return False
        return all(ex.batched(e) is not None for ex in (self.gate, self.up, self.down))

    def _stack(self):
        """All experts in the kernels' layout, stacked (gate and up in one matrix where their types
        agree), and the jitted block over them (:mod:`..kernels.moe`); None past PACK_BUDGET."""
        global _packed_bytes
        self._stack_tried = True
        g, u, dn = self.gate, self.up, self.down
        cfg, E = g.config, g.n_expert
        # gate and up stacked in one matrix (one GEMM, its output already [g | u]) where the types agree
        # and have a layout of their own; the file's blocks are used in place
        fuse = (g.ggml_type == u.ggml_type
                and kmoe.layout(mm.prepare(g._slice(0), g.ggml_type, g.k, config=cfg))[0] is not False)
        mats = ([(lambda e: np.concatenate([g._slice(e), u._slice(e)]), g)] if fuse else [(g._slice, g), (u._slice, u)])
        mats.append((dn._slice, dn))
        out, copied, copies = [], 0, []
        for rows_of, ex in mats:
            pw = mm.prepare(rows_of(0), ex.ggml_type, ex.k, config=cfg)
            kind, arrs = kmoe.layout(pw)
            if kind is False:           # no faster layout for this type: the file's own blocks, no copy
                out.append(((pw.info, False), ex.t.data.reshape(E, ex.rows, -1), np.zeros((E, 1, 1), np.uint8)))
                continue
            nb_ = sum(a.nbytes for a in arrs) * E
            if _packed_bytes + copied + nb_ > PACK_BUDGET:
                return None
            copied += nb_
            a = np.empty((E,) + arrs[0].shape, np.uint8)
            b = np.empty((E,) + arrs[1].shape, np.uint8) if kind is True else np.zeros((E, 1, 1), np.uint8)
            for e in range(E):
                if e:
                    kind_e, arrs = kmoe.layout(mm.prepare(rows_of(e), ex.ggml_type, ex.k, config=cfg))
                    assert kind_e == kind
                a[e] = arrs[0]
                if kind is True:
                    b[e] = arrs[1]
            if kind is True:
                b.flags.writeable = False       # the tail rows are a read-only view in prepare(): same types
            out.append(((pw.info, kind), a, b))
            copies += [g, u] if ex is g and fuse else [ex]
        _packed_bytes += copied
        for ex in copies:       # every batch and decode step of this layer now reads the copies only
            mm.drop_file_pages(ex.t.data)
        (gk, ga, gb), (uk, ua, ub) = out[0], (out[1] if not fuse else (None, out[0][1], out[0][2]))
        dk, da, db = out[-1]
        drive = kmoe.driver(gk, uk, dk, cfg)
        return drive, (ga, gb, ua, ub, da, db)

    def _batch(self, x, chosen, w, ys) -> bool:
        """A grouped batch in one jitted call (False: no stacked copy; the caller loops over experts)."""
        if self.stacked is None:
            with _STACK_LOCK:           # server threads: one copy per layer
                if self.stacked is None and not self._stack_tried and REPACK:
                    self.stacked = self._stack()
            if self.stacked is None:
                return False
        drive, arrays = self.stacked
        n, k = chosen.shape
        if n == 1:
            _one_token(drive, x, arrays, chosen, w, ys, self.n_ff)
            return True
        flat = chosen.reshape(-1)
        order = np.argsort(flat, kind="stable")                 # flat (token, slot) sorted by expert
        bounds = np.flatnonzero(np.diff(flat[order])) + 1
        starts = np.concatenate([[0], bounds, [n * k]]).astype(np.int64)
        groups = flat[order[starts[:-1]]].astype(np.int64)
        nt = _par.num_threads()
        sizes = np.diff(starts)
        if nt > 1:          # longest first to the least loaded thread (cost ~ rows + a fixed part)
            bins = [[] for _ in range(nt)]
            load = [0] * nt
            for gi in np.argsort(-sizes, kind="stable").tolist():
                t = load.index(min(load))
                bins[t].append(gi)
                load[t] += int(sizes[gi]) + 2
            plan = np.array([gi for b in bins for gi in b], np.int64)
            plan_starts = np.cumsum([0] + [len(b) for b in bins]).astype(np.int64)
        else:
            plan = np.arange(len(groups), dtype=np.int64)
            plan_starts = np.array([0, len(groups)], np.int64)
        route = (order.astype(np.int64), k, groups, starts, plan, plan_starts, BATCH_ROWS, self.n_ff)
        _par.call(drive, x, route, arrays, np.ascontiguousarray(w, np.float32).reshape(-1), ys.reshape(n * k, -1))
        return True

    def _decode(self, x, chosen, w, ys) -> bool:
        """One token's chosen experts in one jitted call on the file's own layout (the GEMV kernels: zero
        copy, only the chosen experts' rows read); False where a type has no such driver."""
        d = self._dec
        if d is None:
            if self._dec_tried:
                return False
            self._dec_tried = True
            keys, arrays = [], []
            for ex in (self.gate, self.up, self.down):
                pw = mm.prepare(ex._slice(0), ex.ggml_type, ex.k, repack=False, config=ex.config)
                if kmoe.layout(pw)[0] is not False:
                    return False
                keys.append((pw.info, False))
                arrays += [ex.t.data.reshape(ex.n_expert, ex.rows, -1), np.zeros((ex.n_expert, 1, 1), np.uint8)]
            d = self._dec = (kmoe.driver(*keys, self.gate.config), tuple(arrays))
        drive, arrays = d
        _one_token(drive, x, arrays, chosen, w, ys, self.n_ff)
        return True

    def __call__(self, x: np.ndarray) -> np.ndarray:
        chosen, w = self.route(x)
        n, k = chosen.shape
        ys = np.empty((n, k, self.down.rows), np.float32)     # each (token, slot)'s weighted expert output
        if ((self.stacked is not None or (n > 1 and n * k >= self.gate.n_expert))
                and self._batch(np.ascontiguousarray(x, np.float32), chosen, w, ys)):
            pass
        elif n == 1 and DECODE_ONE_CALL and self._decode(np.ascontiguousarray(x, np.float32), chosen,
                                                         np.ascontiguousarray(w, np.float32), ys):
            pass
        elif n == 1:
            for j, e in enumerate(chosen[0].tolist()):
                ys[0, j] = self.expert(e, x)[0] * w[0, j]
        else:
            # group the batch by expert: each chosen expert's weights are read once for all its tokens
            order = np.argsort(chosen, axis=None, kind="stable")          # flat (token, slot) sorted by expert
            bounds = np.flatnonzero(np.diff(chosen.reshape(-1)[order])) + 1
            flat_ys, flat_w = ys.reshape(n * k, -1), w.reshape(-1)
            for part in np.split(order, bounds):
                e = int(chosen.flat[part[0]])
                y = self.expert(e, np.ascontiguousarray(x[part // k]))
                flat_ys[part] = y * flat_w[part][:, None]
        # the slots summed in one order whatever the batch (llama.cpp adds them in slot order too)
        out = ys[:, 0].copy()
        for j in range(1, k):
            out += ys[:, j]
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s *= 1.0 / (1.0 + np.exp(-(x @ self.shared_gate)))[:, None]
            out += s
        return out

    # -- what one token reads ----------------------------------------------------------------------------
    def nbytes_per_token(self) -> int:
        """Weight bytes one decode step reads in this block: the router, n_used experts, the shared expert."""
        b = self.router.nbytes + self.n_used * (self.gate.nbytes_expert + self.up.nbytes_expert
                                                + self.down.nbytes_expert)
        return b + (_nbytes(self.shared) if self.shared is not None else 0)


def _nbytes(mlp) -> int:
    parts = getattr(mlp.gate_up, "parts", [mlp.gate_up])
    return sum(p.nbytes for p in parts) + mlp.down.nbytes


def _direct(fn, *args):
    return fn(*args)


_ONE_TOKEN: dict = {}


def _one_token(drive, x, arrays, chosen, w, ys, n_ff):
    """One token's k chosen experts through a block driver: slot j is group j (a token's experts are
    distinct), one row each; with threads, the slots dealt out in turn."""
    k = chosen.shape[1]
    nt = min(_par.num_threads(), k)
    ix = _ONE_TOKEN.get((nt, k))
    if ix is None:
        plan = np.array([j for t in range(nt) for j in range(t, k, nt)], np.int64)
        starts = np.cumsum([0] + [len(range(t, k, nt)) for t in range(nt)]).astype(np.int64)
        ix = _ONE_TOKEN[nt, k] = (np.arange(k, dtype=np.int64), np.arange(k + 1, dtype=np.int64), plan, starts)
    order, gstarts, plan, pstarts = ix
    route = (order, k, chosen[0].astype(np.int64), gstarts, plan, pstarts, 1, n_ff)
    (_par.call if nt > 1 else _direct)(drive, x, route, arrays, np.ascontiguousarray(w, np.float32).reshape(-1),
                                       ys.reshape(k, -1))


def load_shared_expert(w: Weights, il: int, n_embd: int, n_ff: int):
    """The shared expert of layer ``il`` (``ffn_{gate,up,down}_shexp``, ``n_ff`` wide): a SiLU-gated MLP."""
    from .base import GatedMLP, Linear, fused_linear
    b = f"blk.{il}."
    return GatedMLP(fused_linear(w.tensor(b + "ffn_gate_shexp.weight", n_embd, n_ff),
                                 w.tensor(b + "ffn_up_shexp.weight", n_embd, n_ff)),
                    Linear(w.tensor(b + "ffn_down_shexp.weight", n_ff, n_embd)))


def load_moe(w: Weights, il: int, n_embd: int, ep: ExpertParams, norm_w: bool, shared=None,
             shared_gate: np.ndarray | None = None) -> MoE:
    """The block of layer ``il``: ``ffn_gate_inp`` and the three ``ffn_*_exps`` tensors, shapes checked
    against the expert count and widths from the metadata (a wrong count is a one-line error)."""
    from .base import Linear
    b, E, f = f"blk.{il}.", ep.n_expert, ep.n_ff_exp
    router = Linear(w.tensor(b + "ffn_gate_inp.weight", n_embd, E))
    gate = Experts(w.tensor(b + "ffn_gate_exps.weight", n_embd, f, E), E)
    up = Experts(w.tensor(b + "ffn_up_exps.weight", n_embd, f, E), E)
    down = Experts(w.tensor(b + "ffn_down_exps.weight", f, n_embd, E), E)
    return MoE(router, gate, up, down, ep.n_expert_used, norm_w, shared, shared_gate)

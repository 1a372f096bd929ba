"""``python -m tinyinfer quantize IN.gguf [OUT.gguf] TYPE [NTHREADS]``: llama-quantize's conventions.

Which tensors get which type follows llama.cpp's ``llama_model_quantize_impl`` and
``llama_tensor_get_type`` (without importance matrices):

* only tensors whose name ends in ``weight`` with at least 2 dimensions are
  quantized; norms (``*_norm.weight``), MoE gate inputs, position embeddings and a
  few small per-architecture tensors are copied as they are;
* the output tensor (or ``token_embd.weight`` when the model ties it to the
  output) gets Q6_K, or Q8_0 when its rows are not a multiple of the target's block
  size (so SmolLM2's token_embd stays Q8_0 in a Q4_0 file);
* the K mixtures (Q4_K_M, Q5_K_M, Q3_K_M, ...) give ``attn_v`` and ``ffn_down``
  more bits on the layers llama.cpp picks (``use_more_bits``);
* a 256-block type that does not divide a tensor's rows falls back as llama.cpp's
  ``tensor_type_fallback`` (Aug 2026): Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0, IQ4_XS -> IQ4_NL, then F16 (Qwen2.5-0.5B's 896-wide rows);
* IQ4_NL / IQ4_XS files give ``attn_v`` Q5_K when the model has 4+ query heads per KV
  head and the first eighth of ``ffn_down`` Q5_K (no importance matrix);
* every type written is one the engine runs (``runnable`` in the format registry);
* a tensor already of the chosen type is copied byte for byte; converting an
  already-quantized tensor needs ``--allow-requantize``.

Tensors are written in llama.cpp's order (by layer number, then name), the
metadata is carried over with its value types, ``general.file_type`` set to the
llama_ftype and ``general.quantization_version`` to 2.
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType as GT, GGUFValueType, GGUFWriter
from gguf import LlamaFileType as FT

from ..kernels import quants as Q

PROG = "tinyinfer quantize"


class QuantizeError(ValueError):
    """A quantization request that cannot be carried out (one clear line)."""


# -- target types (llama-quantize's names) ------------------------------------------------

# name -> (llama_ftype, default ggml type)
FTYPES = {
    "Q4_0": (FT.MOSTLY_Q4_0, GT.Q4_0),
    "Q4_1": (FT.MOSTLY_Q4_1, GT.Q4_1),
    "Q5_0": (FT.MOSTLY_Q5_0, GT.Q5_0),
    "Q5_1": (FT.MOSTLY_Q5_1, GT.Q5_1),
    "Q8_0": (FT.MOSTLY_Q8_0, GT.Q8_0),
    "Q2_K": (FT.MOSTLY_Q2_K, GT.Q2_K),
    "Q2_K_S": (FT.MOSTLY_Q2_K_S, GT.Q2_K),
    "Q3_K_S": (FT.MOSTLY_Q3_K_S, GT.Q3_K),
    "Q3_K_M": (FT.MOSTLY_Q3_K_M, GT.Q3_K),
    "Q3_K_L": (FT.MOSTLY_Q3_K_L, GT.Q3_K),
    "Q4_K_S": (FT.MOSTLY_Q4_K_S, GT.Q4_K),
    "Q4_K_M": (FT.MOSTLY_Q4_K_M, GT.Q4_K),
    "Q5_K_S": (FT.MOSTLY_Q5_K_S, GT.Q5_K),
    "Q5_K_M": (FT.MOSTLY_Q5_K_M, GT.Q5_K),
    "Q6_K": (FT.MOSTLY_Q6_K, GT.Q6_K),
    "IQ4_NL": (FT.MOSTLY_IQ4_NL, GT.IQ4_NL),
    "IQ4_XS": (FT.MOSTLY_IQ4_XS, GT.IQ4_XS),
    "F16": (FT.MOSTLY_F16, GT.F16),
    "BF16": (FT.MOSTLY_BF16, GT.BF16),
    "F32": (FT.ALL_F32, GT.F32),
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
_FTYPE_NAMES = {int(ft): name for name, (ft, _) in FTYPES.items()}


def file_type_name(ftype: int) -> str:
    """llama-quantize's name of a general.file_type value ("Q4_K_M"), or "type N"."""
    return _FTYPE_NAMES.get(int(ftype), f"type {ftype}")
COPY = "COPY"


def parse_ftype(s: str):
    """A type name (case-insensitive, aliases allowed), llama_ftype number, or COPY -> canonical name."""
    u = str(s).strip().upper()
    u = ALIASES.get(u, u)
    if u in FTYPES or u == COPY:
        return u
    if u.isdigit():
        for name, (ft, _) in FTYPES.items():
            if int(ft) == int(u):
                return name
    return None


def _type_list() -> str:
    return ", ".join(list(FTYPES) + list(ALIASES) + [COPY])


def _parse_tensor_type(s: str) -> GT:
    try:
        e = Q.type_info(s)
    except Q.UnsupportedTypeError:
        raise QuantizeError(f"unknown tensor type {s!r}; known: {', '.join(Q.supported_names())}") from None
    if e.quantize_rows is None:
        raise QuantizeError(f"tinyinfer cannot write {e.name} tensors")
    return e.ggml_type


# -- the plan: which type each tensor gets ------------------------------------------------

@dataclass
class Options:
    allow_requantize: bool = False
    leave_output_tensor: bool = False     # quantize_output_tensor = false
    pure: bool = False
    output_tensor_type: GT | None = None
    token_embedding_type: GT | None = None
    only_copy: bool = False


@dataclass
class TensorPlan:
    name: str
    shape: tuple            # ggml order
    src_type: int
    dst_type: int
    fallback: str = ""      # llama.cpp's fallback warning, if any

    @property
    def convert(self) -> bool:
        return self.src_type != self.dst_type


def _layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def llama_order(names) -> list:
    """llama.cpp's weight_name_comparer: layer number first (non-layer tensors first), then name."""
    return sorted(names, key=lambda n: (_layer_of(n), n))


def _n_dims(shape) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return max(n, 1)


_NO_QUANT_SUBSTR = (
    "_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d.weight", "shortconv.conv.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd.",
)


def _should_quantize(name: str, shape, opt: Options) -> bool:
    if not name.endswith("weight") or _n_dims(shape) < 2:
        return False
    if any(s in name for s in _NO_QUANT_SUBSTR):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    if opt.leave_output_tensor and name == "output.weight":
        return False
    return not opt.only_copy


def _first(v, default=0):
    if v is None:
        return default
    if isinstance(v, (list, tuple, np.ndarray)):
        return int(v[0]) if len(v) else default
    return int(v)


class _State:
    """quantize_state_impl: the counters llama_tensor_get_type walks with."""

    def __init__(self, g, names):
        arch = g.architecture
        self.arch = arch
        self.n_layer = _first(g.get(f"{arch}.block_count"), 0)
        n_head = _first(g.get(f"{arch}.attention.head_count"), 0)
        n_head_kv = _first(g.get(f"{arch}.attention.head_count_kv"), n_head)
        self.n_gqa = n_head // n_head_kv if n_head_kv else 0
        self.n_expert = _first(g.get(f"{arch}.expert_count"), 0)
        self.has_output = "output.weight" in names
        self.n_attention_wv = sum(1 for n in names if "attn_v.weight" in n or "attn_qkv.weight" in n
                                  or "attn_kv_b.weight" in n)
        self.i_attention_wv = 0
        self.n_ffn_down = self.n_ffn_gate = self.n_ffn_up = self.n_layer
        self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.n_fallback = 0

    def layer_info(self, i_layer, n_layer, name):
        if self.n_expert > 1:
            m = _layer_of(name)
            if m < 0:
                raise QuantizeError(f"failed to determine the layer of tensor {name}")
            if m >= n_layer:
                raise QuantizeError(f"bad layer {m} for tensor {name}: must be in [0, {n_layer})")
            return m, n_layer
        return i_layer, n_layer


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _blck(t) -> int:
    return GGML_QUANT_SIZES[GT(t)][0]


def _tensor_get_type(qs: _State, new_type, name: str, shape, ftype, opt: Options):
    """llama_tensor_get_type_impl for the ftypes tinyinfer writes (before the fallback)."""
    arch = qs.arch
    falcon = arch == "falcon"
    if name == "output.weight" or (not qs.has_output and name == "token_embd.weight"):
        if opt.output_tensor_type is not None:
            new_type = opt.output_tensor_type
        else:
            nx = shape[0]
            if falcon or nx % _blck(new_type) != 0:
                new_type = GT.Q8_0
            elif new_type != GT.Q8_0:
                new_type = GT.Q6_K
    elif name in ("token_embd.weight", "per_layer_token_embd.weight"):
        if opt.token_embedding_type is not None:
            new_type = opt.token_embedding_type
    elif "attn_v.weight" in name:
        if ftype == FT.MOSTLY_Q2_K:
            new_type = GT.Q4_K if qs.n_gqa >= 4 else GT.Q3_K
        elif ftype == FT.MOSTLY_Q2_K_S and qs.n_gqa >= 4:
            new_type = GT.Q4_K
        elif ftype == FT.MOSTLY_Q3_K_M:
            new_type = GT.Q5_K if qs.i_attention_wv < 2 else GT.Q4_K
        elif ftype == FT.MOSTLY_Q3_K_L:
            new_type = GT.Q5_K
        elif ftype in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and qs.n_gqa >= 4:
            new_type = GT.Q5_K
        elif ftype in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new_type = GT.Q6_K
        elif ftype == FT.MOSTLY_Q4_K_S and qs.i_attention_wv < 4:
            new_type = GT.Q5_K
        if qs.n_expert == 8:
            new_type = GT.Q8_0
        qs.i_attention_wv += 1
    elif "attn_k.weight" in name:
        if qs.n_expert == 8:
            new_type = GT.Q8_0
    elif "attn_q.weight" in name:
        pass  # only IQ mixtures change it
    elif "ffn_down" in name:
        i_layer, n_layer = qs.layer_info(qs.i_ffn_down, qs.n_ffn_down, name)
        if ftype == FT.MOSTLY_Q2_K:
            new_type = GT.Q3_K
        elif ftype == FT.MOSTLY_Q2_K_S:
            if i_layer < n_layer // 8:
                new_type = GT.Q4_K
        elif ftype == FT.MOSTLY_Q3_K_M:
            new_type = (GT.Q5_K if i_layer < n_layer // 16
                        else GT.Q4_K if (not falcon or _use_more_bits(i_layer, n_layer)) else GT.Q3_K)
        elif ftype == FT.MOSTLY_Q3_K_L:
            new_type = GT.Q4_K if falcon else GT.Q5_K
        elif ftype == FT.MOSTLY_Q4_K_M:
            if falcon:
                new_type = (GT.Q6_K if i_layer < n_layer // 16
                            else GT.Q5_K if _use_more_bits(i_layer, n_layer) else GT.Q4_K)
            elif _use_more_bits(i_layer, n_layer):
                new_type = GT.Q6_K
        elif i_layer < n_layer // 8 and ftype in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS):   # (no imatrix)
            new_type = GT.Q5_K
        elif ftype == FT.MOSTLY_Q5_K_M and _use_more_bits(i_layer, n_layer):
            new_type = GT.Q6_K
        elif ftype == FT.MOSTLY_Q4_K_S and not falcon and i_layer < n_layer // 8:
            new_type = GT.Q5_K
        qs.i_ffn_down += 1
    elif "attn_output.weight" in name:
        if not falcon:
            if qs.n_expert == 8:
                if ftype in (FT.MOSTLY_Q2_K, FT.MOSTLY_Q3_K_S, FT.MOSTLY_Q3_K_M, FT.MOSTLY_Q4_K_S, FT.MOSTLY_Q4_K_M,
                             FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS):
                    new_type = GT.Q5_K
            else:
                if ftype == FT.MOSTLY_Q2_K:
                    new_type = GT.Q3_K
                elif ftype == FT.MOSTLY_Q3_K_M:
                    new_type = GT.Q4_K
                elif ftype == FT.MOSTLY_Q3_K_L:
                    new_type = GT.Q5_K
        elif ftype == FT.MOSTLY_Q3_K_L:
            new_type = GT.Q4_K
    elif "attn_qkv.weight" in name:
        if ftype in (FT.MOSTLY_Q3_K_M, FT.MOSTLY_Q3_K_L):
            new_type = GT.Q4_K
        elif ftype == FT.MOSTLY_Q4_K_M:
            new_type = GT.Q5_K
        elif ftype == FT.MOSTLY_Q5_K_M:
            new_type = GT.Q6_K
    elif "ffn_gate" in name:
        qs.layer_info(qs.i_ffn_gate, qs.n_ffn_gate, name)
        qs.i_ffn_gate += 1
    elif "ffn_up" in name:
        qs.layer_info(qs.i_ffn_up, qs.n_ffn_up, name)
        qs.i_ffn_up += 1

    return new_type


# llama.cpp's tensor_type_fallback (Aug 2026): a type whose block does not divide a tensor's rows
_FALLBACK = {GT.IQ4_XS: GT.IQ4_NL, GT.Q2_K: GT.Q4_0, GT.Q3_K: GT.Q4_0,
             GT.Q4_K: GT.Q5_0, GT.Q5_K: GT.Q5_1, GT.Q6_K: GT.Q8_0}


def _fallback(qs: _State, new_type, name: str, shape):
    """(type, warning) after llama.cpp's fallback for rows that ``new_type``'s block does not divide."""
    nx = shape[0]
    if nx % _blck(new_type) == 0:
        return new_type, ""
    fb = _FALLBACK.get(GT(new_type))
    if fb is None:
        raise QuantizeError(f"tensor {name}: row length {nx} is not a multiple of the "
                            f"{GT(new_type).name} block size {_blck(new_type)}")
    note = (f"ncols {nx} not divisible by {_blck(new_type)} (required for type {GT(new_type).name}) "
            f"-> falling back to ")
    if nx % _blck(fb) != 0:
        fb = GT.F16
    qs.n_fallback += 1
    return fb, note + GT(fb).name


def plan_quantization(g, type_name: str, opt: Options | None = None) -> list:
    """The type of every tensor of opened GGUF ``g`` when quantized to ``type_name``,
    in llama.cpp's write order. Raises :class:`QuantizeError` for what cannot be done."""
    opt = opt or Options()
    name = parse_ftype(type_name)
    if name is None:
        raise QuantizeError(f"unknown type {type_name!r}; known: {_type_list()}")
    if name == COPY:
        opt = Options(**{**opt.__dict__, "only_copy": True})
        ftype, default_type = None, None
    else:
        ftype, default_type = FTYPES[name]
    names = llama_order(g.tensors)
    qs = _State(g, names)
    quantized_target = default_type is not None and Q.type_info(default_type).is_quantized
    plans = []
    for n in names:
        t = g.tensors[n]
        new_type, note = t.ggml_type, ""
        if _should_quantize(n, t.shape, opt):
            new_type = default_type
            if not opt.pure and quantized_target:
                new_type = _tensor_get_type(qs, new_type, n, t.shape, ftype, opt)
            if quantized_target:
                new_type, note = _fallback(qs, new_type, n, t.shape)
            if opt.token_embedding_type is not None and n == "token_embd.weight":
                new_type = opt.token_embedding_type
            if opt.output_tensor_type is not None and n == "output.weight":
                new_type = opt.output_tensor_type
        p = TensorPlan(n, tuple(t.shape), int(t.ggml_type), int(new_type), note)
        if p.convert:
            _check_convertible(p, opt)
        plans.append(p)
    return plans


def _check_convertible(p: TensorPlan, opt: Options) -> None:
    src = GT(p.src_type).name if p.src_type in GT._value2member_map_ else f"type {p.src_type}"
    try:
        se = Q.type_info(p.src_type)
    except Q.UnsupportedTypeError as e:
        raise QuantizeError(f"tensor {p.name}: cannot convert from {src}: {e}") from None
    if se.is_quantized and not opt.allow_requantize:
        raise QuantizeError(f"tensor {p.name} is already quantized ({se.name}); requantizing loses quality, "
                            f"pass --allow-requantize to do it anyway")
    de = Q.type_info(p.dst_type)
    if de.quantize_rows is None or not de.runnable:
        raise QuantizeError(f"tensor {p.name}: tinyinfer cannot write {de.name} (it writes "
                            f"{', '.join(e.name for e in Q.TYPES.values() if e.quantize_rows and e.runnable)})")
    if p.shape[0] % de.block_size:
        raise QuantizeError(f"tensor {p.name}: row length {p.shape[0]} is not a multiple of the "
                            f"{de.name} block size {de.block_size}")


# -- writing -----------------------------------------------------------------------------

_VT = GGUFValueType
_NP_OF_VT = {
    _VT.UINT8: "<u1", _VT.INT8: "<i1", _VT.UINT16: "<u2", _VT.INT16: "<i2", _VT.UINT32: "<u4",
    _VT.INT32: "<i4", _VT.FLOAT32: "<f4", _VT.UINT64: "<u8", _VT.INT64: "<i8", _VT.FLOAT64: "<f8",
    _VT.BOOL: "?",
}
_VT_OF_NP = {np.dtype(v).newbyteorder("<") if v != "?" else np.dtype(bool): k for k, v in _NP_OF_VT.items()}


def _array_elem_type(val):
    if isinstance(val, np.ndarray):
        dt = val.dtype.newbyteorder("<") if val.dtype != bool else val.dtype
        return _VT_OF_NP[dt]
    if not val or isinstance(val[0], str):
        return _VT.STRING
    if isinstance(val[0], (list, tuple, np.ndarray)):
        return _VT.ARRAY
    if isinstance(val[0], bool):
        return _VT.BOOL
    if isinstance(val[0], int):
        return _VT.INT64 if any(v < 0 for v in val) else _VT.UINT64
    return _VT.FLOAT64


class _Writer(GGUFWriter):
    """GGUFWriter that keeps strings byte-exact (our reader decodes with surrogateescape),
    packs numeric arrays with numpy (a 262k-entry score table in one call) and
    allows empty arrays, which GGUF permits."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == _VT.STRING:
            b = val.encode("utf-8", "surrogateescape") if isinstance(val, str) else bytes(val)
            return (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<Q", len(b)) + b
        if vtype == _VT.ARRAY:
            head = struct.pack("<I", vtype) if add_vtype else b""
            lt = sub_type if sub_type is not None else _array_elem_type(val)
            head += struct.pack("<IQ", lt, len(val))
            if lt in _NP_OF_VT:
                return head + np.ascontiguousarray(np.asarray(val), dtype=_NP_OF_VT[lt]).tobytes()
            if lt == _VT.STRING:
                parts = [head]
                for s in val:
                    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else bytes(s)
                    parts.append(struct.pack("<Q", len(b)))
                    parts.append(b)
                return b"".join(parts)
            return head + b"".join(self._pack_val(v, lt, add_vtype=False) for v in val)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


@dataclass
class Summary:
    n_tensors: int = 0
    n_converted: int = 0
    n_fallback: int = 0
    n_elements: int = 0
    size_in: int = 0
    size_out: int = 0
    seconds: float = 0.0
    ftype: int = 0
    plans: list = field(default_factory=list, repr=False)

    @property
    def bpw_in(self) -> float:
        return self.size_in * 8 / max(self.n_elements, 1)

    @property
    def bpw_out(self) -> float:
        return self.size_out * 8 / max(self.n_elements, 1)


def _parse_override(s: str):
    """llama.cpp's --override-kv KEY=TYPE:VALUE (TYPE: int, float, bool, str)."""
    key, sep, rest = s.partition("=")
    typ, sep2, value = rest.partition(":")
    if not sep or not sep2 or not key:
        raise QuantizeError(f"invalid --override-kv {s!r}: expected KEY=TYPE:VALUE")
    try:
        if typ == "int":
            return key, int(value), _VT.INT64
        if typ == "float":
            return key, float(value), _VT.FLOAT64
        if typ == "bool":
            if value not in ("true", "false"):
                raise ValueError(value)
            return key, value == "true", _VT.BOOL
        if typ == "str":
            return key, value, _VT.STRING
    except ValueError:
        raise QuantizeError(f"invalid --override-kv {s!r}: bad {typ} value {value!r}") from None
    raise QuantizeError(f"invalid --override-kv {s!r}: type must be int, float, bool or str")


_CONVERT_CHUNK = 1 << 22  # elements dequantized at a time (16 MiB of float32)


def _convert(t, p: TensorPlan, threads=None) -> np.ndarray:
    """The output bytes (n_rows, row_bytes) of tensor ``t`` converted per plan ``p``."""
    k = t.shape[0]
    src = t.data
    n = src.shape[0]
    de = Q.type_info(p.dst_type)
    out = np.empty((n, de.row_bytes(k)), np.uint8)
    step = max(1, _CONVERT_CHUNK // k)
    for a in range(0, n, step):
        b = min(n, a + step)
        if p.src_type == GT.F32:
            x = src[a:b].view(np.float32)
        else:
            x = Q.dequantize(src[a:b], p.src_type, k, threads=threads)
        Q.quantize(x, p.dst_type, out=out[a:b], threads=threads)
    return out


def _open(path):
    from tinyinfer.gguf import GGUFFile
    return GGUFFile(path)


def quantize_file(inp, out, type_name: str, opt: Options | None = None, *, overrides=(),
                  progress: bool = True, verbose: bool = False, dry_run: bool = False,
                  threads: int | None = None, log=None) -> Summary:
    """Quantize GGUF ``inp`` into ``out`` (written atomically). Returns a :class:`Summary`.

    Progress bar and per-tensor lines (``verbose``) go to ``log`` (default: stderr)."""
    opt = opt or Options()
    log = sys.stderr if log is None else log
    t_start = time.perf_counter()
    g = _open(inp)
    try:
        plans = plan_quantization(g, type_name, opt)
        name = parse_ftype(type_name)
        if name == COPY:
            ftype = _first(g.get("general.file_type"), int(FT.GUESSED))
        else:
            ftype = int(FTYPES[name][0])
        kv_over = [_parse_override(s) for s in overrides]

        s = Summary(ftype=ftype, plans=plans)
        for p in plans:
            t = g.tensors[p.name]
            s.n_tensors += 1
            s.n_elements += t.n_elements
            s.size_in += t.nbytes
            s.size_out += t.nbytes if not p.convert else \
                Q.type_info(p.dst_type).row_bytes(t.shape[0]) * (t.n_elements // t.shape[0])
            s.n_converted += p.convert
            s.n_fallback += bool(p.fallback)
        if dry_run:
            if verbose:
                for i, p in enumerate(plans):
                    print(_tensor_line(i, len(plans), p, g.tensors[p.name]), file=log)
            s.seconds = time.perf_counter() - t_start
            return s

        out = Path(out)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            _write(g, tmp, plans, ftype, kv_over, progress, verbose, threads, log)
            os.replace(tmp, out)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        s.seconds = time.perf_counter() - t_start
        return s
    finally:
        g.close()


def _tensor_line(i, n, p: TensorPlan, t) -> str:
    ne = list(t.shape) + [1] * (4 - len(t.shape))
    shape = ", ".join(f"{d:5d}" for d in ne)
    src = GT(p.src_type).name.lower()
    mib_in = t.nbytes / 1024 / 1024
    if p.convert:
        mib_out = Q.type_info(p.dst_type).row_bytes(t.shape[0]) * (t.n_elements // t.shape[0]) / 1024 / 1024
        what = f"converting to {GT(p.dst_type).name.lower()} .. size = {mib_in:8.2f} MiB -> {mib_out:8.2f} MiB"
    else:
        what = f"size = {mib_in:8.3f} MiB"
    line = f"[{i + 1:4d}/{n:4d}] {p.name:>36s} - [{shape}], type = {src:>6s}, {what}"
    if p.fallback:
        line += f"\n    ({p.fallback})"
    return line


def _write(g, path, plans, ftype, kv_over, progress, verbose, threads, log):
    from tqdm import tqdm

    w = _Writer(path, g.architecture or "unknown")
    align = g.alignment
    if align != w.data_alignment or "general.alignment" in g.metadata:
        w.data_alignment = align
    skip = {"general.architecture", "general.file_type", "general.quantization_version"}
    over = {k for k, _, _ in kv_over}
    for key, val in g.metadata.items():
        if key in skip or key in over or key.startswith("split."):
            continue
        w.add_key_value(key, val, GGUFValueType(g.field_types[key]))
    w.add_key_value("general.quantization_version", GGML_QUANT_VERSION, _VT.UINT32)
    w.add_key_value("general.file_type", int(ftype), _VT.UINT32)
    for key, val, vt in kv_over:
        w.add_key_value(key, val, vt)

    for p in plans:
        t = g.tensors[p.name]
        e_bytes = (Q.type_info(p.dst_type).row_bytes(t.shape[0]) * (t.n_elements // t.shape[0])
                   if p.convert else t.nbytes)
        w.add_tensor_info(p.name, tuple(reversed(t.shape)), np.dtype(np.float32), e_bytes, raw_dtype=GT(p.dst_type))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(g.tensors[p.name].nbytes for p in plans)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="quantizing",
               file=log, disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for i, p in enumerate(plans):
            t = g.tensors[p.name]
            bar.set_postfix_str(p.name, refresh=False)
            data = _convert(t, p, threads) if p.convert else t.data
            w.write_tensor_data(data)
            if verbose:
                line = _tensor_line(i, len(plans), p, t)
                if progress:
                    bar.write(line, file=log)
                else:
                    print(line, file=log)
            bar.update(t.nbytes)
    finally:
        bar.close()
        w.close()


# -- cached requantized test models -------------------------------------------------------

_RECIPE = 1  # bump when the quantizer's output for the same input changes


def ensure_requantized(type_name: str, source: str = "smollm2") -> Path:
    """``source`` (a :mod:`tinyinfer.fetch` key) requantized to ``type_name`` in the model
    cache, made once (``--allow-requantize``, llama-quantize's tensor choices) and reused.

    ``ensure_requantized("Q4_0")`` -> ``<cache>/SmolLM2-135M-Instruct.Q4_0.gguf``, whose
    tensors equal llama-quantize's (see shared/reference/smollm2/requant_sha256.json).
    The source file itself is returned when it already has that type.
    """
    from tinyinfer.fetch import cache_dir, fetch

    name = parse_ftype(type_name)
    if name is None or name == COPY:
        raise QuantizeError(f"unknown type {type_name!r}; known: {', '.join(FTYPES)}")
    src = fetch(source, quiet=True)
    g = _open(src)
    try:
        src_ftype = g.get("general.file_type")
    finally:
        g.close()
    if src_ftype is not None and int(src_ftype) == int(FTYPES[name][0]):
        return src
    stem = src.name[:-len(".gguf")] if src.name.endswith(".gguf") else src.name
    stem = re.sub(r"[.-](?:[QqIi][A-Za-z0-9_]+|[Ff]16|[Ff]32|[Bb][Ff]16)$", "", stem)
    out = cache_dir() / f"{stem}.{name}.gguf"
    stamp = out.with_name(out.name + ".stamp")
    st = src.stat()
    want = f"recipe {_RECIPE}; source {src.name} {st.st_size}:{int(st.st_mtime)}"
    if out.exists() and stamp.exists():
        ost = out.stat()
        if stamp.read_text().strip() == f"{want}; out {ost.st_size}:{int(ost.st_mtime)}":
            return out
    quantize_file(src, out, name, Options(allow_requantize=True), progress=False)
    ost = out.stat()
    tmp = stamp.with_name(f".{stamp.name}.tmp-{os.getpid()}")
    tmp.write_text(f"{want}; out {ost.st_size}:{int(ost.st_mtime)}\n")
    os.replace(tmp, stamp)
    return out


# -- command line --------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise QuantizeError(f"{message} (see --help)")


def _build_parser():
    ap = _Parser(
        prog="python -m tinyinfer quantize",
        usage="%(prog)s [options] IN.gguf [OUT.gguf] TYPE [NTHREADS]",
        description="Quantize a GGUF model the way llama-quantize does (no importance matrix).",
        epilog="types: " + _type_list() + ". Q4_K = Q4_K_M, Q5_K = Q5_K_M, Q3_K = Q3_K_M.",
    )
    ap.add_argument("args", nargs="*", metavar="ARG",
                    help="IN.gguf [OUT.gguf] TYPE [NTHREADS], as llama-quantize; without OUT the "
                         "output is ggml-model-TYPE.gguf beside IN")
    ap.add_argument("--allow-requantize", action="store_true",
                    help="allow converting tensors that are already quantized (loses quality)")
    ap.add_argument("--leave-output-tensor", action="store_true", help="leave output.weight as it is")
    ap.add_argument("--pure", action="store_true",
                    help="every quantizable tensor gets TYPE: no mixtures, no output/token_embd upgrades")
    ap.add_argument("--output-tensor-type", metavar="TYPE", help="type of output.weight")
    ap.add_argument("--token-embedding-type", metavar="TYPE", help="type of token_embd.weight")
    ap.add_argument("--override-kv", action="append", default=[], metavar="KEY=TYPE:VALUE",
                    help="set a metadata value (TYPE: int, float, bool, str); repeatable")
    ap.add_argument("--imatrix", metavar="FILE", help="(not supported)")
    ap.add_argument("--keep-split", action="store_true", help="(not supported)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and sizes, write nothing")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per tensor, like llama-quantize")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return ap


def _split_positional(args):
    """llama-quantize's positional rule: IN [OUT] TYPE [NTHREADS]; when the word after IN
    parses as a type, there is no OUT and the output is ``ggml-model-TYPE.gguf`` beside IN."""
    if len(args) < 2:
        raise QuantizeError("expected IN.gguf [OUT.gguf] TYPE [NTHREADS]")
    inp = args[0]
    if parse_ftype(args[1]) is not None:
        typ, rest = args[1], args[2:]
        out = str(Path(inp).with_name(f"ggml-model-{parse_ftype(typ)}.gguf"))
    else:
        if len(args) < 3:
            raise QuantizeError(f"unknown type {args[1]!r}; known: {_type_list()}")
        out, typ, rest = args[1], args[2], args[3:]
        if parse_ftype(typ) is None:
            raise QuantizeError(f"unknown type {typ!r}; known: {_type_list()}")
    if len(rest) > 1:
        raise QuantizeError(f"too many arguments: {' '.join(rest)}")
    threads = None
    if rest:
        if not rest[0].isdigit() or int(rest[0]) < 1:
            raise QuantizeError(f"NTHREADS must be a positive integer, got {rest[0]!r}")
        threads = int(rest[0])
    return inp, out, typ, threads


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            a = _build_parser().parse_args(argv)
        except SystemExit as e:   # --help
            return int(e.code or 0)
        if a.imatrix:
            raise QuantizeError("--imatrix: importance matrices are not supported")
        if a.keep_split:
            raise QuantizeError("--keep-split: split GGUF files are not supported")
        inp, out, typ, threads = _split_positional(a.args)
        opt = Options(
            allow_requantize=a.allow_requantize,
            leave_output_tensor=a.leave_output_tensor,
            pure=a.pure,
            output_tensor_type=_parse_tensor_type(a.output_tensor_type) if a.output_tensor_type else None,
            token_embedding_type=_parse_tensor_type(a.token_embedding_type) if a.token_embedding_type else None,
        )
        s = quantize_file(inp, out, typ, opt, overrides=a.override_kv, progress=not a.quiet,
                          verbose=a.verbose, dry_run=a.dry_run, threads=threads)
    except (QuantizeError, Q.UnsupportedTypeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:   # GGUFError is a ValueError and names the file
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    mib = 1024 * 1024
    print(f"quantize: {inp} -> {out if not a.dry_run else '(dry run, nothing written)'} as {parse_ftype(typ)}")
    print(f"quantize: model size  = {s.size_in / mib:10.2f} MiB ({s.bpw_in:.2f} BPW)")
    print(f"quantize: quant size  = {s.size_out / mib:10.2f} MiB ({s.bpw_out:.2f} BPW)")
    print(f"quantize: {s.n_tensors} tensors: {s.n_converted} converted, {s.n_tensors - s.n_converted} copied"
          + (f", {s.n_fallback} fallbacks" if s.n_fallback else "")
          + f"; general.file_type = {s.ftype}")
    print(f"quantize: {'plan' if a.dry_run else 'quantize'} time = {s.seconds * 1000:10.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

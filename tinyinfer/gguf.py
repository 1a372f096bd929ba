"""A GGUF reader over mmap: metadata, tensor infos, zero-copy tensor views.

Why our own reader: ``gguf.GGUFReader`` builds numpy objects for every field
and takes seconds on a 262k-token vocabulary; this one walks the header once
with ``struct.unpack_from`` on the mapped bytes and returns plain Python values
(numeric arrays as zero-copy numpy views).

Every way a file can be wrong ends in :class:`GGUFError` (a ``ValueError``)
naming what and where: no other exception type, no allocation larger than the
file, no unbounded loop.

Layout (little-endian): ``"GGUF"``, u32 version (2 or 3), u64 n_tensors,
u64 n_kv; n_kv × (string key, u32 type, value); n_tensors × (string name,
u32 n_dims, u64 × n_dims ne, u32 ggml type, u64 offset); padding to
``general.alignment`` (default 32); tensor data, offsets relative to its start.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from .ggml_types import QUANT_SIZES as GGML_QUANT_SIZES, GGMLType as GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_STRING = 1 << 30          # no GGUF string is a gigabyte long
MAX_ARRAY_DEPTH = 8


class GGUFError(ValueError):
    """A GGUF file is malformed or unsupported."""


# value type id -> (name, struct format, size, numpy dtype)
class VT:
    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)


_SCALAR = {
    VT.UINT8: ("B", 1, np.uint8),
    VT.INT8: ("b", 1, np.int8),
    VT.UINT16: ("<H", 2, np.uint16),
    VT.INT16: ("<h", 2, np.int16),
    VT.UINT32: ("<I", 4, np.uint32),
    VT.INT32: ("<i", 4, np.int32),
    VT.FLOAT32: ("<f", 4, np.float32),
    VT.BOOL: ("?", 1, np.bool_),
    VT.UINT64: ("<Q", 8, np.uint64),
    VT.INT64: ("<q", 8, np.int64),
    VT.FLOAT64: ("<d", 8, np.float64),
}
_VT_NAMES = {v: k for k, v in vars(VT).items() if not k.startswith("_")}


def ggml_type_name(t: int) -> str:
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"type {t}"


@dataclass
class TensorInfo:
    name: str
    shape: tuple          # ggml order: ne[0] (contiguous, the row length) first
    ggml_type: int
    offset: int           # relative to the start of the data section
    nbytes: int
    data: np.ndarray = field(repr=False, default=None)  # uint8 view (n_rows, row_bytes)

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def np_shape(self) -> tuple:
        """The numpy (row-major) shape: ggml's ne reversed."""
        return tuple(reversed(self.shape))

    def array(self) -> np.ndarray:
        """Zero-copy typed view for F32 / F16 / BF16(as uint16) / I8..I64 tensors, numpy shape."""
        dt = _PLAIN_DTYPES.get(self.ggml_type)
        if dt is None:
            raise GGUFError(f"tensor {self.name!r}: {self.type_name} is a block-quantized type; dequantize it instead")
        return self.data.reshape(-1).view(dt).reshape(self.np_shape)


_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.BF16: np.uint16,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
    GGMLQuantizationType.F64: np.float64,
}


class _Cursor:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf, pos, end):
        self.buf, self.pos, self.end = buf, pos, end

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise GGUFError(f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                            f"only {self.end - self.pos} remain")

    def scalar(self, fmt: str, size: int, what: str):
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def u32(self, what):
        return self.scalar("<I", 4, what)

    def u64(self, what):
        return self.scalar("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if n > MAX_STRING:
            raise GGUFError(f"{what}: string length {n} at offset {self.pos - 8} is absurd")
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="surrogateescape")
        self.pos += n
        return s

    def count(self, elem_min_size: int, what: str) -> int:
        n = self.u64(f"count of {what}")
        if n * elem_min_size > self.end - self.pos:
            raise GGUFError(f"{what}: count {n} at offset {self.pos - 8} cannot fit in the "
                            f"{self.end - self.pos} bytes left in the file")
        return n


def _min_size(vtype: int) -> int:
    if vtype in _SCALAR:
        return _SCALAR[vtype][1]
    if vtype == VT.STRING:
        return 8
    return 12  # nested array: u32 type + u64 count


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0):
    if vtype in _SCALAR:
        fmt, size, _ = _SCALAR[vtype]
        return cur.scalar(fmt, size, f"value of {key!r}")
    if vtype == VT.STRING:
        return cur.string(f"value of {key!r}")
    if vtype == VT.ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError(f"{key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        etype = cur.u32(f"array element type of {key!r}")
        if etype not in _VT_NAMES:
            raise GGUFError(f"{key!r}: unknown array element type {etype} at offset {cur.pos - 4}")
        n = cur.count(_min_size(etype), f"array {key!r}")
        if etype in _SCALAR:
            _, size, dt = _SCALAR[etype]
            arr = np.frombuffer(cur.buf, dtype=dt, count=n, offset=cur.pos)
            cur.pos += n * size
            return arr
        if etype == VT.STRING:
            return _read_string_array(cur, n, key)
        return [_read_value(cur, VT.ARRAY, f"{key}[{i}]", depth + 1) for i in range(n)]
    raise GGUFError(f"{key!r}: unknown value type {vtype} at offset {cur.pos - 4}")


def _read_string_array(cur: _Cursor, n: int, key: str) -> list:
    buf, pos, end = cur.buf, cur.pos, cur.end
    if n >= 4096:                       # a vocabulary or merges: one jitted pass (kernels/strings.py)
        from .kernels.strings import read_strings
        got = read_strings(buf, pos, end, n)
        if got is not None:
            cur.pos = got[1]
            return got[0]
    unpack = struct.unpack_from
    out = [None] * n
    for i in range(n):
        if pos + 8 > end:
            raise GGUFError(f"truncated file: string {i} of array {key!r} at offset {pos}")
        ln = unpack("<Q", buf, pos)[0]
        pos += 8
        if ln > end - pos:
            raise GGUFError(f"array {key!r}: string {i} of length {ln} at offset {pos - 8} runs past the end of the file")
        out[i] = str(buf[pos:pos + ln], "utf-8", "surrogateescape")
        pos += ln
    cur.pos = pos
    return out


class GGUFFile:
    """An opened GGUF file.

    ``metadata``: dict key -> value (int/float/bool/str, numpy array for numeric
    arrays, list for string and nested arrays). ``tensors``: dict name ->
    :class:`TensorInfo`, in file order, each with a zero-copy ``data`` view.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open: {e.strerror}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                head = f.read(4)
                if head != GGUF_MAGIC:
                    raise GGUFError(f"{self.path}: not a GGUF file (bad magic {head!r})")
                raise GGUFError(f"{self.path}: truncated file: {size} bytes is shorter than the 24-byte header")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        try:
            self._parse()
        except GGUFError as e:
            self.close()
            raise GGUFError(f"{self.path}: {e}") from None
        except (ValueError, OverflowError, struct.error, IndexError, MemoryError, TypeError) as e:  # safety net
            self.close()
            raise GGUFError(f"{self.path}: malformed GGUF ({type(e).__name__}: {e})") from None

    # -- parsing -------------------------------------------------------------------
    def _parse(self) -> None:
        buf = memoryview(self._mm)
        cur = _Cursor(buf, 0, self.size)
        magic = bytes(buf[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"not a GGUF file (bad magic {magic!r})")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in (2, 3):
            hint = " (a big-endian file?)" if self.version > 0xFFFF else ""
            raise GGUFError(f"unsupported GGUF version {self.version}{hint}; supported: 2, 3")
        n_tensors = cur.count(28, "tensor infos")
        n_kv = cur.count(13, "metadata key/values")

        self.metadata: dict = {}
        self.field_types: dict = {}
        for _ in range(n_kv):
            key_off = cur.pos
            key = cur.string(f"metadata key at offset {key_off}")
            vtype = cur.u32(f"value type of {key!r}")
            if vtype not in _VT_NAMES:
                raise GGUFError(f"key {key!r}: unknown value type {vtype} at offset {cur.pos - 4}")
            if key in self.metadata:
                raise GGUFError(f"duplicate metadata key {key!r} at offset {key_off}")
            self.metadata[key] = _read_value(cur, vtype, key)
            self.field_types[key] = vtype

        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (self.field_types.get("general.alignment", VT.UINT32) != VT.UINT32
                or not isinstance(align, int) or align <= 0 or align & (align - 1)):
            raise GGUFError(f"general.alignment must be a power-of-two u32, got {align!r}")
        self.alignment = align

        infos = []
        names = set()
        for i in range(n_tensors):
            off = cur.pos
            name = cur.string(f"name of tensor {i}")
            if name in names:
                raise GGUFError(f"duplicate tensor name {name!r} at offset {off}")
            names.add(name)
            n_dims = cur.u32(f"n_dims of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise GGUFError(f"tensor {name!r}: {n_dims} dimensions (at most {MAX_DIMS})")
            shape = tuple(cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
            ttype = cur.u32(f"type of tensor {name!r}")
            toff = cur.u64(f"data offset of tensor {name!r}")
            infos.append((name, shape, ttype, toff))

        data_start = -(-cur.pos // align) * align
        # A file without tensors (llama.cpp's vocab-only files) may end right after the
        # tensor infos, without the padding to the data section: that is fine.
        if data_start > self.size and infos:
            raise GGUFError(f"truncated file: tensor data would start at offset {data_start}, file is {self.size} bytes")
        self.data_offset = data_start
        data_size = self.size - data_start

        self.tensors: dict = {}
        spans = []
        for name, shape, ttype, toff in infos:
            try:
                qt = GGMLQuantizationType(ttype)
                block, tsize = GGML_QUANT_SIZES[qt]
            except (ValueError, KeyError):
                raise GGUFError(f"tensor {name!r}: unknown ggml type {ttype}") from None
            n = 1
            for d in shape:
                if d <= 0 or d > 1 << 40:
                    raise GGUFError(f"tensor {name!r}: bad dimension {d} in shape {list(shape)}")
                n *= d
                if n > 1 << 48:
                    raise GGUFError(f"tensor {name!r}: absurd element count for shape {list(shape)}")
            ne0 = shape[0] if shape else 1
            if ne0 % block:
                raise GGUFError(f"tensor {name!r}: row length {ne0} is not a multiple of the "
                                f"{ggml_type_name(ttype)} block size {block}")
            row_bytes = ne0 // block * tsize
            n_rows = n // ne0
            nbytes = row_bytes * n_rows
            if toff % align:
                raise GGUFError(f"tensor {name!r}: data offset {toff} is not aligned to {align}")
            if toff + nbytes > data_size:
                raise GGUFError(f"tensor {name!r}: data [{toff}, {toff + nbytes}) runs past the end of "
                                f"the data section ({data_size} bytes): truncated file?")
            view = np.frombuffer(self._mm, dtype=np.uint8, count=nbytes,
                                 offset=data_start + toff).reshape(n_rows, row_bytes)
            self.tensors[name] = TensorInfo(name, shape, ttype, toff, nbytes, view)
            spans.append((toff, nbytes, name))
        spans.sort()
        for (o1, n1, a), (o2, _, b) in zip(spans, spans[1:]):
            if o1 + n1 > o2:
                raise GGUFError(f"tensors {a!r} and {b!r} overlap in the data section")

    # -- access --------------------------------------------------------------------
    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def __getitem__(self, key: str):
        try:
            return self.metadata[key]
        except KeyError:
            raise GGUFError(f"{self.path}: missing metadata key {key!r}") from None

    def __contains__(self, key: str) -> bool:
        return key in self.metadata

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: missing tensor {name!r}") from None

    def close(self) -> None:
        # Views handed out keep the mapping alive; closing with live views raises BufferError,
        # in which case the map is released when the last view goes.
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_gguf(path) -> GGUFFile:
    return GGUFFile(path)

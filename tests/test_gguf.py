"""Correctness of tinyinfer.gguf against gguf.GGUFReader and against files of known content.

- the two real models: every metadata key/value, every tensor's name, shape, type,
  offset and data bytes (sha256) equal to what ``gguf.GGUFReader`` and a plain
  ``read()`` of the file say; tensor data is a zero-copy view of the mmap;
- files written by ``gguf.GGUFWriter``: every metadata value type (all scalars,
  bool, strings, arrays of each numeric type, arrays of strings, nested arrays),
  GGUF v2 and v3, custom ``general.alignment``, F32/F16/... ``.array()`` views;
- files written by :class:`GGUFBuilder` below (our own small serializer, which also
  records where every structural field lies, for the fuzz tests): nested arrays of
  every element type, empty arrays, vocabulary-only files; a hypothesis round trip.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
from collections import namedtuple

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from tinyinfer.gguf import VT, GGUFError, GGUFFile, open_gguf

QT = GGMLQuantizationType

# ------------------------------------------------------------------------------------------
# A small GGUF serializer that records the layout (shared with test_gguf_fuzz.py)
# ------------------------------------------------------------------------------------------

SCALAR_FMT = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
    VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q",
    VT.FLOAT64: "<d",
}
SCALAR_NP = {
    VT.UINT8: np.uint8, VT.INT8: np.int8, VT.UINT16: np.uint16, VT.INT16: np.int16,
    VT.UINT32: np.uint32, VT.INT32: np.int32, VT.FLOAT32: np.float32, VT.BOOL: np.bool_,
    VT.UINT64: np.uint64, VT.INT64: np.int64, VT.FLOAT64: np.float64,
}
SCALAR_RANGE = {  # (min, max) of the integer types
    VT.UINT8: (0, 2**8 - 1), VT.INT8: (-2**7, 2**7 - 1), VT.UINT16: (0, 2**16 - 1),
    VT.INT16: (-2**15, 2**15 - 1), VT.UINT32: (0, 2**32 - 1), VT.INT32: (-2**31, 2**31 - 1),
    VT.UINT64: (0, 2**64 - 1), VT.INT64: (-2**63, 2**63 - 1),
}

# offset/size of one structural field; kind is one of
#   magic version n_tensors n_kv kv(marker) strlen strbytes vtype atype acount scalar
#   ti(marker) n_dims dim ggml_type toffset padding data
Field = namedtuple("Field", "offset size kind what")

U64_KINDS = ("n_tensors", "n_kv", "strlen", "acount", "dim", "toffset")
U32_KINDS = ("version", "vtype", "atype", "n_dims", "ggml_type")


def tensor_nbytes(ne, ggml_type) -> int:
    block, tsize = GGML_QUANT_SIZES[QT(ggml_type)]
    n = 1
    for d in ne:
        n *= d
    return n // block * tsize


class GGUFBuilder:
    """Serialize GGUF from Python values.

    Values: scalars as Python numbers/bools/str; arrays as ``(element_type, [items])``,
    items of nested arrays again ``(element_type, [items])``. Keys and strings may be
    ``bytes`` (for invalid UTF-8). Tensors: ``ne`` in ggml order, raw ``data`` bytes,
    ``offset`` computed (aligned) unless given.
    """

    def __init__(self, version: int = 3, alignment: int | None = None):
        self.version = version
        self.alignment = alignment if alignment is not None else 32
        self.kvs: list = []
        self.tensors: list = []
        if alignment is not None:
            self.add("general.alignment", VT.UINT32, alignment)

    def add(self, key, vtype, value):
        self.kvs.append((key, vtype, value))
        return self

    def add_tensor(self, name, ne, ggml_type, data=None, offset=None):
        nbytes = tensor_nbytes(ne, ggml_type)
        if data is None:
            data = bytes((i * 7 + len(self.tensors)) & 0xFF for i in range(nbytes))
        assert len(data) == nbytes, (name, len(data), nbytes)
        self.tensors.append((name, tuple(ne), int(ggml_type), bytes(data), offset))
        return self

    def build(self, n_tensors=None, n_kv=None):
        out = bytearray()
        fields: list = []

        def put(kind, fmt, v, what=""):
            fields.append(Field(len(out), struct.calcsize(fmt), kind, what))
            out.extend(struct.pack(fmt, v))

        def put_str(s, what):
            b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
            put("strlen", "<Q", len(b), what)
            fields.append(Field(len(out), len(b), "strbytes", what))
            out.extend(b)

        def put_value(vtype, v, what):
            if vtype in SCALAR_FMT:
                put("scalar", SCALAR_FMT[vtype], v, what)
            elif vtype == VT.STRING:
                put_str(v, what)
            elif vtype == VT.ARRAY:
                etype, items = v
                put("atype", "<I", etype, what)
                put("acount", "<Q", len(items), what)
                for i, x in enumerate(items):
                    put_value(etype, x, f"{what}[{i}]")
            else:
                raise ValueError(vtype)

        fields.append(Field(0, 4, "magic", ""))
        out += b"GGUF"
        put("version", "<I", self.version)
        put("n_tensors", "<Q", len(self.tensors) if n_tensors is None else n_tensors)
        put("n_kv", "<Q", len(self.kvs) if n_kv is None else n_kv)
        for key, vtype, value in self.kvs:
            fields.append(Field(len(out), 0, "kv", key))
            put_str(key, f"key {key!r}")
            put("vtype", "<I", vtype, key)
            put_value(vtype, value, key)

        align = self.alignment
        offsets, pos = [], 0
        for name, ne, t, data, off in self.tensors:
            if off is None:
                off = -(-pos // align) * align
            offsets.append(off)
            pos = max(pos, off + len(data))
        for (name, ne, t, data, _), off in zip(self.tensors, offsets):
            fields.append(Field(len(out), 0, "ti", name))
            put_str(name, f"tensor {name!r}")
            put("n_dims", "<I", len(ne), name)
            for d in ne:
                put("dim", "<Q", d, name)
            put("ggml_type", "<I", t, name)
            put("toffset", "<Q", off, name)
        pad = -len(out) % align
        if pad:
            fields.append(Field(len(out), pad, "padding", ""))
            out += b"\0" * pad
        data_start = len(out)
        for (name, ne, t, data, _), off in zip(self.tensors, offsets):
            start = data_start + off
            if len(out) < start:
                out += b"\0" * (start - len(out))
            out[start:start + len(data)] = data
            fields.append(Field(start, len(data), "data", name))
        if self.tensors:  # pad the data section's end like the writers do
            out += b"\0" * (-len(out) % align)
        return bytes(out), fields

    def write(self, path, **kw):
        data, fields = self.build(**kw)
        with open(path, "wb") as f:
            f.write(data)
        return fields


def expected(vtype, v):
    """What the reader should return for a value given to GGUFBuilder."""
    if vtype == VT.FLOAT32:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    if vtype == VT.BOOL:
        return bool(v)
    if vtype in SCALAR_FMT:
        return v
    if vtype == VT.STRING:
        return v if isinstance(v, str) else bytes(v).decode("utf-8", "surrogateescape")
    etype, items = v
    if etype in SCALAR_NP:
        return np.array(items, dtype=SCALAR_NP[etype])
    return [expected(etype, x) for x in items]


def assert_same(got, exp, where=""):
    if isinstance(exp, np.ndarray):
        assert isinstance(got, np.ndarray), (where, type(got))
        assert got.dtype == exp.dtype, (where, got.dtype, exp.dtype)
        assert got.shape == exp.shape, (where, got.shape, exp.shape)
        assert np.array_equal(got, exp, equal_nan=exp.dtype.kind == "f"), where
    elif isinstance(exp, list):
        assert isinstance(got, list), (where, type(got))
        assert len(got) == len(exp), (where, len(got), len(exp))
        for i, (g, e) in enumerate(zip(got, exp)):
            assert_same(g, e, f"{where}[{i}]")
    elif isinstance(exp, float):
        assert isinstance(got, float), (where, type(got))
        assert got == exp or (math.isnan(got) and math.isnan(exp)), (where, got, exp)
    else:
        assert type(got) is type(exp) and got == exp, (where, got, exp)


def flatten(v) -> list:
    """Our nested value flattened the way GGUFReader.contents() flattens nested arrays."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list):
        out = []
        for x in v:
            out.extend(flatten(x) if isinstance(x, (list, np.ndarray)) else [x])
        return out
    return v


def same_as_reader(ours, field, where=""):
    """Compare one of our values with a GGUFReader field."""
    theirs = field.contents()
    if field.types[0] == GGUFValueType.ARRAY:
        ours_flat, theirs = flatten(ours), list(theirs)
        assert len(ours_flat) == len(theirs), (where, len(ours_flat), len(theirs))
        if field.types[-1] in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
            a, b = np.array(ours_flat, dtype=np.float64), np.array(theirs, dtype=np.float64)
            assert np.array_equal(a, b, equal_nan=True), where
        else:
            assert ours_flat == theirs, where
        if isinstance(ours, np.ndarray):  # numeric arrays keep the element type of the file
            part = field.parts[field.data[0]] if len(field.data) else None
            if part is not None:
                assert ours.dtype == part.dtype.newbyteorder("="), (where, ours.dtype, part.dtype)
    elif isinstance(theirs, float):
        assert isinstance(ours, float)
        assert ours == theirs or (math.isnan(ours) and math.isnan(theirs)), (where, ours, theirs)
    else:
        assert ours == theirs and type(ours) is type(theirs), (where, ours, theirs)


def compare_with_reader(ours: GGUFFile, reader: GGUFReader, check_data: bool = True):
    fields = [(k, f) for k, f in reader.fields.items() if not k.startswith("GGUF.")]
    assert ours.version == int(reader.fields["GGUF.version"].parts[0][0])
    assert [k for k, _ in fields] == list(ours.metadata)
    for key, f in fields:
        assert ours.field_types[key] == int(f.types[0]), key
        same_as_reader(ours.metadata[key], f, key)
    assert ours.alignment == reader.alignment
    assert ours.data_offset == reader.data_offset
    assert [t.name for t in reader.tensors] == list(ours.tensors)
    for rt in reader.tensors:
        t = ours.tensors[rt.name]
        assert t.shape == tuple(int(x) for x in rt.shape), rt.name
        assert t.ggml_type == int(rt.tensor_type), rt.name
        assert ours.data_offset + t.offset == rt.data_offset, rt.name
        assert t.nbytes == rt.n_bytes, rt.name
        assert t.n_elements == rt.n_elements, rt.name
        if check_data:
            assert hashlib.sha256(t.data).digest() == hashlib.sha256(np.ascontiguousarray(rt.data)).digest(), rt.name


def mmap_base(a: np.ndarray):
    """Follow .base to the object that owns the memory."""
    b = a
    while isinstance(b, (np.ndarray, memoryview)):
        b = b.base if isinstance(b, np.ndarray) else b.obj
    return b


def assert_zero_copy(f: GGUFFile, a: np.ndarray, abs_offset: int):
    assert not a.flags.owndata
    assert not a.flags.writeable  # ACCESS_READ mapping
    assert isinstance(mmap_base(a), mmap.mmap)
    base_addr = np.frombuffer(f._mm, dtype=np.uint8).ctypes.data
    assert a.ctypes.data == base_addr + abs_offset


# ------------------------------------------------------------------------------------------
# The real models
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request):
    path = request.getfixturevalue(f"{request.param}_path")
    reader = GGUFReader(path)  # takes ~15 s on Gemma 3's vocabulary: once per module
    return path, GGUFFile(path), reader


def test_real_matches_gguf_reader(real):
    path, ours, reader = real
    compare_with_reader(ours, reader, check_data=False)
    assert len(ours.metadata) == int(reader.fields["GGUF.kv_count"].parts[0][0])
    assert len(ours.tensors) == int(reader.fields["GGUF.tensor_count"].parts[0][0])


def test_real_tensor_data_identical(real):
    """sha256 of every tensor's bytes: ours == GGUFReader's == a plain read() of the file."""
    path, ours, reader = real
    by_name = {rt.name: rt for rt in reader.tensors}
    with open(path, "rb") as fh:
        for t in ours.tensors.values():
            fh.seek(ours.data_offset + t.offset)
            plain = hashlib.sha256(fh.read(t.nbytes)).digest()
            assert hashlib.sha256(t.data).digest() == plain, t.name
            assert hashlib.sha256(np.ascontiguousarray(by_name[t.name].data)).digest() == plain, t.name


def test_real_known_values(smollm2_path, gemma3_path):
    s = GGUFFile(smollm2_path)
    assert s.architecture == "llama" and s.version == 3 and s.alignment == 32
    assert s["llama.block_count"] == 30 and s["llama.embedding_length"] == 576
    assert len(s["tokenizer.ggml.tokens"]) == 49152 and s["tokenizer.ggml.tokens"][0] == "<|endoftext|>"
    assert s["tokenizer.ggml.token_type"].dtype == np.int32
    assert s.tensor("token_embd.weight").shape == (576, 49152)
    assert s.tensor("token_embd.weight").type_name == "Q8_0"
    g = GGUFFile(gemma3_path)
    assert g.architecture == "gemma3" and g["gemma3.attention.sliding_window"] == 512
    assert len(g["tokenizer.ggml.tokens"]) == 262144 and g["tokenizer.ggml.scores"].dtype == np.float32
    assert {t.type_name for t in g.tensors.values()} == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}


def test_real_zero_copy(real):
    path, f, _ = real
    for t in f.tensors.values():
        assert_zero_copy(f, t.data, f.data_offset + t.offset)
        assert t.data.shape == (t.n_elements // t.shape[0], t.nbytes * t.shape[0] // t.n_elements)
    # numeric metadata arrays are views of the mapping too
    for k, v in f.metadata.items():
        if isinstance(v, np.ndarray) and v.size:
            assert not v.flags.owndata and isinstance(mmap_base(v), mmap.mmap), k


def test_real_open_does_not_read_weights(gemma3_path):
    """Opening maps the file; resident memory grows by the header's objects, not the weights."""
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    before = proc.memory_info().rss
    f = GGUFFile(gemma3_path)
    grown = proc.memory_info().rss - before
    weights = sum(t.nbytes for t in f.tensors.values())
    assert grown < weights / 4, (grown, weights)


def test_reference_vocab_only_files():
    """llama.cpp's vocab-only files end right after the tensor infos (no padding to the data section)."""
    from conftest import need_reference
    files = sorted(need_reference("vocab").glob("*.gguf"))
    assert files, "no vocab files in the reference folder"
    for p in files:
        f = GGUFFile(p)
        assert not f.tensors and f.data_offset >= f.size - f.alignment
        compare_with_reader(f, GGUFReader(p))


# ------------------------------------------------------------------------------------------
# Files written by gguf.GGUFWriter
# ------------------------------------------------------------------------------------------

SCALAR_CASES = [
    ("t.u8", VT.UINT8, 255), ("t.u8z", VT.UINT8, 0), ("t.i8", VT.INT8, -128), ("t.i8max", VT.INT8, 127),
    ("t.u16", VT.UINT16, 65535), ("t.i16", VT.INT16, -32768),
    ("t.u32", VT.UINT32, 2**32 - 1), ("t.i32", VT.INT32, -2**31),
    ("t.u64", VT.UINT64, 2**64 - 1), ("t.i64", VT.INT64, -2**63), ("t.i64max", VT.INT64, 2**63 - 1),
    ("t.f32", VT.FLOAT32, 3.14159), ("t.f32inf", VT.FLOAT32, float("-inf")), ("t.f32nan", VT.FLOAT32, float("nan")),
    ("t.f32tiny", VT.FLOAT32, 1e-45),
    ("t.f64", VT.FLOAT64, math.pi), ("t.f64big", VT.FLOAT64, 1.7976931348623157e308),
    ("t.bool_true", VT.BOOL, True), ("t.bool_false", VT.BOOL, False),
    ("t.str", VT.STRING, "héllo ✓ 🦙 \x00 nul"), ("t.str_empty", VT.STRING, ""),
    ("t.str_long", VT.STRING, "x" * 100_000),
]


def _array_cases():
    cases = []
    for vt, dt in SCALAR_NP.items():
        if vt in SCALAR_RANGE:
            lo, hi = SCALAR_RANGE[vt]
            items = [lo, hi, 0, 1, lo + 1, hi // 3]
        elif vt == VT.BOOL:
            items = [True, False, False, True]
        else:
            items = [0.0, -1.5, 3.25, float("inf"), float("-inf"), float("nan"), 1e-30]
        cases.append((f"a.{np.dtype(dt).name}", VT.ARRAY, (vt, items)))
        cases.append((f"a1.{np.dtype(dt).name}", VT.ARRAY, (vt, items[:1])))
    cases.append(("a.str", VT.ARRAY, (VT.STRING, ["", "a", "Ġthe", "▁über", "<|im_end|>", "🦙" * 3, "x" * 5000])))
    cases.append(("a.str1", VT.ARRAY, (VT.STRING, ["only"])))
    return cases


ARRAY_CASES = _array_cases()


def _writer_file(path, version=3, alignment=None, tensors=(), kvs=SCALAR_CASES + ARRAY_CASES, nested=True):
    w = GGUFWriter(path, "testarch")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, vtype, value in kvs:
        if vtype == VT.ARRAY:
            etype, items = value
            w.add_key_value(key, list(items), GGUFValueType.ARRAY, sub_type=GGUFValueType(etype))
        else:
            w.add_key_value(key, value, GGUFValueType(vtype))
    if nested:
        # the writer infers inner element types: int -> INT32, float -> FLOAT32, str, bool
        w.add_key_value("n.ints", [[1, 2, 3], [4], [-5, 6]], GGUFValueType.ARRAY, sub_type=GGUFValueType.ARRAY)
        w.add_key_value("n.strs", [["a", "bc"], ["", "déf"]], GGUFValueType.ARRAY, sub_type=GGUFValueType.ARRAY)
        w.add_key_value("n.floats3", [[[1.5, 2.5]], [[3.5], [4.5, 5.5]]], GGUFValueType.ARRAY,
                        sub_type=GGUFValueType.ARRAY)
        w.add_key_value("n.bools", [[True], [False, True]], GGUFValueType.ARRAY, sub_type=GGUFValueType.ARRAY)
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version != 3:  # v2 and v3 are byte-identical for little-endian files but for the version field
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(struct.pack("<I", version))


NESTED_EXPECTED = {
    "n.ints": [np.array([1, 2, 3], np.int32), np.array([4], np.int32), np.array([-5, 6], np.int32)],
    "n.strs": [["a", "bc"], ["", "déf"]],
    "n.floats3": [[np.array([1.5, 2.5], np.float32)], [np.array([3.5], np.float32), np.array([4.5, 5.5], np.float32)]],
    "n.bools": [np.array([True]), np.array([False, True])],
}


def _test_tensors(rng):
    return [
        ("f32.1d", rng.standard_normal(7).astype(np.float32), None),
        ("f32.2d", rng.standard_normal((3, 5)).astype(np.float32), None),
        ("f16.3d", rng.standard_normal((2, 3, 4)).astype(np.float16), None),
        ("f32.4d", rng.standard_normal((2, 1, 3, 2)).astype(np.float32), None),
        ("f64", rng.standard_normal((2, 3)), None),
        ("i8", rng.integers(-128, 128, (4, 4), dtype=np.int8), None),
        ("i16", rng.integers(-999, 999, (3,), dtype=np.int16), None),
        ("i32", rng.integers(-2**31, 2**31, (2, 2), dtype=np.int32), None),
        ("i64", rng.integers(-2**62, 2**62, (5,), dtype=np.int64), None),
        ("q8_0", rng.integers(0, 256, (3, 2 * 34), dtype=np.uint8), QT.Q8_0),   # 3 rows of 64
        ("q4_k", rng.integers(0, 256, (2, 144), dtype=np.uint8), QT.Q4_K),      # 2 rows of 256
        ("bf16", rng.integers(0, 2**16, (2, 8), dtype=np.uint16).view(np.uint8), QT.BF16),
    ]


@pytest.mark.parametrize("version", [2, 3])
def test_writer_every_value_type(tmp_path, version):
    p = tmp_path / f"all_v{version}.gguf"
    tensors = _test_tensors(np.random.default_rng(version))
    _writer_file(p, version=version, tensors=tensors)
    f = GGUFFile(p)
    assert f.version == version
    assert f.architecture == "testarch"
    for key, vtype, value in SCALAR_CASES + ARRAY_CASES:
        assert f.field_types[key] == vtype, key
        assert_same(f[key], expected(vtype, value), key)
    for key, exp in NESTED_EXPECTED.items():
        assert f.field_types[key] == VT.ARRAY
        assert_same(f[key], exp, key)
    compare_with_reader(f, GGUFReader(p))
    # tensors: typed zero-copy views with the numpy shape of what was written
    for name, arr, raw in tensors:
        t = f.tensor(name)
        assert_zero_copy(f, t.data, f.data_offset + t.offset)
        assert t.data.tobytes() == arr.tobytes(), name
        if raw is None:
            a = t.array()
            assert a.shape == arr.shape and a.dtype == arr.dtype, name
            assert np.array_equal(a, arr), name
            assert np.shares_memory(a, t.data) and not a.flags.writeable and not a.flags.owndata
        elif raw == QT.BF16:
            a = t.array()
            assert a.dtype == np.uint16 and a.shape == (2, 8)
            assert np.array_equal(a, arr.view(np.uint16))
        else:
            assert t.data.shape == arr.shape, name  # (rows, row bytes)
            with pytest.raises(GGUFError, match="block-quantized"):
                t.array()


@pytest.mark.parametrize("alignment", [1, 8, 64, 256, 4096])
def test_custom_alignment(tmp_path, alignment):
    p = tmp_path / f"align{alignment}.gguf"
    rng = np.random.default_rng(alignment)
    tensors = [("a", rng.standard_normal(3).astype(np.float32), None),       # 12 bytes: odd sizes
               ("b", rng.standard_normal((5, 3)).astype(np.float16), None),  # 30 bytes
               ("c", rng.integers(0, 256, (1, 34), dtype=np.uint8), QT.Q8_0),
               ("d", rng.standard_normal(1).astype(np.float32), None)]
    _writer_file(p, alignment=alignment, tensors=tensors, kvs=SCALAR_CASES[:3], nested=False)
    f = GGUFFile(p)
    assert f.alignment == alignment and f["general.alignment"] == alignment
    assert f.data_offset % alignment == 0
    for name, arr, raw in tensors:
        t = f.tensor(name)
        assert t.offset % alignment == 0
        assert t.data.tobytes() == arr.tobytes()
        if raw is None:
            assert np.array_equal(t.array(), arr)
    compare_with_reader(f, GGUFReader(p))


def test_default_alignment_is_32(tmp_path):
    p = tmp_path / "d.gguf"
    _writer_file(p, tensors=[("x", np.ones(3, np.float32), None), ("y", np.ones(2, np.float32), None)],
                 kvs=[], nested=False)
    f = GGUFFile(p)
    assert f.alignment == 32 and "general.alignment" not in f
    assert f.data_offset % 32 == 0 and f.tensor("y").offset == 32


def test_writer_no_tensors_without_trailing_padding(tmp_path):
    """A metadata-only file may end right after its tensor infos (like llama.cpp's vocab files)."""
    p = tmp_path / "vocab.gguf"
    w = GGUFWriter(p, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "▁a", "b"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    f = GGUFFile(p)
    assert f.tensors == {} and f["tokenizer.ggml.tokens"][3] == "▁a"
    assert f.data_offset >= f.size
    compare_with_reader(f, GGUFReader(p))


# ------------------------------------------------------------------------------------------
# Files written by GGUFBuilder: what GGUFWriter cannot write
# ------------------------------------------------------------------------------------------

def _nested_cases():
    cases = []
    for vt in SCALAR_NP:
        sample = (SCALAR_RANGE[vt][1] if vt in SCALAR_RANGE else True if vt == VT.BOOL else 2.5)
        cases.append((f"nest.{vt}", VT.ARRAY, (VT.ARRAY, [(vt, [sample, sample]), (vt, []), (vt, [sample])])))
    cases.append(("nest.str", VT.ARRAY, (VT.ARRAY, [(VT.STRING, ["a", ""]), (VT.STRING, [])])))
    cases.append(("nest.deep", VT.ARRAY, (VT.ARRAY, [(VT.ARRAY, [(VT.ARRAY, [(VT.INT64, [-1, 2**40])])]),
                                                     (VT.ARRAY, [])])))
    cases.append(("nest.empty", VT.ARRAY, (VT.ARRAY, [])))
    for vt in list(SCALAR_NP) + [VT.STRING]:
        cases.append((f"empty.{vt}", VT.ARRAY, (vt, [])))
    return cases


@pytest.mark.parametrize("version", [2, 3])
def test_builder_nested_and_empty_arrays(tmp_path, version):
    b = GGUFBuilder(version=version)
    b.add("general.architecture", VT.STRING, "x")
    for key, vt, v in _nested_cases():
        b.add(key, vt, v)
    b.add_tensor("w", (32, 2), QT.Q8_0)
    p = tmp_path / "nested.gguf"
    b.write(p)
    f = GGUFFile(p)
    for key, vt, v in _nested_cases():
        assert_same(f[key], expected(vt, v), key)
    compare_with_reader(f, GGUFReader(p))


def test_builder_matches_writer_bytes(tmp_path):
    """Our test serializer writes the same bytes as GGUFWriter (so the fuzz base files are real GGUF)."""
    kvs = SCALAR_CASES + ARRAY_CASES
    _writer_file(tmp_path / "w.gguf", kvs=kvs, nested=False,
                 tensors=[("t", np.arange(6, dtype=np.float32).reshape(2, 3), None)])
    b = GGUFBuilder()
    b.add("general.architecture", VT.STRING, "testarch")
    for key, vt, v in kvs:
        b.add(key, vt, v)
    b.add_tensor("t", (3, 2), QT.F32, np.arange(6, dtype=np.float32).tobytes())
    b.write(tmp_path / "b.gguf")
    assert (tmp_path / "w.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_zero_dims_scalar_tensor_and_4d(tmp_path):
    b = GGUFBuilder()
    b.add_tensor("scalar", (), QT.F32, struct.pack("<f", 2.5))
    b.add_tensor("four", (2, 3, 1, 2), QT.F32, np.arange(12, dtype=np.float32).tobytes())
    b.write(tmp_path / "s.gguf")
    f = GGUFFile(tmp_path / "s.gguf")
    assert f.tensor("scalar").array().shape == () and float(f.tensor("scalar").array()) == 2.5
    assert f.tensor("four").array().shape == (2, 1, 3, 2)
    assert np.array_equal(f.tensor("four").array().ravel(), np.arange(12, dtype=np.float32))


def test_invalid_utf8_is_kept_not_fatal(tmp_path):
    b = GGUFBuilder()
    b.add(b"key.\xff", VT.STRING, b"val\xfe\xff")
    b.add("tok", VT.ARRAY, (VT.STRING, [b"\xe2\x96", "ok"]))
    b.write(tmp_path / "u.gguf")
    f = GGUFFile(tmp_path / "u.gguf")
    assert f["key.\udcff"] == "val\udcfe\udcff"
    assert f["tok"] == ["\udce2\udc96", "ok"]
    assert f["tok"][0].encode("utf-8", "surrogateescape") == b"\xe2\x96"  # bytes recoverable


# ------------------------------------------------------------------------------------------
# API surface
# ------------------------------------------------------------------------------------------

def test_api_errors_and_access(tmp_path):
    b = GGUFBuilder()
    b.add("general.architecture", VT.STRING, "llama").add("k", VT.UINT32, 7)
    b.add_tensor("w", (4,), QT.F32, np.arange(4, dtype=np.float32).tobytes())
    p = tmp_path / "api.gguf"
    b.write(p)
    assert issubclass(GGUFError, ValueError)
    with open_gguf(p) as f:
        assert f.architecture == "llama" and f.get("k") == 7 and f.get("nope", 3) == 3
        assert "k" in f and "nope" not in f
        with pytest.raises(GGUFError, match="missing metadata key 'nope'"):
            f["nope"]
        with pytest.raises(GGUFError, match="missing tensor 'nope'"):
            f.tensor("nope")
        t = f.tensor("w")
        assert t.type_name == "F32" and t.np_shape == (4,) and t.n_elements == 4
        view = t.array()
    # closing with a live view is allowed; the view stays valid
    assert np.array_equal(view, np.arange(4, dtype=np.float32))
    f.close()  # idempotent


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "does-not-exist.gguf")
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path)


def test_error_names_the_file(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(GGUFError) as ei:
        GGUFFile(p)
    assert str(p) in str(ei.value) and "version 1" in str(ei.value)


# ------------------------------------------------------------------------------------------
# Hypothesis: anything GGUFBuilder writes is read back exactly
# ------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _scalar_strategy(vt):
    if vt in SCALAR_RANGE:
        lo, hi = SCALAR_RANGE[vt]
        return st.integers(lo, hi)
    if vt == VT.BOOL:
        return st.booleans()
    if vt == VT.FLOAT32:
        return st.floats(width=32, allow_nan=True)
    if vt == VT.FLOAT64:
        return st.floats(allow_nan=True)
    return st.text(max_size=20)


_ELEM_TYPES = list(SCALAR_NP) + [VT.STRING]


@st.composite
def _array_value(draw, depth=0):
    et = draw(st.sampled_from(_ELEM_TYPES + ([VT.ARRAY] if depth < 2 else [])))
    if et == VT.ARRAY:
        return VT.ARRAY, draw(st.lists(_array_value(depth + 1), max_size=3))
    return et, draw(st.lists(_scalar_strategy(et), max_size=8))


@st.composite
def _typed_value(draw):
    vt = draw(st.sampled_from(_ELEM_TYPES + [VT.ARRAY]))
    if vt == VT.ARRAY:
        return VT.ARRAY, draw(_array_value())
    return vt, draw(_scalar_strategy(vt))


_TENSOR_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.I8]


@st.composite
def _gguf_spec(draw):
    version = draw(st.sampled_from([2, 3]))
    alignment = draw(st.sampled_from([None, 1, 4, 16, 64, 128]))
    keys = draw(st.lists(st.text(min_size=1, max_size=12), max_size=8, unique=True)
                .filter(lambda ks: "general.alignment" not in ks))
    kvs = [(k, *draw(_typed_value())) for k in keys]
    names = draw(st.lists(st.text(max_size=10), max_size=5, unique=True))
    tensors = []
    for n in names:
        t = draw(st.sampled_from(_TENSOR_TYPES))
        block = GGML_QUANT_SIZES[t][0]
        ne = [block * draw(st.integers(1, 3))] + draw(st.lists(st.integers(1, 3), max_size=3))
        nb = tensor_nbytes(ne, t)
        tensors.append((n, tuple(ne), t, draw(st.binary(min_size=nb, max_size=nb))))
    return version, alignment, kvs, tensors


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_gguf_spec())
def test_roundtrip_hypothesis(tmp_path_factory, spec):
    version, alignment, kvs, tensors = spec
    b = GGUFBuilder(version=version, alignment=alignment)
    for k, vt, v in kvs:
        b.add(k, vt, v)
    for name, ne, t, data in tensors:
        b.add_tensor(name, ne, t, data)
    p = tmp_path_factory.mktemp("rt") / "rt.gguf"
    b.write(p)
    f = GGUFFile(p)
    assert f.version == version and f.alignment == (alignment or 32)
    for k, vt, v in kvs:
        assert f.field_types[k] == vt
        assert_same(f[k], expected(vt, v), k)
    assert list(f.tensors) == [n for n, *_ in tensors]
    for name, ne, t, data in tensors:
        ti = f.tensor(name)
        assert ti.shape == ne and ti.ggml_type == t and ti.data.tobytes() == data
        assert ti.offset % (alignment or 32) == 0


def _string_array_file(path, strings: list, cut: int = 0):
    """A GGUF with no tensors and one key: a string array (raw bytes per string)."""
    key = b"tokenizer.ggml.tokens"
    body = b"".join(struct.pack("<Q", len(s)) + s for s in strings)
    raw = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
           + struct.pack("<IIQ", VT.ARRAY, VT.STRING, len(strings)) + body)
    path.write_bytes(raw[:len(raw) - cut] if cut else raw)
    return path


def test_long_string_arrays_one_pass_and_fallbacks(tmp_path):
    """Vocabulary-sized string arrays go through kernels/strings.py; invalid UTF-8 and a truncated
    array take the careful path: the same values, the same error, as for a short array."""
    words = [f"w{i}".encode() for i in range(5000)]
    words[7], words[8], words[9] = "é日本".encode(), b"", " Ġx\n".encode()
    f = GGUFFile(_string_array_file(tmp_path / "ok.gguf", words))
    assert f.metadata["tokenizer.ggml.tokens"] == [w.decode() for w in words]
    f.close()
    bad = list(words)
    bad[4000] = b"a\xffb\xc3"                     # not UTF-8: kept as surrogate escapes
    f = GGUFFile(_string_array_file(tmp_path / "bad.gguf", bad))
    got = f.metadata["tokenizer.ggml.tokens"]
    assert got[4000] == "a\udcffb\udcc3" and got[:4000] == [w.decode() for w in words[:4000]]
    f.close()
    with pytest.raises(GGUFError, match="array 'tokenizer.ggml.tokens': string 4999 of length 5 at offset"):
        GGUFFile(_string_array_file(tmp_path / "cut.gguf", words, cut=3))

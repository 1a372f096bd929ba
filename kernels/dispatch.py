"""Calling the SIMD kernels from ordinary jitted code, by name: ``call(spec, *args)``.

The kernels are numba intrinsics built by factories (``simd.tile_kernel("Q4_0", 4, 4)``, ...), one per
set of compile-time choices. The drivers in matmul.py are ordinary closures made by factories; a
closure could hold the intrinsic object itself, but numba's on-disk cache keys a closure by the pickle
of its cells, and an intrinsic pickles with a random id: every run would miss the cache. So the cells
hold a *spec*, a string naming the factory and its arguments (:func:`spec`), and :func:`call` resolves
it at typing time (the spec reaches it as a string literal) to the factory's intrinsic, whose code is
inlined as before. A spec also carries a hash of the files that build kernel IR (simd.py, arm.py, this
file): numba's cache cannot see a change there, a changed spec string can (the cached driver's key
changes with its cells).

This module imports simd, arm and quants (the registry, for a type name's decoder); none of them imports
it or matmul.py. simd.py imports none of them: its factories take the decoder objects.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from numba import types
from numba.core import cgutils
from numba.core.typing import signature
from numba.extending import intrinsic

from . import arm, quants, simd

SRC_HASH = hashlib.sha1(b"".join(Path(m.__file__).read_bytes() for m in (simd, arm))
                        + Path(__file__).read_bytes()).hexdigest()[:10]



def decoder(type_name: str):
    """The registry's block decoder of a type (kernels/quants.py ``TYPES``, its ``simd`` field)."""
    d = quants.type_info(type_name).simd
    if d is None:
        raise ValueError(f"{type_name} has no SIMD block decoder")
    return d


def repacked(type_name: str):
    """The registry's x16 row-interleaved layout of a type (its ``repacked`` field)."""
    r = quants.type_info(type_name).repacked
    if r is None:
        raise ValueError(f"{type_name} has no repacked layout")
    return r


def _on(lookup, factory):
    """factory(fmt, ...) as a function of the type's name."""
    return lambda type_name, *a, **kw: factory(lookup(type_name), *a, **kw)


# factory name -> the function that builds the intrinsic (all lru_cached: one intrinsic per spec)
FACTORIES = {
    "tile": _on(decoder, simd.tile_kernel),      # native legacy / float blocks, NR x NC tiles
    "ktile": _on(decoder, simd.ktile_kernel),    # native K-quant super-blocks, NR x NC tiles
    "ftile": _on(decoder, simd.ftile_kernel),    # float blocks, 1 x NC tiles of fused multiply-adds
    "kgemv": _on(decoder, simd.kgemv_kernel),    # one K-quant row x one activation row (x86)
    "itile": _on(repacked, simd.interleaved_kernel),    # x16 row-interleaved legacy groups
    "iqtile": _on(repacked, simd.interleaved_quads_kernel),  # x16 legacy groups as u8 x s8 quads
    "kitile": _on(repacked, simd.kinterleaved_kernel),  # x16 row-interleaved K-quant groups
    "quant_row": simd.quantize_row_kernel,       # one activation row -> Q8_0 / Q8_1
    "f16_round": lambda: simd.f32_to_f16_to_f32,  # float32 -> fp16 -> float32
    "arm4": arm.group_kernel,                    # aarch64 4-row groups (sdot / smull)
}


def spec(factory: str, *args, **kw) -> str:
    """The spec string of ``FACTORIES[factory](*args, **kw)`` (plain literals only)."""
    if factory not in FACTORIES:
        raise ValueError(f"unknown kernel factory {factory!r}")
    return repr((factory, args, tuple(sorted(kw.items())), SRC_HASH))


def kernel(spec_str: str):
    """The intrinsic a spec string names."""
    factory, args, kw, _ = ast.literal_eval(spec_str)
    return FACTORIES[factory](*args, **dict(kw))


def make(factory: str, *args, **kw):
    """The intrinsic ``FACTORIES[factory](*args, **kw)`` (type names as strings), for tools and tests."""
    return kernel(spec(factory, *args, **kw))


@intrinsic(prefer_literal=True)
def call(typingctx, spec_t, *args):
    """``call(SPEC, *args)`` in jitted code = the intrinsic :func:`kernel` (SPEC) applied to args;
    SPEC must be a compile-time string (a closure cell or a global)."""
    if not isinstance(spec_t, types.StringLiteral):
        return None
    sig, codegen = kernel(spec_t.literal_value)._defn(typingctx, *args)

    def lower(context, builder, _sig, llargs):
        return codegen(context, builder, sig, cgutils.unpack_tuple(builder, llargs[1]))

    return signature(sig.return_type, spec_t, types.StarArgTuple.from_types(args)), lower

"""Grammar engines side by side: llguidance and xgrammar on tinyinfer's vocabularies.

    python benchmarks/grammar_engines.py [--engines llguidance,xgrammar] [--vocab qwen2.5,gemma3] [--reps 3]

Measures, for each engine that imports:
  * GBNF: do llama.cpp's sample grammars (tests/data/grammars: json, arithmetic, list, yes/no)
    compile, accept a valid text and reject an invalid one (token by token, on the real vocabulary)?
  * JSON Schema: how many of a set of schemas (nested objects, arrays, enums, required, bounds,
    $ref, anyOf, pattern, string lengths, ...) compile and accept a valid instance.
  * time to take the vocabulary (tinyinfer's Tokenizer -> the engine's tokenizer object);
  * time to compute one token mask, per step of a real generation path (the tokens of a valid
    JSON document / arithmetic text), median and p90 over all steps.

xgrammar needs torch + transformers (several GB): the figures in docs/DESIGN-NOTES.md were taken
with it installed in a separate venv (``python -m venv X && X/bin/pip install xgrammar``, then this
script run with X's python and the project on PYTHONPATH). Single-threaded; the machine is shared,
so read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GRAMMARS = ROOT / "tests" / "data" / "grammars"

from tinyinfer.tokenizer import Tokenizer  # noqa: E402

# (name, gbnf file, a valid text, an invalid text)
GBNF_CASES = [
    ("json", "json.gbnf", '{"name": "Ada", "tags": ["x", "y"], "n": -12.5e3, "ok": true}', '{"name": Ada}'),
    ("arithmetic", "arithmetic.gbnf", "alpha *(beta +12)= 7\ntotal -3 = x\n", "x = 3 +\n"),
    ("list", "list.gbnf", "- apples\n- pears\n", "* apples\n"),
    ("yes/no", "yesno.gbnf", "yes", "maybe"),
]

SCHEMAS = [
    ("nested object + required", {"type": "object", "properties": {
        "name": {"type": "string"}, "address": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string"}}, "required": ["city"]}},
        "required": ["name", "address"]}, {"name": "Ada", "address": {"city": "London"}}),
    ("array of objects, minItems/maxItems", {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}}, [{"id": 1}, {"id": 2}]),
    ("enum", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
              "required": ["color"]}, {"color": "green"}),
    ("numbers with bounds", {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}, "required": ["age", "score"]},
     {"age": 42, "score": 0.5}),
    ("string length + pattern", {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "nick": {"type": "string", "minLength": 2, "maxLength": 8}}, "required": ["code", "nick"]},
     {"code": "ABC-12", "nick": "ada"}),
    ("$ref / $defs", {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"},
                                                                      "y": {"type": "number"}},
                                       "required": ["x", "y"]}},
                      "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
                      "required": ["a", "b"]}, {"a": {"x": 1, "y": 2}, "b": {"x": 0.5, "y": -1}}),
    ("anyOf", {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "string"}]}},
               "required": ["v"]}, {"v": "s"}),
    ("const + additionalProperties false", {"type": "object", "properties": {"kind": {"const": "point"}},
                                            "required": ["kind"], "additionalProperties": False},
     {"kind": "point"}),
    ("recursive tree", {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["v"]}}, "$ref": "#/$defs/node"}, {"v": 1, "kids": [{"v": 2}]}),
    ("format date-time", {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}},
                          "required": ["at"]}, {"at": "2026-11-30T20:00:00Z"}),
    ("oneOf", {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                          "additionalProperties": False},
                         {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"],
                          "additionalProperties": False}]}, {"b": "x"}),
    ("tool call (OpenAI function parameters)", {"type": "object", "properties": {
        "name": {"const": "get_weather"}, "arguments": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}, "required": ["name", "arguments"]},
     {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}),
]

MASK_DOC = json.dumps({"name": "Ada Lovelace", "born": 1815, "fields": ["mathematics", "computing"],
                       "address": {"city": "London", "zip": "W1"}, "notes": "wrote the first program"})


def load_vocab(name: str) -> Tokenizer:
    from tinyinfer.fetch import fetch
    return Tokenizer.from_file(fetch(name))


# -- engines ----------------------------------------------------------------------------------------

class LLGuidance:
    name = "llguidance"

    def __init__(self):
        import llguidance
        from tinyinfer import grammar
        self.llg, self.g = llguidance, grammar
        self.version = llguidance.__version__

    def vocab(self, tok):
        self.g._LLTOK.pop(tok, None)
        self.tok = tok
        self.lt = self.g.ll_tokenizer(tok)

    def gbnf(self, text):
        return self.g.Grammar.from_string(text).spec

    def schema(self, schema):
        return self.g.Grammar.from_json_schema(schema).spec

    def matcher(self, spec):
        m = self.llg.LLMatcher(self.lt, spec, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def mask(self, m):
        return m.compute_bitmask()

    def accept(self, m, t):
        return m.consume_token(t)

    def done(self, m):
        return m.is_accepting()


class LLGuidanceStock(LLGuidance):
    """llguidance with its own GBNF converter (terminal-only rules become greedy lexemes)."""
    name = "llguidance-stock"

    def gbnf(self, text):
        return self.llg.grammar_from("gbnf", text)


class XGrammar:
    name = "xgrammar"

    def __init__(self):
        import xgrammar
        self.xgr = xgrammar
        from importlib.metadata import version
        self.version = version("xgrammar")

    def vocab(self, tok):
        xgr = self.xgr
        special = tok.special_ids
        enc = [tok.token_to_bytes(i, special=True) if i not in special else b"" for i in range(tok.n_vocab)]
        self.tok = tok
        info = xgr.TokenizerInfo(enc, vocab_type=xgr.VocabType.RAW, vocab_size=tok.n_vocab,
                                 stop_token_ids=sorted(tok.eog_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, tok.n_vocab)

    def gbnf(self, text):
        return self.compiler.compile_grammar(text)

    def schema(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                 separators=(", ", ": "))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, m):
        m.fill_next_token_bitmask(self.bitmask)

    def accept(self, m, t):
        return m.accept_token(t)

    def done(self, m):
        # it can end here when it takes a stop token now
        return m.is_terminated() or m.accept_token(min(self.tok.eog_ids))


ENGINES = {"llguidance": LLGuidance, "llguidance-stock": LLGuidanceStock, "xgrammar": XGrammar}


# -- checks --------------------------------------------------------------------------------------------

def run_text(eng, spec, tok, text):
    """Feed ``text``'s tokens through a matcher; True if every token is accepted and it can end there."""
    m = eng.matcher(spec)
    for t in tok.encode(text, add_bos=False):
        eng.mask(m)
        if not eng.accept(m, t):
            return False
    return bool(eng.done(m))


def mask_times(eng, spec, tok, text):
    m = eng.matcher(spec)
    out = []
    for t in tok.encode(text, add_bos=False):
        t0 = time.perf_counter()
        eng.mask(m)
        out.append((time.perf_counter() - t0) * 1000)
        if not eng.accept(m, t):
            raise RuntimeError("path rejected")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="llguidance,xgrammar")
    ap.add_argument("--vocab", default="qwen2.5,gemma3")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    print(f"# grammar engines, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, 1 thread, shared 2-core machine")
    for ename in a.engines.split(","):
        try:
            eng = ENGINES[ename]()
        except ImportError as e:
            print(f"\n## {ename}: not importable ({e})")
            continue
        print(f"\n## {ename} ({eng.version})")
        for vname in a.vocab.split(","):
            tok = load_vocab(vname)
            t0 = time.perf_counter()
            eng.vocab(tok)
            t_vocab = time.perf_counter() - t0
            print(f"\n### vocabulary {vname} ({tok.n_vocab} tokens): taken in {t_vocab:.2f} s")
            ok_g = 0
            for name, fn, good, bad in GBNF_CASES:
                text = (GRAMMARS / fn).read_text()
                try:
                    t0 = time.perf_counter()
                    spec = eng.gbnf(text)
                    tc = (time.perf_counter() - t0) * 1000
                    g_ok, b_rej = run_text(eng, spec, tok, good), not run_text(eng, spec, tok, bad)
                    res = f"compiles ({tc:.1f} ms), accepts valid: {g_ok}, rejects invalid: {b_rej}"
                    ok_g += g_ok and b_rej
                except Exception as e:                 # noqa: BLE001 - report any engine failure
                    res = f"FAILS: {str(e).splitlines()[0][:120]}"
                print(f"- GBNF {name}: {res}")
            print(f"- GBNF sample grammars passing: {ok_g}/{len(GBNF_CASES)}")
            ok_s = 0
            for name, schema, inst in SCHEMAS:
                try:
                    t0 = time.perf_counter()
                    spec = eng.schema(schema)
                    tc = (time.perf_counter() - t0) * 1000
                    # the instance as the engine's compact separators write it
                    text = json.dumps(inst, separators=(", ", ": "))
                    r = run_text(eng, spec, tok, text)
                    res = f"compiles ({tc:.1f} ms), accepts instance: {r}"
                    ok_s += bool(r)
                except Exception as e:                 # noqa: BLE001
                    res = f"FAILS: {str(e).splitlines()[0][:120]}"
                print(f"- schema {name}: {res}")
            print(f"- JSON schemas passing: {ok_s}/{len(SCHEMAS)}")
            for label, spec_fn, text in (
                    ("JSON schema (object)", lambda: eng.schema({"type": "object"}), MASK_DOC),
                    ("GBNF json.gbnf", lambda: eng.gbnf((GRAMMARS / "json.gbnf").read_text()), MASK_DOC),
                    ("GBNF arithmetic", lambda: eng.gbnf((GRAMMARS / "arithmetic.gbnf").read_text()),
                     "alpha *(beta +12)/gamma_2 = 7\ntotal -alpha = (x -3)\n")):
                times = []
                try:
                    spec = spec_fn()
                    for _ in range(a.reps):
                        times += mask_times(eng, spec, tok, text)
                except Exception as e:                 # noqa: BLE001
                    print(f"- mask per step, {label}: n/a ({str(e).splitlines()[0][:100]})")
                    continue
                times.sort()
                print(f"- mask per step, {label}: median {statistics.median(times):.3f} ms, "
                      f"p90 {times[int(0.9 * (len(times) - 1))]:.3f} ms, max {times[-1]:.3f} ms "
                      f"({len(times)} steps)")


if __name__ == "__main__":
    main()

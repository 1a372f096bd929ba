"""Constrained decoding on llguidance: GBNF / Lark grammars, JSON schemas, token masks.

We do not write a grammar engine: `llguidance <https://github.com/guidance-ai/llguidance>`_
(Rust, one dependency-free wheel per platform, aarch64 included) compiles the grammar and
computes, for each step, the set of tokens that keep the output inside it. This module only
adapts it to tinyinfer (the choice and the measurements: docs/DESIGN-NOTES.md)::

    Grammar             what the output must match (immutable, shareable, validated on creation)
      .from_string      llama.cpp GBNF (or Lark)            -- llama-cli --grammar / --grammar-file
      .from_json_schema a JSON schema (compact JSON)         -- --json-schema, response_format, format
      .json_object      any JSON object (compact)           -- json_object mode, ollama format "json"
    GrammarMatcher      one generation's state: mask(), accept(token)  (Sampler runs it)
    json_closer(text)   the shortest text that makes a JSON prefix parse (budget steering)

The vocabulary is handed over once per tokenizer as the bytes of every token
(``Tokenizer.token_to_bytes``), control tokens prefixed with 0xFF as llguidance expects,
and the end-of-generation ids as its EOS set; that conversion is cached.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from typing import Optional, Union

import numpy as np

__all__ = ["Grammar", "GrammarError", "GrammarMatcher", "json_closer", "COMPACT_JSON", "grammar_for_response_format",
           "grammar_for_ollama_format"]

#: JSON output without free whitespace: ", " and ": " separators (as json.dumps writes), nothing else.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar or JSON schema that cannot be used (the message is one line naming the problem)."""


def _llg():
    try:
        import llguidance
    except ImportError as e:       # pragma: no cover - it is a dependency
        raise GrammarError("grammars need the llguidance package: pip install llguidance") from e
    return llguidance


def _one_line(msg: str) -> str:
    lines = [x.strip() for x in str(msg).strip().splitlines() if x.strip()]
    return "; ".join(lines)[:500] or "invalid grammar"


class Grammar:
    """A constraint on the generated text. Build one with a ``from_*`` constructor.

    ``kind`` is "gbnf", "lark", "json_schema" or "json_object"; ``is_json`` says the output is
    one JSON value (the generation loop then keeps a reply closable within ``max_tokens``).
    """

    def __init__(self, spec: str, kind: str, source: str = "", schema: Optional[dict] = None):
        self.spec, self.kind, self.source, self.schema = spec, kind, source, schema
        err = _llg().LLMatcher.validate_grammar(spec)
        if err:
            raise GrammarError(f"invalid {_KIND_NAMES.get(kind, kind)}: {_one_line(err)}")

    @property
    def is_json(self) -> bool:
        return self.kind in ("json_schema", "json_object")

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def from_string(cls, grammar: str, verbose: bool = False) -> "Grammar":
        """llama.cpp GBNF (``root ::= ...``) or a Lark grammar (``start: ...``)."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError("the grammar is empty")
        llg = _llg()
        from llguidance.gbnf_to_lark import gbnf_to_lark, is_lark_syntax
        if is_lark_syntax(grammar) or "::=" not in grammar:
            return cls(llg.LLMatcher.grammar_from_lark(grammar), "lark", grammar)
        try:
            lark = _parser_level(gbnf_to_lark(grammar))
        except Exception as e:          # noqa: BLE001 - the converter raises bare Exceptions
            raise GrammarError(f"invalid GBNF grammar: {_one_line(e)}") from None
        return cls(llg.LLMatcher.grammar_from_lark(lark), "gbnf", grammar)

    @classmethod
    def from_file(cls, path, verbose: bool = False) -> "Grammar":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise GrammarError(f"cannot read grammar file {path}: {e.strerror}") from None
        return cls.from_string(text, verbose)

    @classmethod
    def from_json_schema(cls, schema: Union[str, dict], verbose: bool = False) -> "Grammar":
        """Output that validates against ``schema`` (a dict or its JSON text), written compactly."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        try:
            spec = _llg().LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {_one_line(e)}") from None
        return cls(spec, "json_schema", json.dumps(schema), schema)

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (ollama's format "json", OpenAI's json_object), written compactly."""
        g = cls.from_json_schema({"type": "object"})
        g.kind = "json_object"
        return g

    def matcher(self, tokenizer, n_vocab: Optional[int] = None) -> "GrammarMatcher":
        return GrammarMatcher(self, tokenizer, n_vocab)

    def __repr__(self) -> str:
        src = self.source if len(self.source) < 60 else self.source[:57] + "..."
        return f"Grammar({self.kind}, {src!r})"


# Lark text, split so that rule names can be told from strings, regexes, classes and comments
_LARK_PIECE = re.compile(r'//[^\n]*|"(?:[^"\\\n]|\\.)*"i?|/(?:[^/\\\n]|\\.)+/[imsx]*|\[(?:[^\]\\]|\\.)*\]'
                         r'|[A-Za-z_][A-Za-z0-9_]*|.', re.S)


def _parser_level(lark: str) -> str:
    """llguidance's GBNF converter turns every rule made only of terminals into a lexeme
    (UPPER_CASE), and its lexer is greedy: ``num ::= [0-9]+ ws`` followed by ``"\\n"`` then
    swallows the newline into ``ws`` and can never end the line (llama.cpp's arithmetic.gbnf).
    llama.cpp matches GBNF character by character, so we rename those lexemes back into
    parser rules: same language as llama.cpp, each character class a one-character lexeme."""
    out = []
    for m in _LARK_PIECE.finditer(lark):
        t = m.group(0)
        if t[0].isupper() and t.replace("_", "").isalnum() and t.upper() == t:
            t = "t_" + t.lower()
        out.append(t)
    return "".join(out)


_KIND_NAMES = {"gbnf": "GBNF grammar", "lark": "Lark grammar", "json_schema": "JSON schema",
               "json_object": "JSON schema"}


# -- the vocabulary, as llguidance takes it ------------------------------------------------------

_LLTOK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LLTOK_LOCK = threading.Lock()


class _Vocab:
    """What ``llguidance.TokenizerWrapper`` reads: token bytes, EOS/BOS, special ids, encode."""

    def __init__(self, tokenizer):
        special = tokenizer.special_ids
        self.tokens = [(b"\xff" + tokenizer.token_to_bytes(i, special=True)) if i in special
                       else tokenizer.token_to_bytes(i) for i in range(tokenizer.n_vocab)]
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eog_ids)
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(special)
        self._tok = tokenizer

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tok.encode(text, add_bos=False, special=False)


def ll_tokenizer(tokenizer, n_vocab: Optional[int] = None):
    """llguidance's view of ``tokenizer`` (built once per tokenizer and vocabulary size: ~1 s for 150k tokens)."""
    n_vocab = int(n_vocab or tokenizer.n_vocab)
    with _LLTOK_LOCK:
        per = _LLTOK.setdefault(tokenizer, {})
        lt = per.get(n_vocab)
        if lt is None:
            llg = _llg()
            eos = sorted(tokenizer.eog_ids) or None
            lt = per[n_vocab] = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tokenizer)), n_vocab=n_vocab,
                                                eos_token=eos)
        return lt


class GrammarMatcher:
    """One generation's position in a grammar.

    ``mask()`` -> bool array over the vocabulary (True = allowed next); ``accept(token)`` advances.
    A token the grammar does not allow (forced by the caller) ends the constraint: ``dead`` is
    then True and ``mask()`` returns None (no constraint).
    """

    def __init__(self, grammar: Grammar, tokenizer, n_vocab: Optional[int] = None):
        self.grammar = grammar
        self.n_vocab = int(n_vocab or tokenizer.n_vocab)
        self._m = _llg().LLMatcher(ll_tokenizer(tokenizer, self.n_vocab), grammar.spec, log_level=0)
        if self._m.is_error():
            raise GrammarError(f"invalid {_KIND_NAMES.get(grammar.kind, grammar.kind)}: "
                               f"{_one_line(self._m.get_error())}")
        self.dead = False

    def mask(self) -> Optional[np.ndarray]:
        if self.dead:
            return None
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, count=self.n_vocab, bitorder="little").view(bool)

    def accept(self, token: int) -> bool:
        if self.dead:
            return False
        if not self._m.consume_token(int(token)):
            self.dead = True
            return False
        return True

    def is_accepting(self) -> bool:
        return not self.dead and self._m.is_accepting()

    def is_stopped(self) -> bool:
        return not self.dead and self._m.is_stopped()


# -- JSON that parses within the budget ------------------------------------------------------------

_LITERALS = ("true", "false", "null")


def json_closer(text: str) -> Optional[str]:
    """The shortest text that, appended to the JSON prefix ``text``, makes it parse
    ("" when it already does); None when ``text`` is not a JSON prefix.

    Open strings are closed, a dangling key gets ``:null``, a dangling comma a placeholder
    (``"":null`` in an object, ``null`` in an array), partial numbers and literals are
    completed, then every open array and object is closed."""
    stack = []        # per open container: [kind "{" or "[", expect]  expect: key colon value next
    top_done = False
    i, n = 0, len(text)
    lex = None        # None, "str", "num", "lit"
    buf = ""          # the current lexeme (numbers, literals) or the string's escape state
    is_key = False
    esc = 0           # 0: none; 1: after backslash; 2..5: \\u digits still expected (5 = 4 left)

    def value_done():
        nonlocal top_done
        if stack:
            stack[-1][1] = "next"
        else:
            top_done = True

    def finish_num(s):
        return s[-1].isdigit()

    while i < n:
        c = text[i]
        if lex == "str":
            if esc == 1:
                if c == "u":
                    esc = 5
                elif c in '"\\/bfnrt':
                    esc = 0
                else:
                    return None
            elif esc > 1:
                if c not in "0123456789abcdefABCDEF":
                    return None
                esc = esc - 1 if esc > 2 else 0
            elif c == "\\":
                esc = 1
            elif c == '"':
                lex = None
                if is_key:
                    stack[-1][1] = "colon"
                else:
                    value_done()
            i += 1
            continue
        if lex == "num":
            if c in "0123456789+-.eE":
                buf += c
                i += 1
                continue
            if not finish_num(buf):
                return None
            lex = None
            value_done()
            continue
        if lex == "lit":
            buf += c
            if not any(w.startswith(buf) for w in _LITERALS):
                return None
            if buf in _LITERALS:
                lex = None
                value_done()
            i += 1
            continue
        i += 1
        if c in " \t\n\r":
            continue
        expect = stack[-1][1] if stack else ("done" if top_done else "value")
        if expect == "done":
            return None
        if c == ",":
            if expect != "next":
                return None
            stack[-1][1] = "key," if stack[-1][0] == "{" else "value,"
        elif c == ":":
            if expect != "colon":
                return None
            stack[-1][1] = "value"
        elif c in "}]":
            if not stack or stack[-1][0] != ("{" if c == "}" else "["):
                return None
            if expect not in ("next", "key" if c == "}" else "value"):
                return None
            if expect == "value" and stack[-1][0] == "{":
                return None
            stack.pop()
            value_done()
        elif expect in ("key", "key,"):
            if c != '"':
                return None
            lex, is_key, esc = "str", True, 0
        elif expect in ("value", "value,"):
            if c in "{[":
                value_done()           # the parent sees one value, complete once this closes
                stack.append([c, "key" if c == "{" else "value"])
            elif c == '"':
                lex, is_key, esc = "str", False, 0
            elif c in "-0123456789":
                lex, buf = "num", c
            elif c in "tfn":
                lex, buf = "lit", c
            else:
                return None
        else:
            return None
    out = ""
    if lex == "str":
        out += ["", "n", "0", "00", "000", "0000"][esc] + '"'
        if is_key:
            stack[-1][1] = "colon"
        else:
            value_done()
    elif lex == "num":
        if buf[-1] in "-+.eE":
            out += "0"
        value_done()
    elif lex == "lit":
        out += next(w for w in _LITERALS if w.startswith(buf))[len(buf):]
        value_done()
    if not stack and not top_done:
        return out + "{}"
    for kind, expect in reversed(stack):
        if expect == "key,":
            out += '"":null'
        elif expect == "colon":
            out += ":null"
        elif expect in ("value,",) or (expect == "value" and kind == "{"):
            out += "null"
        out += "}" if kind == "{" else "]"
    return out


# -- request shapes -> grammars (library and server share these) -------------------------------------

def grammar_for_response_format(rf) -> Optional[Grammar]:
    """OpenAI / llama-cpp-python ``response_format`` -> Grammar (None for plain text).

    ``{"type": "text"}``; ``{"type": "json_object"}`` (any JSON object; llama-cpp-python also takes
    a ``"schema"`` here); ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...},
    "strict": true}}``. The schema is always enforced, ``strict`` or not."""
    if rf is None:
        return None
    if hasattr(rf, "model_dump"):
        rf = rf.model_dump(by_alias=True, exclude_none=True)
    if not isinstance(rf, dict):
        raise GrammarError(f"response_format must be an object, got {type(rf).__name__}")
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = rf.get("schema")
        return Grammar.from_json_schema(schema) if schema else Grammar.json_object()
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if schema is None:
            schema = rf.get("schema")
        if schema is None:
            raise GrammarError("response_format json_schema needs json_schema.schema (the JSON schema)")
        return Grammar.from_json_schema(schema)
    raise GrammarError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


def grammar_for_ollama_format(fmt) -> Optional[Grammar]:
    """ollama's ``format``: "json" (any JSON object) or a JSON schema object."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return Grammar.json_object()
    if isinstance(fmt, dict):
        return Grammar.from_json_schema(fmt)
    raise GrammarError('format must be "json" or a JSON schema object')

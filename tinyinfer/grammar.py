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
        from llguidance.gbnf_to_lark import is_lark_syntax
        if is_lark_syntax(grammar) or "::=" not in grammar:
            return cls(llg.LLMatcher.grammar_from_lark(grammar), "lark", grammar)
        try:
            lark = _gbnf_to_lark(grammar)
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


def _gbnf_to_lark(text: str) -> str:
    """GBNF -> llguidance Lark with llama.cpp's meaning.

    llguidance's converter turns every rule made only of terminals into a lexeme, and its lexer is
    greedy: in llama.cpp's arithmetic.gbnf ``num ::= [0-9]+ ws`` (``ws ::= [ \t\n]*``) is followed by
    ``"\n"``, so the lexeme swallows the newline and a line can never end. llama.cpp matches GBNF
    character by character. So we keep a lexeme only where greediness cannot change the language
    (the characters that could extend a complete match of it cannot start what may follow it), and
    turn the others back into parser rules (each character class then a one-character lexeme).
    json.gbnf keeps its lexemes (fast masks); arithmetic.gbnf loses those that end in ``ws``."""
    from llguidance import gbnf_to_lark as g2l
    rules = g2l.GrammarParser().parse(text)
    g2l.resolve(rules)
    try:
        demote = _greedy_conflicts(rules, g2l)
    except Exception:                    # noqa: BLE001 - analysis failed: every rule at parser level
        demote = {r.name for r in rules.values() if r.rule_is_terminal}
    for r in list(rules.values()):
        if r.name in demote:
            r.rule_is_terminal = False
            r.name = "t_" + r.name.lower()
    out = "%llguidance {}\n\n"
    for r in sorted(rules.values(), key=lambda r: r.order):
        out += str(r) + "\n\n"
    return out


# characters the analysis looks at (ASCII and a few others); a class is known by what it matches of these
_PROBE = [chr(i) for i in range(128)] + ["\x85", "\xa0", "\xe9", "\u2028", "\u2029", "\u20ac", "\U0001F600"]
_ALL = frozenset(_PROBE)


def _greedy_conflicts(rules: dict, g2l) -> set:
    """Names of the lexemes whose greedy matching could differ from llama.cpp's (closed upward: a
    lexeme that uses a demoted one is demoted too, and the analysis is redone until nothing moves)."""
    Lit, Rx, Ref, Rep, Seq, Alt = (g2l.LiteralNode, g2l.RegexNode, g2l.RuleRefNode, g2l.RepetitionNode,
                                   g2l.SequenceNode, g2l.AlternativeNode)

    def lit(node):
        try:
            return json.loads('"' + node.value + '"')
        except ValueError:
            return None

    memo_null, memo_first = {}, {}

    def nullable(n, seen=()):
        if isinstance(n, Lit):
            return lit(n) == ""
        if isinstance(n, Rx):
            return False
        if isinstance(n, Rep):
            return n.min_times == 0 or nullable(n.node, seen)
        if isinstance(n, Seq):
            return all(nullable(c, seen) for c in n.nodes)
        if isinstance(n, Alt):
            return any(nullable(c, seen) for c in n.alternatives)
        if isinstance(n, Ref):
            t = n.target
            if t.name in seen:
                return False
            if t.name not in memo_null:
                memo_null[t.name] = nullable(t.alternatives, seen + (t.name,))
            return memo_null[t.name]
        return True

    def first(n, seen=()):
        if isinstance(n, Lit):
            v = lit(n)
            return _ALL if v is None else frozenset(v[:1])
        if isinstance(n, Rx):
            try:
                rx = re.compile(n.rx)
            except re.error:
                return _ALL
            return frozenset(c for c in _PROBE if rx.fullmatch(c))
        if isinstance(n, Rep):
            return first(n.node, seen)
        if isinstance(n, Seq):
            out = set()
            for c in n.nodes:
                out |= first(c, seen)
                if not nullable(c):
                    break
            return frozenset(out)
        if isinstance(n, Alt):
            return frozenset().union(*(first(c, seen) for c in n.alternatives))
        if isinstance(n, Ref):
            t = n.target
            if t.name in seen:
                return frozenset()
            key = t.name
            if key not in memo_first:
                memo_first[key] = first(t.alternatives, seen + (t.name,))
            return memo_first[key]
        return _ALL

    def inner_chars(n):
        """Every character an alternative can hold after its first one (over-approximation)."""
        if isinstance(n, Lit):
            v = lit(n)
            return _ALL if v is None else frozenset(v[1:])
        if isinstance(n, (Rx, Ref)):
            return first(n) if not isinstance(n, Ref) else _ALL
        kids = n.children()
        return frozenset().union(*(first(c) | inner_chars(c) for c in kids)) if kids else frozenset()

    def ext(n):
        """Characters that can continue a complete match of ``n`` into a longer one."""
        if isinstance(n, (Lit, Rx)):
            return frozenset()
        if isinstance(n, Rep):
            e = ext(n.node)
            if n.max_times is None or n.max_times > max(n.min_times, 1) or (n.max_times == 1 and n.min_times == 0):
                e = e | first(n.node)
            return e
        if isinstance(n, Seq):
            out = set()
            for c in reversed(n.nodes):
                out |= ext(c)
                if not nullable(c):
                    break
                out |= first(c)
            return frozenset(out)
        if isinstance(n, Alt):
            out = set().union(*(ext(c) for c in n.alternatives))
            if len(n.alternatives) > 1:
                out |= set().union(*(inner_chars(c) for c in n.alternatives))
                if any(nullable(c) for c in n.alternatives):
                    out |= set().union(*(first(c) for c in n.alternatives))
            return frozenset(out)
        if isinstance(n, Ref):
            return ext(n.target.alternatives)
        return _ALL

    demoted: set = set()
    while True:
        lexeme = {r.name for r in rules.values() if r.rule_is_terminal and r.name not in demoted}
        follow = {name: set() for name in rules}      # of parser-level rules and of lexemes used there
        changed = True

        def walk(n, f):
            nonlocal changed
            if isinstance(n, Seq):
                for c in reversed(n.nodes):
                    walk(c, f)
                    f = first(c) | f if nullable(c) else first(c)
            elif isinstance(n, Alt):
                for c in n.alternatives:
                    walk(c, f)
            elif isinstance(n, Rep):
                walk(n.node, f | first(n.node) if (n.max_times is None or n.max_times > 1) else f)
            elif isinstance(n, Ref):
                name = n.target.name
                if not f <= follow[name]:
                    follow[name] |= f
                    changed = True

        while changed:
            changed = False
            for r in rules.values():
                if r.name not in lexeme:
                    walk(r.alternatives, frozenset(follow[r.name]))
        bad = {x for x in lexeme if follow[x] and ext(rules[x].alternatives) & follow[x]}
        # upward closure: a lexeme that uses a demoted rule cannot stay a lexeme
        grow = True
        while grow:
            grow = False
            for r in rules.values():
                if r.name in lexeme and r.name not in bad and any(
                        isinstance(c, Ref) and c.target.name in (bad | demoted) for c in _nodes(r.alternatives)):
                    bad.add(r.name)
                    grow = True
        if not bad:
            return demoted
        demoted |= bad


def _nodes(n):
    yield n
    for c in n.children():
        yield from _nodes(c)


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
            wrapper = llg.TokenizerWrapper(_Vocab(tokenizer))
            lt = per[n_vocab] = llg.LLTokenizer(wrapper, n_vocab=n_vocab, eos_token=eos)
            wrapper.tokens = wrapper._gtokenizer.tokens = []     # llguidance has its copy: free ours
        return lt


# byte b of a token bitmask -> the 8 additive logits (0 allowed / -inf not) of its tokens, bit 0 first
_BYTE_TO_LOGITS = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") > 0,
                           np.float32(0.0), np.float32(-np.inf)).astype(np.float32)


class GrammarMatcher:
    """One generation's position in a grammar.

    ``mask()`` -> bool array over the vocabulary (True = allowed next), ``logit_mask()`` -> the same
    as 0 / -inf to add to the logits; ``accept(token)`` advances.
    A token the grammar does not allow (forced by the caller) ends the constraint: ``dead`` is
    then True and ``mask()`` / ``logit_mask()`` return None (no constraint).
    """

    def __init__(self, grammar: Grammar, tokenizer, n_vocab: Optional[int] = None):
        self.grammar = grammar
        self.tokenizer = tokenizer
        self.n_vocab = int(n_vocab or tokenizer.n_vocab)
        self._m = _llg().LLMatcher(ll_tokenizer(tokenizer, self.n_vocab), grammar.spec, log_level=0)
        if self._m.is_error():
            raise GrammarError(f"invalid {_KIND_NAMES.get(grammar.kind, grammar.kind)}: "
                               f"{_one_line(self._m.get_error())}")
        self.dead = False
        self.text = b""        # what the accepted tokens spell (the JSON closer reads it)

    def mask(self) -> Optional[np.ndarray]:
        """Allowed next tokens as a bool array (None once the constraint has ended)."""
        if self.dead:
            return None
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, count=self.n_vocab, bitorder="little").view(bool)

    def logit_mask(self) -> Optional[np.ndarray]:
        """The same as an additive float32 vector: 0 where allowed, -inf elsewhere (what the sampler
        adds to the logits). Built byte by byte from a 256 x 8 table: ~4x faster than np.where over a
        bool mask on 152k tokens."""
        if self.dead:
            return None
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        if not bits.any():
            raise ValueError("the grammar allows no token here")
        return _BYTE_TO_LOGITS[bits].reshape(-1)[:self.n_vocab]

    def accept(self, token: int) -> bool:
        if self.dead:
            return False
        if not self._m.consume_token(int(token)):
            self.dead = True
            return False
        self.text += self.tokenizer.token_to_bytes(int(token))
        return True

    def is_accepting(self) -> bool:
        return not self.dead and self._m.is_accepting()

    def is_stopped(self) -> bool:
        return not self.dead and self._m.is_stopped()

    def closing(self, limit: int, after: Optional[int] = None) -> Optional[list]:
        """Tokens that take the output from here (or from here plus the token ``after``) to an end the
        grammar accepts, in at most ``limit`` tokens; None when none is found within ``limit`` (or the
        constraint has ended, or ``after`` is not allowed). The state itself is not changed.

        Greedy and short, never hand-written: at each step the tokens the grammar forces
        (``compute_ff_tokens``: a required member's key, a separator), else (JSON grammars) the first
        token of the syntactic end (``json_closer``) if the grammar allows it, else the first allowed of
        a few closing pieces (``"}``, ``}``, ``]``, ``"``, ``,``, ``0``, ``null`` ...), else the shortest
        allowed token that is not whitespace. So a schema's required members are written, a forbidden
        key never is, and a JSON reply cut short by its budget still parses (engine's JSON budget)."""
        if self.dead:
            return None
        m = self._m.deep_copy()
        text = self.text
        if after is not None:
            if not m.consume_token(int(after)):
                return None
            text += self.tokenizer.token_to_bytes(int(after))
        pieces = _closing_tables(self.tokenizer, self.n_vocab, "pieces")
        out: list = []
        while len(out) <= limit:
            if m.is_accepting():
                return out
            if m.is_stopped() or m.is_error():
                return None
            ff = m.compute_ff_tokens()
            if not ff and self.grammar.is_json:      # the syntactic end's first token, or its first characters'
                tail = json_closer(text.decode("utf-8", "ignore")) or ""
                for k in range(len(tail), 0, -1) if len(tail) <= 4 else (len(tail), 3, 2, 1):
                    first = self.tokenizer.encode(tail[:k], add_bos=False, special=False)[:1]
                    if first and m.validate_tokens(first) == 1:
                        ff = first
                        break
            if not ff:
                ff = [next((t for t in pieces if m.validate_tokens([t]) == 1), -1)]
                if ff[0] < 0:      # none of the pieces: the shortest allowed token (whitespace excluded)
                    bits = np.frombuffer(m.compute_bitmask(), dtype=np.uint8)
                    allowed = np.unpackbits(bits, count=self.n_vocab, bitorder="little").view(bool)
                    if not allowed.any():
                        return None
                    lengths = _closing_tables(self.tokenizer, self.n_vocab, "lengths")
                    ff = [int(np.argmin(np.where(allowed, lengths, np.iinfo(np.int32).max)))]
            for t in ff:
                if len(out) == limit or not m.consume_token(int(t)):
                    return None
                out.append(int(t))
                text += self.tokenizer.token_to_bytes(int(t))
        return None


# -- JSON that parses within the budget ------------------------------------------------------------

# short texts that close or complete a JSON value, in the order the closer tries them
_CLOSING_PIECES = ('"}}', '"}]}', '"}]', '"]}', '"}', '"]', '"', '}}]}', '}]}', '}]', ']}', '}}', '}', ']', ',',
                   '0', '""', 'null', 'false', '[]', '{}', '[', '{')
_CLOSE_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _closing_tables(tokenizer, n_vocab: int, what: str):
    """Built once per tokenizer: ``"pieces"``, the ids of the closing pieces that are one token in this
    vocabulary; ``"lengths"``, each token's byte length, whitespace-only, special and end tokens made
    too long to pick (~0.2 s for 150k tokens, so only when a closer first needs it)."""
    with _LLTOK_LOCK:
        per = _CLOSE_TABLES.setdefault(tokenizer, {})
        t = per.get((n_vocab, what))
        if t is None and what == "pieces":
            t = []
            for p in _CLOSING_PIECES:
                enc = tokenizer.encode(p, add_bos=False, special=False)
                if len(enc) == 1 and enc[0] not in t:
                    t.append(enc[0])
        elif t is None:
            special = set(tokenizer.special_ids) | set(tokenizer.eog_ids)
            t = np.full(n_vocab, np.iinfo(np.int32).max, np.int64)
            for i in range(min(n_vocab, tokenizer.n_vocab)):
                b = tokenizer.token_to_bytes(i)
                if i not in special and b.strip():
                    t[i] = len(b)
        per[(n_vocab, what)] = t
        return t

_LITERALS = ("true", "false", "null")


def json_closer(text: str, invent: bool = True) -> Optional[str]:
    """The shortest text that, appended to the JSON prefix ``text``, makes it parse
    ("" when it already does); None when ``text`` is not a JSON prefix.

    Open strings are closed, a dangling key gets ``:null``, a dangling comma a placeholder
    (``"":null`` in an object, ``null`` in an array), partial numbers and literals are
    completed, then every open array and object is closed. With ``invent`` False, a prefix that
    would need a placeholder, a ``null`` value or the end of a key gives None instead."""
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
    if not invent and ((lex == "str" and is_key) or any(
            e in ("key,", "colon", "value,") or (e == "value" and k == "{") for k, e in stack)):
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
    "strict": true}}`` (without a schema: any JSON value, as llama-server). The schema is always
    enforced, ``strict`` or not."""
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
        # no schema: any JSON value, as llama-server (its schema defaults to {})
        return Grammar.from_json_schema(schema if schema is not None else {})
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

"""Constrained decoding (tinyinfer/grammar.py on llguidance): llama.cpp's sample grammars through the
library and the CLI, JSON schemas through ``response_format``, JSON closed within ``max_tokens``.

Oracles are independent of the engine: ``json.loads`` and ``jsonschema`` for JSON, the ``lark``
package (Earley) for arithmetic.gbnf, regular expressions for the list and yes/no grammars.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tinyinfer.grammar import Grammar, GrammarError, json_closer

ROOT = Path(__file__).resolve().parent.parent
GRAMMARS = ROOT / "tests" / "data" / "grammars"

# llama.cpp's arithmetic.gbnf, written for lark by hand (character-level, so ws may hold newlines)
ARITH_LARK = r"""
start: line+
line: expr "=" ws term NL
expr: term (OP term)*
term: ident | num | "(" ws expr ")" ws
ident: LC (LC | DIGIT | "_")* ws
num: DIGIT+ ws
ws: WSCH*
NL: "\n"
OP: /[-+*\/]/
LC: /[a-z]/
DIGIT: /[0-9]/
WSCH: /[ \t\n]/
"""
LIST_PREFIX = re.compile(r"(- [^\r\n\x0b\x0c\x85\u2028\u2029]+\n)*(- ?[^\r\n\x0b\x0c\x85\u2028\u2029]*)?\Z")


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from tinyinfer import Llama
    return Llama(str(smollm2_path), n_ctx=512, n_threads=1, verbose=False, seed=7)


def _arith_parser():
    lark = pytest.importorskip("lark")
    return lark.Lark(ARITH_LARK, parser="earley", lexer="dynamic")


def _arith_prefix_ok(parser, text: str) -> bool:
    """True if some short completion of ``text`` is in arithmetic.gbnf's language."""
    import lark
    depth = max(0, text.count("(") - text.count(")"))
    for mid in ("", "x", "1"):
        for end in ("", "\n", "=x\n", " =x\n"):
            try:
                parser.parse(text + mid + ")" * depth + end)
                return True
            except lark.exceptions.LarkError:
                pass
    return False


def _gbnf(name: str) -> str:
    return (GRAMMARS / f"{name}.gbnf").read_text()


# --- no model ----------------------------------------------------------------------------------

def test_json_closer_makes_every_prefix_parse():
    rng = random.Random(0)
    docs = [{"a": [1, -2.5e-3, True, False, None, "x\"y\\z\u00e9\\u0041"], "b": {"c": {}, "d": []}},
            [{"k": "line\nbreak", "n": 0, "e": 12E+3}, [[[]]], "s"], {"": ""}]
    for d in docs:
        for text in (json.dumps(d), json.dumps(d, indent=1), json.dumps(d, separators=(",", ":"))):
            for k in range(len(text) + 1):
                tail = json_closer(text[:k])
                assert tail is not None, text[:k]
                json.loads(text[:k] + tail)
            assert json_closer(text) == ""
    for bad in ('{"a" 1', "{]", "{}x", '{"a":}', "[1,]", "'a'", '{"a":tru e}'):
        assert json_closer(bad) is None, bad
    assert len(json_closer('{"a": [{"b": "')) == len('"}]}')
    assert rng   # deterministic


@pytest.mark.parametrize("bad, what", [
    ("root ::= foo", "Rule 'foo' not found"),
    ('root ::= "a', "GBNF"),
    ('item ::= "a"', "root"),
])
def test_invalid_gbnf_is_one_line(bad, what):
    with pytest.raises(GrammarError) as e:
        Grammar.from_string(bad)
    assert what in str(e.value) and "\n" not in str(e.value)


def test_invalid_schema_is_one_line():
    for bad in ('{"type": "objec"}', "{not json", '[1, 2]', {"type": "object", "properties": {"a": {"type": 3}}}):
        with pytest.raises(GrammarError) as e:
            Grammar.from_json_schema(bad)
        assert "schema" in str(e.value).lower() and "\n" not in str(e.value)


def test_all_sample_grammars_compile():
    for name in ("json", "arithmetic", "list", "yesno"):
        g = Grammar.from_string(_gbnf(name))
        assert g.kind == "gbnf" and not g.is_json


# --- the library (Llama + LlamaGrammar), SmolLM2 ---------------------------------------------------

def test_library_sample_grammars(llm):
    from tinyinfer import LlamaGrammar
    parser = _arith_parser()
    runs = {
        "json": ("A JSON object describing a book:\n", 40),
        "arithmetic": ("Some equations:\n", 24),
        "list": ("Shopping list:\n", 24),
        "yesno": ("Is water wet? Answer yes or no:", 4),
    }
    for name, (prompt, n) in runs.items():
        g = LlamaGrammar.from_file(GRAMMARS / f"{name}.gbnf")
        for temp, seed in ((0.0, 0), (0.9, 1), (0.9, 2)):
            out = llm(prompt, grammar=g, max_tokens=n, temperature=temp, seed=seed)
            text, finish = out["choices"][0]["text"], out["choices"][0]["finish_reason"]
            assert text, (name, seed)
            if name == "json":
                value = json.loads(text + json_closer(text)) if finish == "length" else json.loads(text)
                assert isinstance(value, dict), text
            elif name == "arithmetic":
                assert _arith_prefix_ok(parser, text), text
            elif name == "list":
                assert text.startswith("- ") and LIST_PREFIX.match(text), text
            else:
                assert text in ("yes", "no") and finish == "stop", text


SCHEMAS = [
    ("nested objects + required", {
        "type": "object", "properties": {
            "title": {"type": "string", "maxLength": 40},
            "author": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 30}, "born": {"type": "integer"}},
                "required": ["name", "born"], "additionalProperties": False}},
        "required": ["title", "author"], "additionalProperties": False}),
    ("array of strings", {
        "type": "object", "properties": {
            "colors": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 4}},
        "required": ["colors"], "additionalProperties": False}),
    ("enum", {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "angry"]},
                                               "sure": {"type": "boolean"}}, "required": ["mood", "sure"],
             "additionalProperties": False}),
    ("numbers with bounds", {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 1, "maximum": 20},
        "weight": {"type": "number", "minimum": 0.5, "maximum": 9.5}}, "required": ["age", "weight"],
        "additionalProperties": False}),
    ("array of objects", {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "tag": {"enum": ["a", "b"]}}, "required": ["id", "tag"],
        "additionalProperties": False}}),
]


@pytest.mark.parametrize("name, schema", SCHEMAS, ids=[s[0] for s in SCHEMAS])
def test_library_json_schema_replies_validate(llm, name, schema):
    jsonschema = pytest.importorskip("jsonschema")
    rf = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    for temp, seed in ((0.0, 0), (0.8, 3)):
        r = llm.create_chat_completion([{"role": "user", "content": "Describe a cat in JSON."}],
                                       response_format=rf, max_tokens=96, temperature=temp, seed=seed)
        c = r["choices"][0]
        text = c["message"]["content"]
        # (a model may run a number's digits to the budget: then it is closed early, and still validates)
        assert c["finish_reason"] == "stop" or c.get("truncated"), text
        jsonschema.validate(json.loads(text), schema)
        assert "\n" not in text and "  " not in text        # compact


def test_library_json_object_closed_within_max_tokens(llm):
    """20 of 20 short budgets give JSON that parses; cut replies say so."""
    n_cut = 0
    for seed in range(20):
        r = llm.create_chat_completion([{"role": "user", "content": "Describe three cats as JSON."}],
                                       response_format={"type": "json_object"}, max_tokens=12 + seed % 5,
                                       temperature=1.0, seed=seed)
        c = r["choices"][0]
        assert isinstance(json.loads(c["message"]["content"]), dict), c["message"]["content"]
        assert r["usage"]["completion_tokens"] <= 12 + seed % 5
        if c.get("truncated"):
            n_cut += 1
            assert c["finish_reason"] == "length"
    assert n_cut > 0          # such short budgets do cut some replies


# schemas whose replies are cut short by small budgets (issue: a cut reply once got a '"":null' member)
BUDGET_SCHEMAS = [
    {"type": "object", "properties": {k: {"type": "string"} for k in "abc"}, "additionalProperties": False},
    {"type": "object", "properties": {
        "city": {"type": "string"},
        "geo": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                "required": ["lat", "lon"], "additionalProperties": False}},
     "required": ["city", "geo"], "additionalProperties": False},
    {"type": "object", "properties": {
        "pets": {"type": "array", "minItems": 1, "items": {
            "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"], "additionalProperties": False}},
        "owner": {"type": "string"}},
     "required": ["pets"], "additionalProperties": False},
]


def relaxed(schema):
    """``schema`` without what a budget may not allow (required members, minimum counts): what a reply
    closed early must still satisfy, so it holds no forbidden key and no wrongly typed value."""
    if isinstance(schema, dict):
        return {k: relaxed(v) for k, v in schema.items() if k not in ("required", "minItems")}
    return [relaxed(v) for v in schema] if isinstance(schema, list) else schema


def test_json_budget_closed_by_the_grammar(llm):
    """Replies cut by max_tokens 8..48 are closed by the schema's grammar: they always parse, never hold a
    key the schema forbids, and hold every required member whenever the budget can fit the schema's
    shortest document (``GrammarMatcher.closing`` from the start)."""
    jsonschema = pytest.importorskip("jsonschema")
    tok = llm._engine.tokenizer
    n_full = n_cut = 0
    for i, schema in enumerate(BUDGET_SCHEMAS):
        need = len(Grammar.from_json_schema(schema).matcher(tok).closing(512))
        for k, budget in enumerate((8, 12, 16, 20, 24, 28, 32, 40, 48)):
            rf = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
            r = llm.create_chat_completion([{"role": "user", "content": "Reply in JSON."}], response_format=rf,
                                           max_tokens=budget, temperature=0.9, seed=10 * i + k)
            c = r["choices"][0]
            text = c["message"]["content"]
            value = json.loads(text)
            jsonschema.validate(value, relaxed(schema))
            assert '""' not in text.replace('""}', "").replace('""]', "").replace('"",', ""), text  # no empty key
            assert r["usage"]["completion_tokens"] <= budget
            if budget >= need + 2:
                jsonschema.validate(value, schema)
                n_full += 1
            n_cut += bool(c.get("truncated"))
    assert n_full >= 15 and n_cut >= 5


def test_grammar_closing_writes_required_members_only(llm):
    tok = llm._engine.tokenizer
    schema = BUDGET_SCHEMAS[1]
    m = Grammar.from_json_schema(schema).matcher(tok)
    for t in tok.encode('{"city": "Par', add_bos=False, special=False):
        assert m.accept(t)
    end = tok.decode(m.closing(64))
    value = json.loads('{"city": "Par' + end)
    assert value["city"] == "Par" and set(value["geo"]) == {"lat", "lon"}, end
    assert m.closing(3) is None                              # too few tokens for the required members
    assert tok.decode(Grammar.json_object().matcher(tok).closing(8)) == "{}"


def test_grammar_argument_checked(llm):
    with pytest.raises(TypeError):
        llm("x", grammar='root ::= "a"', max_tokens=2)
    with pytest.raises(GrammarError):
        llm.create_chat_completion([{"role": "user", "content": "x"}], response_format={"type": "xml"})


# --- the CLI ---------------------------------------------------------------------------------------

def _cli(smollm2_path, *args):
    return subprocess.run([sys.executable, "-m", "tinyinfer", "-m", str(smollm2_path), "-t", "1", "--no-perf",
                           "--no-display-prompt", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_grammar_flags(smollm2_path, tmp_path):
    r = _cli(smollm2_path, "-p", "Is fire hot? Answer:", "--grammar-file", str(GRAMMARS / "yesno.gbnf"),
             "-n", "4", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") in ("yes", "no")
    r = _cli(smollm2_path, "-p", "Equations:\n", "--grammar-file", str(GRAMMARS / "arithmetic.gbnf"), "-n", "16",
             "-s", "4")
    assert r.returncode == 0, r.stderr
    assert _arith_prefix_ok(_arith_parser(), r.stdout[:-1]), r.stdout
    r = _cli(smollm2_path, "-p", "Groceries:\n", "--grammar", _gbnf("list"), "-n", "16", "-s", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("- ") and LIST_PREFIX.match(r.stdout[:-1]), r.stdout
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = _cli(smollm2_path, "-p", "Answer in JSON:", "-j", json.dumps(schema), "-n", "16", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout)["ok"], bool), r.stdout


def test_cli_bad_grammar_one_line(smollm2_path, tmp_path):
    for args in (["--grammar", "root ::= nope"], ["-j", '{"type": 5}'],
                 ["--grammar-file", str(tmp_path / "missing.gbnf")]):
        r = _cli(smollm2_path, "-p", "x", "-n", "2", *args)
        assert r.returncode == 1
        err = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(err) == 1 and ("grammar" in err[0] or "schema" in err[0]), r.stderr


# --- tool calls: parsing per family, streaming hold-back, forced-call grammars (no model) -------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
LLAMA3_TEMPLATE = "{{ '<|start_header_id|>ipython<|end_header_id|>' }}{% if tools %}parameters{% endif %}"


@pytest.mark.parametrize("template, text, content", [
    ("{% if tools %}<tool_call>{% endif %}",
     'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "Let me check."),
    (LLAMA3_TEMPLATE, '{"name": "get_weather", "parameters": {"city": "Paris"}}', ""),
    (LLAMA3_TEMPLATE, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', ""),
    ("{{ messages }}", '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', ""),
    ("{{ messages }}", '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', ""),
])
def test_tool_calls_parsed_per_family(template, text, content):
    from tinyinfer.toolcall import ToolSet, ToolStream
    ts = ToolSet([WEATHER], None, template)
    got, calls = ts.parse(text)
    assert got == content and len(calls) == 1
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    stream = ToolStream(ts)                 # fed 3 characters at a time, as tokens arrive
    out = "".join(stream.feed(text[i:i + 3]) for i in range(0, len(text), 3))
    rest, scalls = stream.finish()
    assert (out + rest).strip() == content and [c["function"] for c in scalls] == [calls[0]["function"]]


def test_tool_text_that_is_not_a_call_stays_content():
    from tinyinfer.toolcall import ToolSet, ToolStream
    ts = ToolSet([WEATHER], "auto", "<tool_call> tools")
    for text in ('It is sunny {"name": "get_weather"}', '{"a": 1}',
                 '<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>'):
        assert ts.parse(text) == (text, [])
        stream = ToolStream(ts)
        out = "".join(stream.feed(text[i:i + 2]) for i in range(0, len(text), 2))
        rest, calls = stream.finish()
        assert out + rest == text and calls == []


def test_forced_call_grammar_accepts_only_valid_calls(smollm2_path):
    from tinyinfer.tokenizer import Tokenizer
    from tinyinfer.toolcall import ToolSet
    tok = Tokenizer.from_file(smollm2_path)
    for template, good in (("<tool_call> tools", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                                                 '\n</tool_call>'),
                           (LLAMA3_TEMPLATE, '{"name": "get_weather", "parameters": {"city": "Oslo"}}')):
        g = ToolSet([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, template).call_grammar()
        for text, ok in ((good, True), (good.replace("Oslo", '5" '), False), (good.replace("get_weather", "x"), False)):
            m = g.matcher(tok)
            accepted = all(m.accept(t) for t in tok.encode(text, add_bos=False))
            assert (accepted and m.is_accepting()) == ok, text


def test_generic_template_gets_tools_in_a_system_message():
    from tinyinfer.toolcall import ToolSet
    ts = ToolSet([WEATHER], "auto", "{% for m in messages %}{{ m.content }}{% endfor %}")
    msgs = ts.messages([{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "P"}'}}]},
                        {"role": "tool", "tool_call_id": "1", "content": "sunny"}])
    assert msgs[0]["role"] == "system" and "get_weather" in msgs[0]["content"] and ts.template_kwargs() == {}
    assert msgs[2] == {"role": "assistant",
                       "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "P"}}\n</tool_call>'}
    assert msgs[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}


@pytest.mark.parametrize("gbnf, good, bad, lexemes_kept", [
    (_gbnf("json"), ['{"a": [1, "x"]}'], ['{"a" 1}'], True),
    (_gbnf("arithmetic"), ["x = 7\ny = 2\n"], ["x = 7 = 2\n"], False),
    # a greedy lexeme [a-z]+ would swallow the "s" that must follow it
    ('root ::= word "s"\nword ::= [a-z]+', ["cats", "ss"], ["s", "cat"], False),
    # the lexeme could extend past its end into what follows
    ('root ::= num "0"\nnum ::= [0-9] [0-9]?', ["10", "120"], ["1", "1200"], False),
])
def test_gbnf_keeps_llama_cpp_meaning(smollm2_path, gbnf, good, bad, lexemes_kept):
    """Lexemes stay only where llguidance's greedy lexer cannot change the language (fast masks);
    elsewhere rules are matched character by character, as llama.cpp does."""
    from tinyinfer.grammar import _gbnf_to_lark
    from tinyinfer.tokenizer import Tokenizer
    tok = Tokenizer.from_file(smollm2_path)
    lark = _gbnf_to_lark(gbnf)
    assert ("t_" not in lark) == lexemes_kept, lark
    g = Grammar.from_string(gbnf)
    for text, ok in [(t, True) for t in good] + [(t, False) for t in bad]:
        m = g.matcher(tok)
        accepted = all(m.accept(t) for t in tok.encode(text, add_bos=False))
        assert (accepted and m.is_accepting()) == ok, (text, lark)

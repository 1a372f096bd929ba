"""Tool calling: tools into the prompt through the model's own chat template, calls parsed back.

Families (how the model writes a call, told from its chat template):

* ``hermes`` -- Qwen2.5 / Qwen3 / Hermes: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
* ``llama3`` -- Llama 3.1+: the reply is ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``)
* ``generic`` -- a template that does not know tools: the tools and the hermes format are described in
  a system message, and tool results go back as user turns; parsing accepts every shape above.

``tool_choice`` "required" or a named function forces a call through the grammar
(:meth:`ToolSet.call_grammar`): the arguments always validate against the function's parameter schema.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import List, Optional, Tuple

from .grammar import COMPACT_JSON, Grammar, GrammarError

__all__ = ["ToolError", "ToolSet", "ToolStream", "tool_family"]

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)


class ToolError(ValueError):
    """An unsupported or malformed tools / tool_choice request (one line, names the field)."""


def tool_family(template_source: str) -> str:
    src = template_source or ""
    if "<tool_call>" in src:
        return "hermes"
    if "<|python_tag|>" in src or ("ipython" in src and "parameters" in src):
        return "llama3"
    return "generic"


def _uses_tools(template_source: str) -> bool:
    return "tools" in (template_source or "")


def template_caps(template_source: str) -> dict:
    """What a chat template renders, in llama-server's ``chat_template_caps`` names (read from its source:
    the variables and markers it uses), plus ``supports_thinking``."""
    src = template_source or ""
    calls = tool_family(src) != "generic" or "tool_calls" in src
    return {"supports_tools": _uses_tools(src) and calls, "supports_tool_calls": calls,
            "supports_tool_responses": "'tool'" in src or '"tool"' in src or "ipython" in src,
            "supports_system_role": "system" in src,
            "supports_parallel_tool_calls": calls and "for tool_call in" in src,
            "supports_tool_call_id": "tool_call_id" in src,
            "supports_thinking": "enable_thinking" in src or "<think>" in src or "reasoning_content" in src}


class ToolSet:
    """The tools of one request, checked, and what follows from them for one chat template."""

    def __init__(self, tools, tool_choice=None, template_source: str = ""):
        self.tools = self._check_tools(tools)
        self.names = [t["function"]["name"] for t in self.tools]
        self.mode, self.forced = self._check_choice(tool_choice)
        self.family = tool_family(template_source)
        self.template_knows_tools = _uses_tools(template_source) and self.family != "generic"

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.mode != "none"

    # -- checks ------------------------------------------------------------------------------------
    @staticmethod
    def _check_tools(tools) -> list:
        if tools is None:
            return []
        if not isinstance(tools, list):
            raise ToolError("tools must be a list of {type: function, function: {...}} objects")
        out, seen = [], set()
        for i, t in enumerate(tools):
            if not isinstance(t, dict):
                raise ToolError(f"tools[{i}] must be an object")
            kind = t.get("type", "function")
            if kind != "function":
                raise ToolError(f"tools[{i}].type {kind!r} is not supported: only function tools")
            fn = t.get("function")
            if not isinstance(fn, dict):
                raise ToolError(f"tools[{i}].function is missing (expected {{name, description, parameters}})")
            name = fn.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, _ . or -, got {name!r}")
            if name in seen:
                raise ToolError(f"tools[{i}].function.name {name!r} is given twice")
            seen.add(name)
            params = fn.get("parameters")
            if params is None:
                params = {"type": "object", "properties": {}}
            if not isinstance(params, dict):
                raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
            try:
                Grammar.from_json_schema(params)
            except GrammarError as e:
                raise ToolError(f"tools[{i}].function.parameters ({name}): {e}") from None
            out.append({"type": "function", "function": {**fn, "parameters": params}})
        return out

    def _check_choice(self, choice) -> Tuple[str, Optional[str]]:
        if choice is None:
            return ("auto" if self.tools else "none"), None
        if isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise ToolError(f"tool_choice must be none, auto, required or {{type: function, function: "
                                f"{{name}}}}, got {choice!r}")
            if choice == "required" and not self.tools:
                raise ToolError("tool_choice is required but no tools are given")
            return choice, None
        if isinstance(choice, dict) and choice.get("type", "function") == "function" \
                and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")
            if name not in self.names:
                raise ToolError(f"tool_choice names function {name!r}, which is not among the tools "
                                f"({', '.join(self.names) or 'none given'})")
            return "required", name
        raise ToolError("tool_choice must be none, auto, required or {type: function, function: {name}}")

    # -- the prompt ----------------------------------------------------------------------------------
    def template_kwargs(self) -> dict:
        return {"tools": self.tools} if self.active and self.template_knows_tools else {}

    def messages(self, messages: list) -> list:
        """Messages ready for the template: tool-call arguments as objects (templates ``tojson`` them);
        for a template that does not know tools, the tools described in the system message and tool
        calls / results written out as text."""
        out = []
        for m in messages:
            m = dict(m)
            calls = m.get("tool_calls")
            if calls:
                m["tool_calls"] = [_call_for_template(c) for c in calls]
            out.append(m)
        if self.template_knows_tools:
            return out
        plain = []
        for m in out:
            if m.get("tool_calls"):
                text = "\n".join(f'<tool_call>\n{json.dumps(c["function"])}\n</tool_call>' for c in m["tool_calls"])
                plain.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + text).strip()})
            elif m.get("role") == "tool":
                plain.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
            else:
                plain.append({k: v for k, v in m.items() if k != "tool_calls"})
        if self.active:
            desc = ("You can call these functions. To call one, reply with exactly\n<tool_call>\n"
                    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n'
                    "Functions:\n" + "\n".join(json.dumps(t["function"]) for t in self.tools))
            if plain and plain[0].get("role") == "system":
                plain[0] = {**plain[0], "content": f"{plain[0].get('content') or ''}\n\n{desc}"}
            else:
                plain.insert(0, {"role": "system", "content": desc})
        return plain

    # -- forcing a call ------------------------------------------------------------------------------
    def call_grammar(self) -> Optional[Grammar]:
        """The grammar of a reply that is only tool calls (tool_choice required / named), or None."""
        if not self.active or self.mode != "required":
            return None
        names = [self.forced] if self.forced else self.names
        args_key = "parameters" if self.family == "llama3" else "arguments"
        alts = []
        for t in self.tools:
            fn = t["function"]
            if fn["name"] in names:
                alts.append({"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: fn["parameters"]},
                             "required": ["name", args_key], "additionalProperties": False})
        schema = alts[0] if len(alts) == 1 else {"anyOf": alts}
        schema = {**schema, "x-guidance": COMPACT_JSON}
        call = f"%json {json.dumps(schema)}"
        if self.family == "llama3":
            lark = f"start: call\ncall: {call}\n"
        else:
            lark = f'start: call ("\\n" call)*\ncall: "<tool_call>\\n" obj "\\n</tool_call>"\nobj: {call}\n'
        try:
            g = Grammar.from_string("%llguidance {}\n" + lark)
        except GrammarError as e:
            raise ToolError(f"tools: cannot build the grammar of a call: {e}") from None
        g.kind = "tool_call"
        return g

    # -- parsing the reply ---------------------------------------------------------------------------
    def parse(self, text: str) -> Tuple[str, List[dict]]:
        """(content, tool_calls) from a reply; calls in OpenAI's shape, arguments as a JSON string.
        Only calls of known tools count; anything else stays content."""
        if not self.active:
            return text, []
        calls, content = [], text
        if "<tool_call>" in text:
            for body in _HERMES_CALL.findall(text):
                c = self._call(body)
                if c is not None:
                    calls.append(c)
            if calls:
                content = text[:text.index("<tool_call>")].strip()
        if not calls:
            body = text.strip()
            if body.startswith("<|python_tag|>"):
                body = body[len("<|python_tag|>"):].strip()
            fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.S)
            if fenced:
                body = fenced.group(1)
            if body.startswith("{"):
                whole = self._call(body)
                parts = [whole] if whole else [self._call(p) for p in body.split(";")]   # llama3: a;b
                if parts and all(parts):
                    calls, content = parts, ""
        return content, calls

    def _call(self, body: str) -> Optional[dict]:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        if "function" in obj and isinstance(obj["function"], dict):
            obj = obj["function"]
        name = obj.get("name")
        args = obj.get("arguments", obj.get("parameters", {}))
        if name not in self.names:
            return None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _call_for_template(c) -> dict:
    """An OpenAI / ollama tool call with ``arguments`` as an object (OpenAI sends a JSON string)."""
    if not isinstance(c, dict):
        raise ToolError("tool_calls entries must be objects")
    fn = c.get("function", c)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolError("each tool call needs function.name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ToolError(f"tool call {fn['name']!r}: arguments is not valid JSON") from None
    return {**c, "type": "function", "function": {"name": fn["name"], "arguments": args}}


class ToolStream:
    """Streams content while it cannot be a tool call, holds the rest back until the end.

    ``feed(text)`` returns the text that can go out now; ``finish()`` returns (content still held,
    tool calls) once the reply is complete."""

    MARKERS = ("<tool_call>", "<|python_tag|>", "```")

    def __init__(self, toolset: ToolSet):
        self.ts = toolset
        self.text = ""        # everything generated
        self.sent = 0         # how much of it went out as content
        self.holding = False  # a call has started: nothing more goes out

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.holding:
            return ""
        rest = self.text[self.sent:]
        if not self.text[:self.sent].strip() and rest.lstrip().startswith("{"):
            self.holding = True           # a bare JSON reply may be a call (llama3 / generic)
            return ""
        for mk in self.MARKERS:
            i = rest.find(mk)
            if i >= 0:
                self.holding = True
                out = rest[:i]
                self.sent += i
                return out
        keep = len(rest)
        for mk in self.MARKERS + ("{",):
            for k in range(min(len(mk) - 1, len(rest)), 0, -1):
                if rest.endswith(mk[:k]) and (mk != "{" or not self.text[:self.sent].strip()):
                    keep = min(keep, len(rest) - k)
                    break
        if not self.text[:self.sent + keep].strip():
            keep = 0                      # leading whitespace: wait to see what follows
        self.sent += keep
        return rest[:keep]

    def finish(self) -> Tuple[str, List[dict]]:
        content, calls = self.ts.parse(self.text)
        if calls:
            sent = self.text[:self.sent]
            return content[len(sent):] if content.startswith(sent) else "", calls
        return self.text[self.sent:], []

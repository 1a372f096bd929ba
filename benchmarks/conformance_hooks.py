"""schemathesis hooks for benchmarks/api_conformance.py (loaded through ``SCHEMATHESIS_HOOKS``).

The OpenAPI document states every rule of a request that JSON Schema can state. A few rules tie one field to
another and JSON Schema has no words for them; the server answers 400 to a request that breaks one (as
OpenAI does), and these hooks keep the *schema-valid* (positive) cases schemathesis generates inside them,
so that "schema-valid request rejected" means the document or the server is wrong, never that the rule was
unsayable. Negative cases are left as generated. The rules:

* a named ``tool_choice`` names one of ``tools``; ``tool_choice: "required"`` comes with tools; tool names
  are distinct (tinyinfer/toolcall.py's ToolSet checks);
* ``grammar`` is a grammar that parses (GBNF or Lark; the document says so, JSON Schema cannot check it);
* an embedding input holds at least one token (a string the tokenizer reads as none, such as "\\x04" for
  SmolLM2's, is a 400 as llama-server's "Input content cannot be empty");
* the prompt fits the context (a prompt of more tokens than ``-c`` is a 400, as llama-server's "the request
  exceeds the available context size"): valid cases whose prompt-making fields hold more than
  ``PROMPT_BYTES`` bytes (an upper bound on their tokens: a token covers a byte at least) are dropped;
* the ollama endpoints, /models/load and /v1/models/{model_id} name the served model
  (``CONFORMANCE_MODEL``; another name is a 404 there, which schemathesis accepts but which would stop the
  request before the code under test).
"""

from __future__ import annotations

import json
import os

import schemathesis

_OLLAMA_MODEL = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show", "/models/load")


def _positive(case) -> bool:
    meta = case.meta
    return meta is not None and meta.generation.mode.is_positive


def _tools(body: dict) -> None:
    tools = body.get("tools")
    names = []
    if isinstance(tools, list):
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                if fn["name"] in names:
                    fn["name"] = f"{fn['name'][:56]}_{i}"
                names.append(fn["name"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        if names:
            choice["function"]["name"] = names[0]
        else:
            body["tool_choice"] = "auto"
    elif choice == "required" and not names:
        body["tool_choice"] = "auto"


GRAMMAR = 'root ::= "yes" | "no"'
_EMBED = {"/v1/embeddings": "input", "/api/embed": "input", "/api/embeddings": "prompt"}


def _tokenful(v):
    """Strings with a letter in front (one token at least); token ids as they are."""
    if isinstance(v, str):
        return "a" + v
    if isinstance(v, list):
        return [_tokenful(x) for x in v]
    return v


#: bytes of the prompt-making fields of a valid generation request (-c 512 leaves the rest to the template)
PROMPT_BYTES = 256
_PROMPT_FIELDS = ("messages", "prompt", "system", "tools", "suffix", "context")
_GENERATE = ("/v1/completions", "/v1/chat/completions", "/api/generate", "/api/chat")


@schemathesis.hook
def filter_case(ctx, case):
    if not _positive(case) or case.operation.path not in _GENERATE or not isinstance(case.body, dict):
        return True
    text = json.dumps([case.body.get(k) for k in _PROMPT_FIELDS], ensure_ascii=False)
    return len(text.encode("utf-8", "surrogatepass")) <= PROMPT_BYTES


@schemathesis.hook
def map_case(ctx, case):
    if not _positive(case):
        return case
    path = case.operation.path
    model = os.environ.get("CONFORMANCE_MODEL")
    if model and isinstance(case.path_parameters, dict) and "model_id" in case.path_parameters:
        case.path_parameters["model_id"] = model
    if not isinstance(case.body, dict):
        return case
    if path in ("/v1/chat/completions", "/api/chat"):
        _tools(case.body)
    if isinstance(case.body.get("grammar"), str):
        case.body["grammar"] = GRAMMAR
    if path in _EMBED and _EMBED[path] in case.body:
        case.body[_EMBED[path]] = _tokenful(case.body[_EMBED[path]])
    if model and path in _OLLAMA_MODEL:
        if "model" in case.body or path != "/api/show":
            case.body["model"] = model
        if path == "/api/show" and "name" in case.body:
            case.body["name"] = model
    return case

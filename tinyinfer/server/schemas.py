"""Request bodies, validated by pydantic (and documented at /docs).

OpenAI fields and defaults follow llama-cpp-python's server (``llama_cpp/server/types.py``);
ollama's follow its REST API (``options`` with ollama's defaults). Unknown fields are
ignored, as both servers do, so newer clients keep working.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from typing_extensions import Annotated


#: Patterns are matched with Python's ``re.search``, as JSON Schema validators written in Python (the ones that
#: check this server against its OpenAPI document) read ``pattern``: one reading on both sides.
_RE = "python-re"


class _Body(BaseModel):
    # NaN and ±Infinity (which Python's JSON parser accepts) are no sampling values: 400. Strict types, as the
    # OpenAPI document says them: no 0 for a boolean, no "1" for a number, no booleans for token ids.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True, regex_engine=_RE)


#: chat roles the templates know (OpenAI's ``developer`` and legacy ``function`` included)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
def _whole(v):
    """A JSON number with no fraction is an integer (JSON Schema's reading: 2.0 is the integer 2)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_whole)]
#: a token id: its ``maximum`` (the vocabulary's size - 1) is written into the OpenAPI document by
#: tinyinfer/server/openapi.py where the server knows it (one-model mode); past it is a 400
TokenId = Annotated[Int, Field(ge=0, json_schema_extra={"x-token-id": True})]
#: ollama's keep_alive as a string: a number of seconds or a Go duration ("5m", "1h30m", "-1s");
#: tinyinfer/server/models.py's parse_duration reads exactly these
_NUM = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
DURATION_PATTERN = rf"^[+-]?(?:{_NUM}|(?:{_NUM}(?:ns|us|µs|ms|s|m|h))+)$"
KeepAlive = Optional[Union[int, float, Annotated[str, Field(pattern=DURATION_PATTERN)]]]
_KEEP_ALIVE = Field(None, description='how long the model stays loaded after the request: seconds, or a duration '
                                      '("5m", "30s", "1h"); 0 = unload when idle, negative = forever (ollama\'s)')
Text = Annotated[str, Field(min_length=1)]


# -- OpenAI ----------------------------------------------------------------------------------

class _Sampling(_Body):
    """Generation options; unset ones take the defaults of tinyinfer/options.py (DEFAULTS["openai"]), and
    options this schema does not list but tinyinfer/options.py's NAMES["openai"] does pass through."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, regex_engine=_RE)
    temperature: float = Field(None, ge=0.0, description="0 = greedy (deterministic)")
    top_p: float = Field(None, ge=0.0, le=1.0)
    min_p: float = Field(None, ge=0.0, le=1.0)
    typical_p: float = Field(None, ge=0.0, le=1.0)
    top_k: Int = Field(None, ge=0, description="0 = whole vocabulary")
    repeat_penalty: float = Field(None, ge=0.0)
    repeat_last_n: Int = Field(None, ge=-1)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    mirostat_mode: Int = Field(None, ge=0, le=2)
    mirostat_tau: float = Field(None, ge=0.0, le=10.0)
    mirostat_eta: float = Field(None, ge=0.001, le=1.0)
    seed: Optional[Int] = Field(None, description="fixed seed for reproducible sampling; null or -1 = random")
    logit_bias: Optional[Dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], float]] = Field(
        None, description="token id (as a string) -> bias; ids past the vocabulary are ignored (llama-server's)",
        json_schema_extra={"propertyNames": {"pattern": r"^[0-9]{1,9}$"}})
    stop: Optional[Union[str, Annotated[List[str], Field(max_length=16)]]] = Field(
        None, description="stop strings (not part of the output), at most 16")
    stream: bool = False
    cache_prompt: bool = Field(None, description="reuse the longest cached prefix of the prompt (llama-server's)")
    ignore_eos: bool = Field(None, description="keep generating past end tokens, up to max_tokens (llama-server's)")
    model: Optional[str] = None
    n: Optional[Int] = Field(1, ge=1, le=1, description="only 1 is supported")
    user: Optional[str] = None


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: Optional[Dict[str, Any]] = Field(None, description='{"name": ..., "schema": {...}, "strict": true}')
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema", description="llama-cpp-python's json_object schema")


class CompletionRequest(_Sampling):
    prompt: Union[str, Annotated[List[str], Field(min_length=1, max_length=1)],
                  Annotated[List[TokenId], Field(min_length=1)]] = Field(
        "", description="text (one prompt per request), or token ids")
    grammar: Optional[str] = Field(None, description="GBNF grammar the output must match (llama-server); one that does "
                                                     "not parse is a 400 naming the error")
    json_schema: Optional[Dict[str, Any]] = Field(None, description="JSON schema of the output (llama-server)")
    response_format: Optional[ResponseFormat] = None
    suffix: Optional[str] = None
    max_tokens: Optional[Int] = Field(None, ge=-1, description="-1, 0 or null (default): until an end token, a stop "
                                                            "or the context's end (llama-server's)")
    echo: bool = False
    logprobs: Optional[Int] = Field(None, ge=0, le=20)
    best_of: Optional[Int] = Field(1, ge=1, le=1)
    stream_options: Optional[StreamOptions] = None


class ContentPart(_Body):
    type: str = "text"
    text: Optional[str] = None


class Function(_Body):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True, regex_engine=_RE)
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = Field(None, description="a JSON schema of the arguments (an object)")


class Tool(_Body):
    """OpenAI's function tool (also ollama's ``tools``)."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True, regex_engine=_RE)
    type: Literal["function"] = "function"
    function: Function


class ToolChoiceFunction(_Body):
    name: str


class ToolChoice(_Body):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True, regex_engine=_RE)
    role: Role
    content: Optional[Union[str, List[ContentPart]]] = ""


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[Int] = Field(None, ge=-1, description="-1, 0 or null (default): until an end token, a stop "
                                                            "or the context's end")
    max_completion_tokens: Optional[Int] = Field(None, ge=-1, description="newer name of max_tokens")
    logprobs: Optional[bool] = False
    top_logprobs: Optional[Int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    stream_options: Optional[StreamOptions] = None
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ToolChoice]] = None


class EmbeddingRequest(_Body):
    input: Union[Text, Annotated[List[Text], Field(min_length=1)], Annotated[List[TokenId], Field(min_length=1)],
                 Annotated[List[Annotated[List[TokenId], Field(min_length=1)]], Field(min_length=1)]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None


# -- ollama ----------------------------------------------------------------------------------

class OllamaOptions(_Body):
    """ollama's ``options`` (runner options that make no sense here are accepted and ignored); unset ones
    take ollama's defaults (tinyinfer/options.py: DEFAULTS["ollama"])."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, regex_engine=_RE)
    num_predict: Optional[Int] = Field(None, ge=-2, description="-1 = no limit, -2 = fill the context")
    num_ctx: Optional[Int] = Field(None, ge=0, description="accepted; the server's -c is used")
    temperature: Optional[float] = Field(None, ge=0.0)
    top_k: Optional[Int] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    typical_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repeat_penalty: Optional[float] = Field(None, ge=0.0)
    repeat_last_n: Optional[Int] = Field(None, ge=-1)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    mirostat: Optional[Int] = Field(None, ge=0, le=2)
    mirostat_tau: Optional[float] = Field(None, ge=0.0)
    mirostat_eta: Optional[float] = Field(None, ge=0.0)
    seed: Optional[Int] = None
    stop: Optional[Union[str, List[str]]] = None


class _OllamaGen(_Body):
    model: str = Field(..., min_length=1, description="a name of the served model (400 without it, as ollama)")
    stream: bool = True
    format: Optional[Union[Literal["json", ""], Dict[str, Any]]] = Field(
        None, description='"json" or a JSON schema; "" or null: none (ollama\'s)')
    options: Optional[OllamaOptions] = None
    keep_alive: KeepAlive = _KEEP_ALIVE
    think: Optional[Union[bool, str]] = None



class OllamaGenerateRequest(_OllamaGen):
    prompt: Optional[str] = None
    suffix: Optional[Annotated[str, Field(max_length=0)]] = Field(
        None, description="not supported (no fill-in-the-middle): absent, null or empty")
    system: Optional[str] = None
    template: Optional[Annotated[str, Field(max_length=0)]] = Field(
        None, description="not supported (Go templates): absent, null or empty; use raw with a formatted prompt")
    context: Optional[List[TokenId]] = None
    raw: bool = False
    images: Optional[Annotated[List[str], Field(max_length=0)]] = Field(
        None, description="not supported: the served models are text-only (absent, null or [])")


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True, regex_engine=_RE)
    role: Role
    content: Optional[str] = ""
    images: Optional[Annotated[List[str], Field(max_length=0)]] = Field(
        None, description="not supported: the served models are text-only (absent, null or [])")


class OllamaChatRequest(_OllamaGen):
    messages: Optional[List[OllamaMessage]] = None
    tools: Optional[List[Tool]] = None


class OllamaShowRequest(_Body):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True, regex_engine=_RE,
                              json_schema_extra={"anyOf": [{"required": ["model"]}, {"required": ["name"]}]})
    model: str = Field(None, min_length=1)
    name: str = Field(None, min_length=1)        # older clients
    verbose: bool = False

    @model_validator(mode="after")
    def _named(self):
        if not (self.model or self.name):
            raise ValueError("model is required")
        return self


class OllamaEmbedRequest(_Body):
    model: str = Field(..., min_length=1)
    input: Union[Text, Annotated[List[Text], Field(min_length=1)]]
    truncate: bool = True
    options: Optional[OllamaOptions] = None
    keep_alive: KeepAlive = _KEEP_ALIVE


class OllamaEmbeddingsRequest(_Body):
    model: str = Field(..., min_length=1)
    prompt: Text
    options: Optional[OllamaOptions] = None
    keep_alive: KeepAlive = _KEEP_ALIVE


class RouterModelRequest(_Body):
    """llama-server's router: POST /models/load and /models/unload."""
    model: str = Field(..., min_length=1)

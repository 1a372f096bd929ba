"""Request bodies, validated by pydantic (and documented at /docs).

OpenAI fields and defaults follow llama-cpp-python's server (``llama_cpp/server/types.py``);
ollama's follow its REST API (``options`` with ollama's defaults). Unknown fields are
ignored, as both servers do, so newer clients keep working.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    # NaN and ±Infinity (which Python's JSON parser accepts) are no sampling values: 400
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


#: chat roles the templates know (OpenAI's ``developer`` and legacy ``function`` included)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _known_role(v: str) -> str:
    if v not in CHAT_ROLES:
        raise ValueError(f"unknown role {v!r}; expected one of {', '.join(CHAT_ROLES)}")
    return v


# -- OpenAI ----------------------------------------------------------------------------------

class _Sampling(_Body):
    """Generation options; unset ones take the defaults of tinyinfer/options.py (DEFAULTS["openai"]), and
    options this schema does not list but tinyinfer/options.py's NAMES["openai"] does pass through."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    temperature: float = Field(None, ge=0.0, description="0 = greedy (deterministic)")
    top_p: float = Field(None, ge=0.0, le=1.0)
    min_p: float = Field(None, ge=0.0, le=1.0)
    typical_p: float = Field(None, ge=0.0, le=1.0)
    top_k: int = Field(None, ge=0, description="0 = whole vocabulary")
    repeat_penalty: float = Field(None, ge=0.0)
    repeat_last_n: int = Field(None, ge=-1)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    mirostat_mode: int = Field(None, ge=0, le=2)
    mirostat_tau: float = Field(None, ge=0.0, le=10.0)
    mirostat_eta: float = Field(None, ge=0.001, le=1.0)
    seed: Optional[int] = Field(None, description="fixed seed for reproducible sampling; null or -1 = random")
    logit_bias: Optional[Dict[str, float]] = Field(None, description="token id (as a string) -> bias")
    stop: Optional[Union[str, List[str]]] = Field(None, description="stop strings (not part of the output)")
    stream: bool = False
    cache_prompt: bool = Field(None, description="reuse the longest cached prefix of the prompt (llama-server's)")
    model: Optional[str] = None
    n: Optional[int] = Field(1, ge=1, le=1, description="only 1 is supported")
    user: Optional[str] = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        if v is not None:
            for k in v:
                try:
                    int(k)
                except ValueError:
                    raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
                if int(k) < 0:
                    raise ValueError(f"logit_bias keys must be token ids >= 0, got {k!r}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: Optional[Dict[str, Any]] = Field(None, description='{"name": ..., "schema": {...}, "strict": true}')
    schema_: Optional[Dict[str, Any]] = Field(None, alias="schema", description="llama-cpp-python's json_object schema")


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int]] = Field("", description="text, or token ids")
    grammar: Optional[str] = Field(None, description="GBNF grammar the output must match (llama-server)")
    json_schema: Optional[Dict[str, Any]] = Field(None, description="JSON schema of the output (llama-server)")
    response_format: Optional[ResponseFormat] = None
    suffix: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=-1, description="-1, 0 or null (default): until an end token, a stop "
                                                            "or the context's end (llama-server's)")
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    best_of: Optional[int] = Field(1, ge=1, le=1)
    stream_options: Optional[StreamOptions] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            return v[0]
        return v


class ContentPart(_Body):
    type: str = "text"
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    role: str
    content: Optional[Union[str, List[ContentPart]]] = ""

    _role = field_validator("role")(_known_role)


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=-1, description="-1, 0 or null (default): until an end token, a stop "
                                                            "or the context's end")
    max_completion_tokens: Optional[int] = Field(None, ge=-1, description="newer name of max_tokens")
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    stream_options: Optional[StreamOptions] = None
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Any] = None


class EmbeddingRequest(_Body):
    input: Union[str, List[str], List[int], List[List[int]]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None


# -- ollama ----------------------------------------------------------------------------------

class OllamaOptions(_Body):
    """ollama's ``options`` (runner options that make no sense here are accepted and ignored); unset ones
    take ollama's defaults (tinyinfer/options.py: DEFAULTS["ollama"])."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    num_predict: Optional[int] = Field(None, ge=-2, description="-1 = no limit, -2 = fill the context")
    num_ctx: Optional[int] = Field(None, ge=0, description="accepted; the server's -c is used")
    temperature: Optional[float] = Field(None, ge=0.0)
    top_k: Optional[int] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    typical_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repeat_penalty: Optional[float] = Field(None, ge=0.0)
    repeat_last_n: Optional[int] = Field(None, ge=-1)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    mirostat: Optional[int] = Field(None, ge=0, le=2)
    mirostat_tau: Optional[float] = Field(None, ge=0.0)
    mirostat_eta: Optional[float] = Field(None, ge=0.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None


class _OllamaGen(_Body):
    model: str = Field("", description="required (400 without it, as ollama); a name of the served model")
    stream: bool = True
    format: Optional[Union[str, Dict[str, Any]]] = Field(None, description='"json" or a JSON schema')
    options: Optional[OllamaOptions] = None
    keep_alive: Optional[Union[int, float, str]] = None
    think: Optional[Union[bool, str]] = None



class OllamaGenerateRequest(_OllamaGen):
    prompt: Optional[str] = None
    suffix: Optional[str] = None
    system: Optional[str] = None
    template: Optional[str] = None
    context: Optional[List[int]] = None
    raw: bool = False
    images: Optional[List[str]] = None


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    role: str
    content: Optional[str] = ""
    images: Optional[List[str]] = None

    _role = field_validator("role")(_known_role)


class OllamaChatRequest(_OllamaGen):
    messages: Optional[List[OllamaMessage]] = None
    tools: Optional[List[Dict[str, Any]]] = None


class OllamaShowRequest(_Body):
    model: Optional[str] = None
    name: Optional[str] = None        # older clients
    verbose: bool = False


class OllamaEmbedRequest(_Body):
    model: str = ""
    input: Union[str, List[str]]
    truncate: bool = True
    options: Optional[OllamaOptions] = None
    keep_alive: Optional[Union[int, float, str]] = None


class OllamaEmbeddingsRequest(_Body):
    model: str = ""
    prompt: str
    options: Optional[OllamaOptions] = None
    keep_alive: Optional[Union[int, float, str]] = None

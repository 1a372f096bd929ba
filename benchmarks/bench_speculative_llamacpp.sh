#!/bin/sh
# llama.cpp's side of benchmarks/bench_speculative.py: the same files, prompts and flags, 1 thread, greedy.
#   BIN=/path/to/llama.cpp/build-xeon/bin EXTRA=--no-repack sh benchmarks/bench_speculative_llamacpp.sh FIB.txt CODE.txt
# (FIB.txt = tests/test_speculative.py PROMPTS[1], CODE.txt = its CODE prompt)
# `python benchmarks/bench_speculative.py --llamacpp BIN --llamacpp-args=--no-repack` runs the same commands
# interleaved with ours and reports CPU-time speeds (benchmarks/RESULTS.md, "Speculative decoding").
# Notes for this llama.cpp (0.3.36's vendored tree): -md needs --spec-type draft-simple (without it: "failed to
# initialize speculative decoding"); plain decoding is llama-speculative-simple with ngram-simple patterns of 1024
# tokens, which never match in a 1024-token context (build-xeon has no llama-completion); on the 2-vCPU Xeon VM
# every multi-token batch on AMX-repacked Q4_0 / Q4_K weights crashes (SIGSEGV in ggml_backend_amx_mul_mat,
# SIGILL), so EXTRA=--no-repack there.
set -e
BIN=${BIN:-/tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp/build-xeon/bin}
EXTRA=${EXTRA:-}
C=${TINYINFER_CACHE:-$HOME/.cache/tinyinfer}
F16=$C/SmolLM2-135M-Instruct.F16.gguf; Q40=$C/SmolLM2-135M-Instruct.Q4_0.gguf
QW=$C/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
SS="$BIN/llama-speculative-simple -t 1 --temp 0 -c 1024 $EXTRA"
PLAIN="--spec-type ngram-simple --spec-ngram-simple-size-n 1024 --spec-ngram-simple-size-m 1024"
pick() { grep -E "decoded|n_drafted|n_accept|accept |error" || true; }
for r in 1 2 3; do
  echo "== plain smollm2 F16"
  $SS -m $F16 -f "$1" -n 128 --ignore-eos $PLAIN 2>&1 | pick
  for pmin in 0 0.5; do
    echo "== speculative-simple F16 + Q4_0 --spec-draft-n-max 8 --spec-draft-p-min $pmin"
    $SS -m $F16 -md $Q40 -td 1 --spec-type draft-simple -f "$1" -n 128 --ignore-eos \
        --spec-draft-n-max 8 --spec-draft-p-min $pmin 2>&1 | pick
  done
  echo "== plain qwen-coder"
  $SS -m $QW -f "$2" -n 128 $PLAIN 2>&1 | pick
  echo "== speculative-simple qwen-coder --spec-type ngram-simple (12,48)"
  $SS -m $QW -f "$2" -n 128 --spec-type ngram-simple --spec-ngram-simple-size-n 12 --spec-ngram-simple-size-m 48 2>&1 | pick
done

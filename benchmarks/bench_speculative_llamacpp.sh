#!/bin/sh
# llama.cpp's side of benchmarks/bench_speculative.py: the same files, prompts and flags, 1 thread, greedy.
#   BIN=/path/to/llama.cpp/build/bin sh benchmarks/bench_speculative_llamacpp.sh FIB.txt CODE.txt
# (FIB.txt = tests/test_speculative.py PROMPTS[1], CODE.txt = its CODE prompt)
set -e
BIN=${BIN:-/tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin}
C=${TINYINFER_CACHE:-$HOME/.cache/tinyinfer}
F16=$C/SmolLM2-135M-Instruct.F16.gguf; Q40=$C/SmolLM2-135M-Instruct.Q4_0.gguf
QW=$C/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
for r in 1 2 3; do
  echo "== plain smollm2 F16"
  $BIN/llama-completion -m $F16 -f "$1" -n 128 -t 1 --temp 0 --ignore-eos -no-cnv -c 1024 2>&1 | grep -E "eval time" | grep -v prompt
  echo "== speculative-simple F16 + Q4_0 --spec-draft-n-max 8"
  $BIN/llama-speculative-simple -m $F16 -md $Q40 -f "$1" -n 128 -t 1 -td 1 --temp 0 --ignore-eos -c 1024 \
      --spec-draft-n-max 8 2>&1 | grep -E "decoded|n_drafted|n_accept|accept "
  echo "== speculative-simple F16 + Q4_0 --spec-draft-n-max 8 --spec-draft-p-min 0.5"
  $BIN/llama-speculative-simple -m $F16 -md $Q40 -f "$1" -n 128 -t 1 -td 1 --temp 0 --ignore-eos -c 1024 \
      --spec-draft-n-max 8 --spec-draft-p-min 0.5 2>&1 | grep -E "decoded|n_drafted|n_accept|accept "
  echo "== plain qwen-coder"
  $BIN/llama-completion -m $QW -f "$2" -n 128 -t 1 --temp 0 -no-cnv -c 1024 2>&1 | grep -E "eval time" | grep -v prompt
  echo "== speculative-simple qwen-coder --spec-type ngram-simple (12,48)"
  $BIN/llama-speculative-simple -m $QW --spec-type ngram-simple -f "$2" -n 128 -t 1 --temp 0 -c 1024 \
      2>&1 | grep -E "decoded|n_drafted|n_accept|accept |error" || true
done

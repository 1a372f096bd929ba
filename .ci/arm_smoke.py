"""The emulated aarch64 smoke check (run inside the arm64 chroot by .ci/arm_job.sh):
one first-step logits check of SmolLM2 Q4_1 against llama.cpp (KL <= 0.01, same argmax),
then one greedy generation, in two Python threads at once (this image has no libgomp, so
numba's workqueue layer is in use: kernels/parallel.py must keep it from aborting).

usage: python arm_smoke.py MODEL.gguf REFERENCE_DIR
"""
import json
import platform
import sys
import threading
import time

import numpy as np

t0 = time.perf_counter()
from tinyinfer.engine import Engine  # noqa: E402
from tinyinfer.sampler import SamplerParams  # noqa: E402

model, ref = sys.argv[1], sys.argv[2]
r = json.loads(open(f"{ref}/smollm2/greedy_Q4_1.jsonl").readline())
ref_logits = np.fromfile(f"{ref}/smollm2/first_logits_Q4_1.f32", np.float32)[:49152]
eng = Engine(model, n_ctx=128, n_batch=64, n_threads=2, verbose=True)
t1 = time.perf_counter()
ours = eng.ingest_prompt(r["prompt_ids"]).astype(np.float64)


def log_softmax(x):
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


p, q = log_softmax(ref_logits), log_softmax(ours)
kl = float((np.exp(p) * (p - q)).sum())
ok_logits = kl <= 0.01 and int(np.argmax(ours)) == int(np.argmax(ref_logits))

n = 8
want = []
for tok, top5 in zip(r["greedy_ids"][:n], r["top5"]):
    if top5[0][1] - top5[1][1] < 0.5:
        break
    want.append(tok)
outs, errors = [], []


def gen(e):
    try:
        e.reset()
        outs.append([s.token for s in e.generate(r["prompt_ids"], SamplerParams(temperature=0.0), max_tokens=n)])
    except BaseException as exc:  # noqa: BLE001
        errors.append(repr(exc))


ts = [threading.Thread(target=gen, args=(e,)) for e in (eng, eng.fork())]
for t in ts:
    t.start()
for t in ts:
    t.join()
import numba  # noqa: E402
ok_gen = not errors and len(outs) == 2 and outs[0] == outs[1] and outs[0][:len(want)] == want
print(f"arm smoke: {platform.machine()} numba layer {numba.threading_layer()}; first-step KL {kl:.2e} "
      f"({'ok' if ok_logits else 'FAIL'}); greedy {outs[0] if outs else errors} vs llama.cpp {want} "
      f"({'ok' if ok_gen else 'FAIL'}) -> {eng.tokenizer.decode(outs[0]) if outs else ''!r}; "
      f"load+compile {t1 - t0:.0f} s, checks {time.perf_counter() - t1:.0f} s", flush=True)
sys.exit(0 if ok_logits and ok_gen else 1)

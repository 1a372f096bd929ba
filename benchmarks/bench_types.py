"""tinyinfer against llama-bench for every quant format, side by side: one markdown table.

    python benchmarks/bench_types.py --llama-bench PATH/llama-bench [-p 128] [-n 32] [-t 1,2] [-r 2]
                                     [--types Q4_0 Q2_K ...] [--dir ~/.cache/tinyinfer/synthetic]

For each type, the 1.1B TinyLlama-shaped synthetic file (``benchmarks/make_synthetic.py tinyllama T``;
K types as llama-quantize's mixes: Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K) is run by ``python -m tinyinfer
bench`` then by ``llama-bench`` (its defaults: repack on), one after the other with the same ``-p -n -t
-r``; rows: type x test x threads, t/s mean +- std over the repetitions, and ours / llama.cpp. The two
programs never run at once; on a shared machine compare ratios, not absolute figures.

``--config NAME:field=v,field=v`` (repeatable): ours once per config (KernelConfig fields over the
default, through benchmarks/bench_config.py; ``NAME:`` alone = the default), one after the other per
type, a t/s column each and each config / the first: a before/after of a kernel knob in one run.
Without ``--llama-bench`` llama.cpp is not run.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FILES = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q2_K": "Q2_K",
         "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL",
         "IQ4_XS": "IQ4_XS"}


def _jsonl(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr[-2000:]}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def _key(r):
    test = ("pp" if r["n_prompt"] else "tg") + str(r["n_prompt"] or r["n_gen"])
    return test, int(r.get("threads", r.get("n_threads")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bench")
    ap.add_argument("--config", action="append", default=[], metavar="NAME:field=v,...")
    ap.add_argument("--dir", default=str(Path.home() / ".cache" / "tinyinfer" / "synthetic"))
    ap.add_argument("--types", nargs="*", default=list(FILES))
    ap.add_argument("-p", default="128")
    ap.add_argument("-n", default="32")
    ap.add_argument("-t", default="1,2")
    ap.add_argument("-r", default="2")
    a = ap.parse_args(argv)
    common = ["-p", a.p, "-n", a.n, "-t", a.t, "-r", a.r]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}; "
          f"ours: python -m tinyinfer bench -m F {' '.join(common)} --no-roofline; "
          f"llama.cpp: {a.llama_bench} -m F {' '.join(common)}", flush=True)
    configs = [(c.partition(":")[0], [f for f in c.partition(":")[2].split(",") if f]) for c in a.config]
    configs = configs or [("", None)]
    names = [n or "tinyinfer" for n, _ in configs]
    cols = [f"{n} t/s" for n in names] + [f"{n} / {names[0]}" for n in names[1:]]
    if a.llama_bench:
        cols += ["llama.cpp t/s", f"{names[0]} / llama.cpp"]
    print("| type (file) | test | threads | " + " | ".join(cols) + " | start (UTC), load |")
    print("| --- | --- | ---: | " + "---: | " * len(cols) + "--- |", flush=True)
    bench_config = str(Path(__file__).with_name("bench_config.py"))
    for t in a.types:
        f = Path(a.dir) / f"tinyllama-synthetic.{FILES[t]}.gguf"
        start = f"{time.strftime('%H:%M', time.gmtime())}, {os.getloadavg()[0]:.1f}"
        runs = []
        for _, flds in configs:
            pre = ([sys.executable, "-m", "tinyinfer", "bench"] if flds is None
                   else [sys.executable, bench_config, *flds, "--"])
            runs.append({_key(r): r for r in _jsonl([*pre, "-m", str(f), *common, "--no-roofline", "-o", "jsonl"])})
        ll = ({_key(r): r for r in _jsonl([a.llama_bench, "-m", str(f), *common, "-o", "jsonl"])}
              if a.llama_bench else {})
        for key in sorted(runs[0], key=lambda k: (k[0][:2] != "pp", k[1])):
            os_ = [r.get(key) for r in runs]
            cells = [f"{o['avg_ts']:.2f} ± {o['stddev_ts']:.2f}" if o else "–" for o in os_]
            cells += [f"{o['avg_ts'] / os_[0]['avg_ts']:.2f}" if o else "–" for o in os_[1:]]
            if a.llama_bench:
                g = ll.get(key)
                cells += [f"{g['avg_ts']:.2f} ± {g['stddev_ts']:.2f}" if g else "–",
                          f"{os_[0]['avg_ts'] / g['avg_ts']:.2f}" if g else "–"]
            print(f"| {t} ({FILES[t]}) | {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {start} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

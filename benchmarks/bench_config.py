"""``python -m tinyinfer bench`` with other kernel knobs (matmul.KernelConfig), for before/after runs.

    python benchmarks/bench_config.py repack=0 -- -m FILE -p 128 -n 32 -t 1,2 -r 3

Arguments before ``--`` are KernelConfig fields (``repack=0``, ``kgemv=0``,
``parallel_min_bytes=...``); the rest go to the bench tool. The kernels read no environment
variables: this replaces the old TINYINFER_REPACK / TINYINFER_KGEMV switches.
"""

import sys
from dataclasses import fields, replace

from tinyinfer.kernels import matmul as mm
from tinyinfer.tools import bench


def main(argv):
    if "--" not in argv:
        print(__doc__)
        return 2
    i = argv.index("--")
    kinds = {f.name: f.type for f in fields(mm.KernelConfig)}
    changes = {}
    for a in argv[:i]:
        k, _, v = a.partition("=")
        if k not in kinds:
            raise SystemExit(f"unknown KernelConfig field {k!r}; fields: {', '.join(kinds)}")
        changes[k] = bool(int(v)) if "bool" in str(kinds[k]) else int(v)
    cfg = replace(mm.DEFAULT_CONFIG, **changes)
    print(f"# {cfg}", flush=True)
    with mm.using_config(cfg):          # every weight the bench tool loads
        return bench.main(argv[i + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

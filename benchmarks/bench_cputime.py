"""`python -m tinyinfer bench` timed in process CPU time instead of wall time.

On a shared machine (other processes competing for the cores) wall-clock rates measure the
competition; the CPU time this process was given does not (memory-bandwidth and cache
contention still show). Same arguments and table as the bench tool; use it at one thread (-t 1),
where CPU time and wall time agree on a quiet machine.

    python benchmarks/bench_cputime.py -m model.gguf -t 1 -r 3
"""

import sys
import time

from tinyinfer.tools import bench

if __name__ == "__main__":
    bench.time.perf_counter = time.process_time      # the bench tool's timer (run_test and roofline)
    sys.exit(bench.main(sys.argv[1:]))

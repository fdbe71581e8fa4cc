"""Prefill attention benchmark: seqgen_fast against SDPA's cuDNN, flash (FA2) and efficient backends,
every provider timed in one run (the cases are ``seqgen_fast.bench.attention``'s; the runner is
``seqgen-fast bench``).

    python benchmarks/bench_attention.py [--quick | --headline | --dry-run] [--json P] [--csv P] [--plot P]

Default: every case (``--full``): the anchor shapes (B4 H16 S4096 D128, B16 H16 S2048 D64, B1 H16
S16384 D128), bf16 and fp16, causal and not, forward and forward+backward, plus a causal sliding
window of 4096 at S 16384; TFLOP/s counted as the anchors count them, ratios to SDPA-cuDNN.
Run ``seqgen_fast.warmup`` first (or accept that the first call of each key tunes).
"""
import sys

from seqgen_fast.cli import bench_script

if __name__ == "__main__":
    sys.exit(bench_script("attention", sys.argv[1:]))

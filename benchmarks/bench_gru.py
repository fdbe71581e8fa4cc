"""GRU benchmark: seqgen_fast against cuDNN's nn.GRU and an nn.GRUCell loop, every provider timed in
one run (the cases are ``seqgen_fast.bench.gru``'s; the runner is ``seqgen-fast bench``).

    python benchmarks/bench_gru.py [--quick | --headline | --dry-run] [--json P] [--csv P] [--plot P]

Default: every case (``--full``): fp32, fp16 and bf16 on the LSTM's anchor shapes, forward and
forward+backward (per-step times and ratios to cuDNN), and the generation step eagerly and in a
CUDA graph (ratio to nn.GRUCell). ``--dry-run`` runs the tiny case on the CPU (measures nothing).
"""
import sys

from seqgen_fast.cli import bench_script

if __name__ == "__main__":
    sys.exit(bench_script("gru", sys.argv[1:]))

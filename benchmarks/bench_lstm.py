"""LSTM benchmark: seqgen_fast against cuDNN's nn.LSTM and nn.LSTMCell loops (eager and replayed from a
CUDA graph), every provider timed in one run (the cases are ``seqgen_fast.bench.lstm``'s; the runner
is ``seqgen-fast bench``).

    python benchmarks/bench_lstm.py [--quick | --headline | --dry-run] [--json P] [--csv P] [--plot P]

Default: every case (``--full``): every anchor shape, two layers and bidirectional, float32 with TF32
on and off, float16 and bfloat16, forward and forward+backward, plus the generation step; us/step,
TFLOP/s, the ratio to the anchor and each provider's peak memory (training memory against cuDNN's
on the same shape). Needs a CUDA device; benchmarks/NOTES.md holds the predictions per case.
"""
import sys

from seqgen_fast.cli import bench_script

if __name__ == "__main__":
    sys.exit(bench_script("lstm", sys.argv[1:]))

"""KV-cache decode benchmark: flash_attn_with_kvcache against SDPA-cuDNN, SDPA-flash, SDPA-efficient and
torch's paged path (PagedAttention + flex_attention), with the copy bandwidth measured in the same run
(the cases are ``seqgen_fast.bench.decode``'s; the runner is ``seqgen-fast bench``).

    python benchmarks/bench_decode.py [--quick | --headline | --dry-run] [--json P] [--csv P] [--plot P]

Default: every case (``--full``): B1 Hq32 Hkv8 S32768, B32 Hq32 Hkv8 S8192 and B128 Hq32 Hkv32 S2048
(bf16, D=128), contiguous and paged (pages of 16 and 256 rows), seqlen_q 1 and 4 (causal), each with
the rotary+append variant of ours, and at seqlen_q 1 ours in its other lowering (``ours-portable``:
no TMA, contiguous; ``ours-tma16``: 16-row TMA boxes, pages of 16). The TB/s column counts the
minimal bytes (K and V read once, q, out); the ``copy`` row of each case is the device-to-device copy
bandwidth of that run.
``--dry-run`` runs a tiny case on the CPU (measures nothing).
"""
import sys

from seqgen_fast.cli import bench_script

if __name__ == "__main__":
    sys.exit(bench_script("decode", sys.argv[1:]))

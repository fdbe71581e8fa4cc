"""The shipped table of attention kernel configs: {kernel kind: {GPU name prefix: {key text: config}}}.

Key text is ``_tuning``'s ``"attention_<kind>|" + "|".join(key)`` and a config is ``[BLOCK_M,
BLOCK_N, num_warps, num_stages]`` (for the warp-specialised forward, path ``hopper-ws``: 128 rows,
BLOCK_N, 4 warps per consumer warpgroup, ring stages). Entries cover the benchmark's anchor calls
(B4 H16 S4096 D128, B16 H16 S2048 D64, B1 H16 S16384 D128 through SDPA, causal and not; the
sliding window 4096 at S16384 through flash_attention; bf16 and fp16) on H100 and H200: forward,
dK/dV and dQ kernels. They are the compile-checked defaults (spill-free, wgmma, TMA under Triton
3.6 and 3.9; tests/test_attention.py, benchmarks/NOTES.md) and have NOT been timed on a GPU yet:
a run of ``seqgen_fast.warmup`` on the GPU, or any eager call, tunes and writes the measured winner
to the disk cache, which takes precedence over this table.
"""
from __future__ import annotations

_ANCHORS: dict[str, dict[str, list[int]]] = {
    "fwd": {
        "attention_fwd|fwd|hopper-ws|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384":
            [128, 128, 4, 2],
        "attention_fwd|fwd|hopper-ws|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|4096|4096":
            [128, 128, 4, 2],
        "attention_fwd|fwd|hopper-ws|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384":
            [128, 128, 4, 2],
        "attention_fwd|fwd|hopper-ws|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|4096|4096":
            [128, 128, 4, 2],
        "attention_fwd|fwd|hopper-ws|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', True), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384":
            [128, 64, 4, 3],
        "attention_fwd|fwd|hopper-ws|bfloat16|64|64|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|2048|2048":
            [128, 128, 4, 3],
        "attention_fwd|fwd|hopper-ws|bfloat16|64|64|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|2048|2048":
            [128, 128, 4, 3],
        "attention_fwd|fwd|hopper-ws|float16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384":
            [128, 128, 4, 2],
        "attention_fwd|fwd|hopper-ws|float16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|4096|4096":
            [128, 128, 4, 2],
        "attention_fwd|fwd|hopper-ws|float16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384":
            [128, 128, 4, 2],
        "attention_fwd|fwd|hopper-ws|float16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|4096|4096":
            [128, 128, 4, 2],
        "attention_fwd|fwd|hopper-ws|float16|128|128|(('ALIBI', False), ('BAND_LEFT', True), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384":
            [128, 64, 4, 3],
        "attention_fwd|fwd|hopper-ws|float16|64|64|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|2048|2048":
            [128, 128, 4, 3],
        "attention_fwd|fwd|hopper-ws|float16|64|64|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|2048|2048":
            [128, 128, 4, 3],
    },
    "dkdv": {
        "attention_dkdv|dkdv|hopper|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384|det":
            [16, 64, 8, 2],
        "attention_dkdv|dkdv|hopper|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|4096|4096|det":
            [16, 64, 8, 2],
        "attention_dkdv|dkdv|hopper|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384|det":
            [16, 64, 8, 2],
        "attention_dkdv|dkdv|hopper|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|4096|4096|det":
            [16, 64, 8, 2],
        "attention_dkdv|dkdv|hopper|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', True), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384|det":
            [16, 64, 8, 2],
        "attention_dkdv|dkdv|hopper|bfloat16|64|64|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|2048|2048|det":
            [32, 128, 8, 2],
        "attention_dkdv|dkdv|hopper|bfloat16|64|64|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|2048|2048|det":
            [32, 128, 8, 2],
        "attention_dkdv|dkdv|hopper|float16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384|det":
            [16, 64, 8, 2],
        "attention_dkdv|dkdv|hopper|float16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|4096|4096|det":
            [16, 64, 8, 2],
        "attention_dkdv|dkdv|hopper|float16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384|det":
            [16, 64, 8, 2],
        "attention_dkdv|dkdv|hopper|float16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|4096|4096|det":
            [16, 64, 8, 2],
        "attention_dkdv|dkdv|hopper|float16|128|128|(('ALIBI', False), ('BAND_LEFT', True), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384|det":
            [16, 64, 8, 2],
        "attention_dkdv|dkdv|hopper|float16|64|64|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|2048|2048|det":
            [32, 128, 8, 2],
        "attention_dkdv|dkdv|hopper|float16|64|64|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|2048|2048|det":
            [32, 128, 8, 2],
    },
    "dq": {
        "attention_dq|dq|hopper|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|4096|4096":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|4096|4096":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|bfloat16|128|128|(('ALIBI', False), ('BAND_LEFT', True), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|bfloat16|64|64|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|2048|2048":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|bfloat16|64|64|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|2048|2048":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|float16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|float16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|4096|4096":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|float16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|float16|128|128|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|4096|4096":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|float16|128|128|(('ALIBI', False), ('BAND_LEFT', True), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|16384|16384":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|float16|64|64|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', False), ('BOTTOM_RIGHT', True), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|2048|2048":
            [128, 64, 8, 2],
        "attention_dq|dq|hopper|float16|64|64|(('ALIBI', False), ('BAND_LEFT', False), ('BAND_RIGHT', True), ('BOTTOM_RIGHT', False), ('DROPOUT', False), ('HAS_MASK', False), ('IEEE', False), ('IS_VARLEN', False), ('MASK_BOOL', False), ('SOFTCAP', False), ('TMA', True))|2048|2048":
            [128, 64, 8, 2],
    },
}

TABLE: dict[str, dict[str, dict[str, list[int]]]] = {
    kind: {"NVIDIA H100": keys, "NVIDIA H200": keys} for kind, keys in _ANCHORS.items()
}

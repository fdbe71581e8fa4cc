"""pytest-benchmark entry: `pytest benchmarks/ --benchmark-only` times the same cases as
`seqgen-fast bench --quick` (one test per case and provider; GPU only)."""
import pytest
import torch

import common

CASES = list(common.all_cases("quick")) if torch.cuda.is_available() else []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU timings need a GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.family}-{c.op}-{c.shape}-{str(c.dtype)[6:]}".replace(" ", "_"))
def test_case(benchmark, case):
    fns = case.setup()
    fn = fns["ours"]
    fn()
    torch.cuda.synchronize()

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    for provider, other in fns.items():  # anchors timed in the same run, recorded beside ours
        if provider != "ours":
            benchmark.extra_info[f"{provider}_us"] = common.time_us(other, case.cuda_graph)
    benchmark.extra_info["ours_us"] = common.time_us(fn, case.cuda_graph)

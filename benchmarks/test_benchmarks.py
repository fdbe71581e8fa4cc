"""pytest-benchmark entry: `pytest benchmarks/ --benchmark-only` times the same cases as
`seqgen-fast bench --quick` (one test per case; GPU only). The cases and the runner live in the
package (`seqgen_fast.bench`), so `seqgen-fast bench` works from an installed wheel too."""
import pytest
import torch

from seqgen_fast import bench

CASES = list(bench.all_cases("quick")) if torch.cuda.is_available() else []


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
            benchmark.extra_info[f"{provider}_us"] = bench.time_us(other, case.cuda_graph)
    benchmark.extra_info["ours_us"] = bench.time_us(fn, case.cuda_graph)

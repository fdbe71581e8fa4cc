"""seqgen_fast inside torch.distributed, on the CPU: gloo process groups of 2 ranks on loopback,
started by each test (``tests/support/distributed.py``). torch's engine does the distribution; our
part is that the swapped modules and our ops work unchanged inside it:

* DDP over a model with swapped ``nn.LSTM``, ``nn.GRU`` and ``nn.MultiheadAttention``: the losses
  and the trained parameters equal single-process training on the whole batch;
* FSDP2 ``fully_shard`` of the same model: the same losses over 3 optimizer steps;
* tensor parallelism (``parallelize_module`` with ``ColwiseParallel``/``RowwiseParallel``) of a
  Llama-style attention block whose attention is ``seqgen_fast.functional.scaled_dot_product_attention``:
  the output equals the unsharded block's;
* ``torch.distributed.checkpoint`` save and load of the FSDP2-sharded swapped model.

Everything runs in float64, so the comparisons are tight (only gloo's summation order differs).
"""
import pytest
import torch

import seqgen_fast
from seqgen_fast.integrations.swap import converters
from support import distributed as sd

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
TOL = 1e-9


def _swapped_types(model: torch.nn.Module) -> set[type]:
    """The seqgen_fast classes in ``model`` (what swap_modules put there)."""
    ours = {getattr(convert, "__self__", None) for convert in converters().values()}
    return {type(m) for m in model.modules() if type(m) in ours}


@pytest.fixture(scope="module")
def reference():
    """Single-process training of the swapped model on the whole batch: (losses, final parameters)."""
    model = sd.tiny_lm()
    assert _swapped_types(model) == {type(m) for m in model.modules()
                                     if type(m).__module__.startswith("seqgen_fast.")}
    assert {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("seqgen_fast.")} >= {
        "LSTM", "MultiheadAttention"}
    torch_losses = sd.train(sd.tiny_lm(swapped=False))
    losses = sd.train(model)
    assert losses == pytest.approx(torch_losses, rel=TOL), "the swapped model trains as torch's does"
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp(rank, world, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(sd.tiny_lm())
    losses = sd.train(model, sd.rank_rows(rank, world), reduce=True)
    sd.save(out_dir, rank, (losses, {k: v.detach() for k, v in model.module.state_dict().items()}))


def test_ddp_matches_single_process_training(reference):
    ref_losses, ref_params = reference
    for losses, params in sd.launch(_ddp, 2):
        assert losses == pytest.approx(ref_losses, rel=TOL)
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=TOL, atol=TOL, msg=name)


def _fsdp_model(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = sd.tiny_lm()
    for child in model.children():
        fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp(rank, world, out_dir):
    model = _fsdp_model(world)
    sd.save(out_dir, rank, sd.train(model, sd.rank_rows(rank, world), reduce=True))


def test_fsdp2_fully_shard_matches_single_process_losses(reference):
    for losses in sd.launch(_fsdp, 2):
        assert losses == pytest.approx(reference[0], rel=TOL)


class LlamaAttention(torch.nn.Module):
    """q/k/v/o projections around seqgen_fast's SDPA (causal, GQA); the local head counts follow the
    projections' local widths, as tensor-parallel attention does."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.head_dim = dim // heads
        self.q_proj = torch.nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = torch.nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = torch.nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = torch.nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = seqgen_fast.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


def _block_and_input():
    torch.manual_seed(0)
    return LlamaAttention().double(), torch.randn(2, 9, 32, dtype=torch.float64)


def _tp(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    block, x = _block_and_input()
    mesh = init_device_mesh("cpu", (world,))
    plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
            "o_proj": RowwiseParallel()}
    parallelize_module(block, mesh, plan)
    sd.save(out_dir, rank, block(x).detach().clone())  # clone: waits for the output all-reduce


def test_tensor_parallel_attention_block_matches_the_unsharded_block():
    block, x = _block_and_input()
    want = block(x).detach()
    for got in sd.launch(_tp, 2):
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def _checkpoint(rank, world, out_dir, ckpt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = _fsdp_model(world)
    sd.train(model, sd.rank_rows(rank, world))  # trained weights, different from a fresh model's
    dcp.save(get_model_state_dict(model), checkpoint_id=ckpt)
    fresh = _fsdp_model(world)
    state = get_model_state_dict(fresh)
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(fresh, state)
    tokens = sd.batch(0)
    sd.save(out_dir, rank, (sd.lm_loss(model, tokens).item(), sd.lm_loss(fresh, tokens).item()))


def test_distributed_checkpoint_saves_and_loads_a_swapped_model(tmp_path):
    for trained, restored in sd.launch(_checkpoint, 2, str(tmp_path / "ckpt")):
        assert restored == pytest.approx(trained, rel=TOL)

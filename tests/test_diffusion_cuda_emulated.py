"""csrc/diffusion.cu run on the host under the SIMT emulation of tests/support/emulation.py (no GPU needed).

The kernel file is compiled by g++ as it is, against the stand-in CUDA headers (its launch, through
csrc/common.cuh's SEQGEN_LAUNCH, runs emulated: blockIdx.y is the sample, 256 host threads per block)
and its host launcher ``seqgen::diffusion::step`` -- the function the pybind binding exposes -- is called
through a tiny ``extern "C"`` shim with pointers to CPU tensors, the arguments built by
``seqgen_fast.kernels.diffusion_cuda.plan`` and ``launch_args`` exactly as ``_step_cuda`` builds them. Outputs are
poisoned with NaN first and compared with ``seqgen_fast.reference.diffusion.diffusion_step`` on
the same coefficient table: 16-byte and element-wise paths (odd N, misaligned views), fp32/fp16/
bf16, CFG (scalar and per-sample guidance), model_scale, clip and thresholding, timesteps of every
dtype code (with NaN rows for keys outside the table), given noise (same dtype and fp32), and the
in-kernel Philox noise bit-for-bit against a NumPy Philox4x32-10 (plus moments and seeding).
"""
import ctypes

import numpy as np
import pytest
import torch

from support.emulation import build
from seqgen_fast._contract import D0, DX, NCOEF
from seqgen_fast.kernels.diffusion_cuda import ARGS, launch_args, plan
from seqgen_fast.ops import diffusion as ops
from seqgen_fast.reference import diffusion as ref

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ATOL = {F32: 2e-5, F16: 2e-3, BF16: 2e-2}  # fp32 math on both sides; the rest is the output rounding
B, ROWS = 3, 11

_MAIN = r"""#include "seqgen_emulation_shim.h"
#include "diffusion.h"
extern "C" int emu_diffusion_step(uptr sample, uptr model_output, uptr out, uptr x0, uptr noise, uptr coef,
                                  uptr timesteps, int ts_dtype, long long ts_stride, uptr guidance, uptr model_scale,
                                  uptr threshold, long long batch, long long n, long long rows, long long key, int cfg,
                                  float guidance_scale, int x0_mode, float clip_range, int noise_mode,
                                  unsigned long long seed, unsigned offset, uptr rng_offset, int dtype,
                                  int noise_dtype) {
  EMU_CALL(seqgen::diffusion::step(sample, model_output, out, x0, noise, coef, timesteps, ts_dtype, ts_stride,
                                   guidance, model_scale, threshold, batch, n, rows, key, cfg, guidance_scale,
                                   x0_mode, clip_range, noise_mode, seed, offset, rng_offset, dtype, noise_dtype, 0,
                                   0))
}
"""
_P, _I, _L, _F = ctypes.c_size_t, ctypes.c_int, ctypes.c_longlong, ctypes.c_float
_ARGS = [("sample", _P), ("model_output", _P), ("out", _P), ("x0", _P), ("noise", _P), ("coef", _P),
         ("timesteps", _P), ("ts_dtype", _I), ("ts_stride", _L), ("guidance", _P), ("model_scale", _P),
         ("threshold", _P), ("batch", _L), ("n", _L), ("rows", _L), ("key", _L), ("cfg", _I),
         ("guidance_scale", _F), ("x0_mode", _I), ("clip_range", _F), ("noise_mode", _I),
         ("seed", ctypes.c_ulonglong), ("offset", ctypes.c_uint), ("rng_offset", _P), ("dtype", _I),
         ("noise_dtype", _I)]


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    """Runs csrc/diffusion.cu's launcher on CPU tensors with the arguments _step_cuda would pass."""
    h = build(str(tmp_path_factory.mktemp("diffusion_emu")), "diffusion.cu", _MAIN, "diffusion_emu")
    h.emu_diffusion_step.argtypes = [t for _, t in _ARGS]

    def run(sample, model_output, coef, key, timesteps=None, guidance=None, model_scale=None, threshold=None,
            noise=None, noise_mode=0, cfg=False, guidance_scale=0.0, x0_mode=0, clip_range=1.0, seed=0, offset=0,
            rng_offset=None, write_x0=False, misaligned_out=False):
        out, out_buf = _guarded(sample, misaligned_out)
        x0, x0_buf = _guarded(sample, misaligned_out) if write_x0 else (None, None)
        p = plan(sample, coef, timesteps, noise, noise_mode, cfg, x0_mode, clip_range, device=0)
        kw = dict(zip(ARGS, launch_args(p, sample, model_output, coef, key, timesteps, guidance, model_scale,
                                        threshold, noise, guidance_scale, seed, offset, rng_offset, out, x0, 0)))
        assert kw.pop("device") == 0 and kw.pop("stream") == 0
        if h.emu_diffusion_step(*[kw[name] for name, _ in _ARGS]):
            raise RuntimeError(h.emu_error_message().decode())
        for buf, view in ((out_buf, out), (x0_buf, x0)):
            if buf is not None:
                start = (view.data_ptr() - buf.data_ptr()) // buf.element_size()
                guard = torch.cat([buf[:start], buf[start + view.numel():]])
                assert (guard == _SENTINEL).all(), "the kernel wrote outside its output"
        return out, x0
    return run


_SENTINEL = 7.0  # exact in every dtype; fills GUARD elements on either side of each output


def _guarded(like, misaligned, guard=16):
    """A NaN-poisoned output shaped like ``like`` inside a sentinel-filled buffer (one element off a
    16-byte boundary when misaligned) so writes outside it are caught."""
    buf = torch.full((like.numel() + 2 * guard + 1,), _SENTINEL, dtype=like.dtype)
    start = guard + int(misaligned)
    view = buf[start:start + like.numel()].view(like.shape).fill_(float("nan"))
    assert (view.data_ptr() % 16 == 0) != misaligned
    return view, buf


def _coef(seed=0):
    """A random table over the columns the CUDA kernel reads (0..7 and aux_x, aux_x0); the others zero."""
    g = torch.Generator().manual_seed(seed)
    coef = torch.zeros(ROWS, NCOEF)
    used = list(range(8)) + [DX, D0]
    coef[:, used] = (torch.rand(ROWS, len(used), generator=g) * 2.4 - 1.2).float()
    return coef


def _view(t, misaligned):
    """t itself, or a copy of t whose storage starts one element past a 16-byte boundary."""
    if not misaligned:
        return t
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    assert v.data_ptr() % 16 != 0
    return v


def _reference(sample, model_output, coef, key, timesteps=None, guidance=None, model_scale=None, threshold=None,
               noise=None, noise_mode=0, cfg=False, guidance_scale=0.0, x0_mode=0, clip_range=1.0, seed=0, offset=0):
    B_ = sample.shape[0]
    u, k = (model_output[:B_], model_output[B_:]) if cfg else (model_output, None)
    out, aux, _, _ = ref.diffusion_step(sample, u, k, None, None, None, None, None, noise, coef, key, timesteps,
                                        None, guidance_scale, guidance, model_scale, x0_mode, clip_range, threshold,
                                        noise_mode, 0, seed, offset, None, sample.dtype, sample.dtype, None, None)
    return out, aux


def _check(got, want, dtype, what):
    assert not torch.isnan(got).all(), f"{what}: nothing written"
    torch.testing.assert_close(got.float(), want.float(), atol=ATOL[dtype], rtol=ATOL[dtype], equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


CASES = [  # (N, dtype, cfg, per-sample guidance, model_scale, x0_mode, timesteps, noise dtype, misaligned)
    (37, F32, False, False, False, 0, None, None, False),          # odd N: element-wise, partial pack
    (37, F16, True, False, False, 1, None, None, False),
    (4096 + 5, F32, True, True, True, 0, None, None, False),       # 5 blocks in x, ragged last pack
    (4096 + 5, F16, False, False, False, 2, torch.int64, F16, False),
    (4096, F32, False, False, False, 1, None, F32, False),         # 16-byte path, noise vectorised
    (4096, F16, True, True, True, 2, torch.float32, F32, False),   # 16-byte path, fp32 noise (NT=float)
    pytest.param(4096, BF16, True, False, False, 0, torch.int32, BF16, False, marks=pytest.mark.smoke),
    (4096, F32, True, False, True, 1, torch.float32, F32, True),   # misaligned views: element-wise
    (4096, F16, False, False, False, 0, None, F16, True),
    (8 * 5, F16, True, False, False, 0, None, None, False),        # N % 8 == 0, one partial block
]


@pytest.mark.parametrize("N,dtype,cfg,per_g,scale,x0_mode,ts_dtype,noise_dtype,misaligned", CASES)
def test_emulated_step_matches_reference(step, N, dtype, cfg, per_g, scale, x0_mode, ts_dtype, noise_dtype,
                                         misaligned):
    g = torch.Generator().manual_seed(N * 7 + x0_mode)
    coef = _coef(N)
    sample = torch.randn(B, N, generator=g).to(dtype)
    model_output = torch.randn((2 * B if cfg else B), N, generator=g).to(dtype)
    kw = dict(cfg=cfg, guidance_scale=4.5 if cfg else 0.0, x0_mode=x0_mode, clip_range=0.8)
    if per_g:
        kw["guidance"] = torch.tensor([1.0, 3.5, 7.0])
    if scale:
        kw["model_scale"] = torch.tensor([0.9, 1.1, 0.5])
    key = 4
    if ts_dtype is not None:
        key = -1
        # 2.5 (non-integer) and 11 (past the table): NaN rows
        ts = {torch.int64: [3, 10, 0], torch.int32: [7], torch.float32: [3.0, 2.5, 11.0]}[ts_dtype]
        kw["timesteps"] = torch.tensor(ts, dtype=ts_dtype)
    if noise_dtype is not None:
        kw["noise"] = torch.randn(B, N, generator=g).to(noise_dtype)
        kw["noise_mode"] = 1
    if x0_mode == 2:
        pre = kw["noise"].float() if "noise" in kw else None
        u, k = (model_output[:B], model_output[B:]) if cfg else (model_output, None)
        x0 = ops.predict_x0(sample, u, k, coef, key, kw.get("timesteps"), None, kw["guidance_scale"],
                            kw.get("guidance"), kw.get("model_scale"), pre)
        kw["threshold"] = ops.threshold_scale(x0, 0.9, 2.5)
    want_out, want_x0 = _reference(sample, model_output, coef, key, **kw)
    sample_v, mo_v = _view(sample, misaligned), _view(model_output, misaligned)
    if "noise" in kw:
        kw["noise"] = _view(kw["noise"], misaligned)
    out, x0 = step(sample_v, mo_v, coef, key, write_x0=True, misaligned_out=misaligned, **kw)
    _check(out, want_out, dtype, "out")
    _check(x0, want_x0, dtype, "x0")
    if ts_dtype == torch.float32:
        assert torch.isnan(out[1:]).all() and not torch.isnan(out[0]).any()


def test_emulated_step_without_x0_writes_only_out(step):
    sample, mo, coef = torch.randn(B, 37), torch.randn(B, 37), _coef(1)
    out, x0 = step(sample, mo, coef, 2)
    assert x0 is None
    _check(out, _reference(sample, mo, coef, 2)[0], F32, "out")


def test_emulated_step_rejects_bad_arguments(step):
    sample = torch.randn(B, 8)
    with pytest.raises(RuntimeError, match="key < 0 needs timesteps"):
        step(sample, sample, _coef(), -1)
    with pytest.raises(RuntimeError, match="x0_mode 2 needs threshold"):
        step(sample, sample, _coef(), 1, x0_mode=2)


# ---- in-kernel noise: Philox4x32-10 + Box-Muller, reproduced in NumPy ----------------------------
def _philox_normals(seed, offset, batch, n):
    """The [batch, n] normals of csrc/diffusion.h's noise_mode 2 (float64 transcendental math)."""
    m32 = np.uint64(0xFFFFFFFF)
    groups = (n + 3) // 4
    gi, bi = np.meshgrid(np.arange(groups, dtype=np.uint64), np.arange(batch, dtype=np.uint64))
    c = [gi, bi, np.full_like(gi, offset), np.zeros_like(gi)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32

    def uniform(w):
        x = w.astype(np.uint32).view(np.int32).astype(np.int64)
        x = np.where(x < 0, ~x, x)
        return x.astype(np.float32) * np.float32(4.6566127342e-10)

    u0, u2 = np.maximum(uniform(c[0]), np.float32(1e-7)), np.maximum(uniform(c[2]), np.float32(1e-7))
    ra, rb = np.sqrt(-2.0 * np.log(u0.astype(np.float64))), np.sqrt(-2.0 * np.log(u2.astype(np.float64)))
    a1 = (np.float32(6.283185307179586) * uniform(c[1])).astype(np.float64)
    a3 = (np.float32(6.283185307179586) * uniform(c[3])).astype(np.float64)
    z = np.stack([ra * np.cos(a1), ra * np.sin(a1), rb * np.cos(a3), rb * np.sin(a3)], axis=-1)
    return torch.from_numpy(z.reshape(batch, groups * 4)[:, :n].astype(np.float32))


def _noise_only_coef():
    coef = torch.zeros(ROWS, NCOEF)
    coef[0, ref.AN] = 1.0  # out = noise
    return coef


@pytest.mark.parametrize("N,dtype,misaligned", [pytest.param(4096, F32, False, marks=pytest.mark.smoke),
                                                (4096, F32, True), (4096 + 5, F16, False), (37, F32, False)])
def test_emulated_in_kernel_noise_is_philox(step, N, dtype, misaligned):
    seed, offset = 0x0123456789ABCDEF, 5
    z = torch.zeros(B, N, dtype=dtype)
    out, _ = step(_view(z, misaligned), _view(z, misaligned), _noise_only_coef(), 0, noise_mode=2, seed=seed,
                  offset=offset, misaligned_out=misaligned)
    want = _philox_normals(seed, offset, B, N)
    torch.testing.assert_close(out.float(), want.to(dtype).float(), atol=2e-3 if dtype == F32 else 8e-3,
                               rtol=ATOL[dtype])


def test_emulated_in_kernel_noise_moments_and_seeding(step):
    N, coef = 4096 + 5, _noise_only_coef()
    z = torch.zeros(B, N)
    a = step(z, z, coef, 0, noise_mode=2, seed=11, offset=0)[0]
    assert torch.equal(a, step(z, z, coef, 0, noise_mode=2, seed=11, offset=0)[0])
    for other in (dict(seed=12, offset=0), dict(seed=11, offset=1)):
        assert torch.isclose(a, step(z, z, coef, 0, noise_mode=2, **other)[0]).double().mean() < 0.01
    assert not torch.equal(a[0], a[1])  # samples draw different streams
    # a device-side offset adds to the host one, modulo the 32-bit counter word
    for host, dev in ((0, 1), (3, 2**32 - 2)):
        moved = step(z, z, coef, 0, noise_mode=2, seed=11, offset=host, rng_offset=torch.tensor([dev]))[0]
        assert torch.equal(moved, step(z, z, coef, 0, noise_mode=2, seed=11, offset=1)[0])
    flat = a.double().flatten()
    assert abs(flat.mean()) < 0.05 and abs(flat.var() - 1) < 0.06
    assert 0.3 < (flat.abs() < 0.6745).double().mean() < 0.7  # half the mass inside the quartiles

    # the full step with in-kernel noise equals the reference given that noise (pre_noise and noise terms)
    sample, mo, full = torch.randn(B, N), torch.randn(B, N), _coef(3)
    out, x0 = step(sample, mo, full, 6, noise_mode=2, seed=11, offset=0, write_x0=True)
    want = _reference(sample, mo, full, 6, noise=_philox_normals(11, 0, B, N), noise_mode=1)
    torch.testing.assert_close(out, want[0], atol=5e-3, rtol=1e-4)
    torch.testing.assert_close(x0, want[1], atol=5e-3, rtol=1e-4)

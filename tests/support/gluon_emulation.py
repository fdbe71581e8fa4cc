"""A CPU emulation of Gluon kernels for the Hopper dialect (no GPU needed).

Triton's interpreter does not run Gluon. This runs a ``gluon.jit`` kernel's Python body, and the
``triton.jit`` helpers it calls, against stand-ins for ``gl``, ``tl``, ``mbarrier``, ``tma`` and
``warpgroup_mma`` written in torch: scalars are 0-d tensors, pointers index the arguments' storage,
layouts are ignored (the ahead-of-time compiles check them), shared memory is a tensor.

What it checks is the kernel's algorithm and its synchronisation protocol:

* every partition of ``gl.warp_specialize`` is a host thread; mbarriers keep PTX's phase parity,
  arrival count and TMA transaction bytes, and a wait that never completes fails the launch
  (a deadlock) instead of hanging;
* a TMA load copies its box at issue (rows and columns outside the descriptor's shape read 0) and
  completes its transaction bytes; a TMA box needs the barrier's expected bytes to match;
* an asynchronous ``warpgroup_mma`` computes at its ``warpgroup_mma_wait``, from the shared memory
  as it is then, and fails if that memory changed since the issue (a buffer released or refilled
  while a wgmma could still read it); its result cannot be used before the wait (it is a token);
* the threads yield at every barrier operation, so partitions interleave.

It cannot check layouts, register or shared-memory limits, or speed.
"""
from __future__ import annotations

import inspect
import math
import threading
import time
import types

import torch
import triton.language as real_tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_JIT = (JITFunction, InterpretedFunction)  # a triton.jit function is the latter under TRITON_INTERPRET=1

TIMEOUT_S = 20.0


class EmulationError(AssertionError):
    pass


# ----------------------------------------------------------------------------------------------
# Values: pointers, shared memory, barriers, descriptors
# ----------------------------------------------------------------------------------------------
class _DType:
    def __init__(self, torch_dtype):
        self.element_ty = torch_dtype


class Ptr:
    """A pointer (or a tensor of pointers) into the storage of a torch tensor, in elements."""

    def __init__(self, flat: torch.Tensor, offset):
        self.flat = flat
        self.offset = offset
        self.dtype = _DType(flat.dtype)

    @staticmethod
    def of(t: torch.Tensor) -> "Ptr":
        flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(),
                                                   (t.untyped_storage().nbytes() // t.element_size()
                                                    - t.storage_offset(),), (1,))
        return Ptr(flat, torch.tensor(0, dtype=torch.int64))

    def __add__(self, other):
        return Ptr(self.flat, self.offset + _value(other))

    __radd__ = __add__

    def _index(self, mask):
        off = torch.as_tensor(self.offset, dtype=torch.int64)
        if mask is not None:
            off = torch.where(torch.as_tensor(mask), off, torch.zeros_like(off))
        if off.numel() and (off.min() < 0 or off.max() >= self.flat.numel()):
            raise EmulationError(f"access outside the tensor: offsets {int(off.min())}..{int(off.max())} "
                                 f"of {self.flat.numel()} elements")
        return off


def _value(x):
    return x.value if isinstance(x, real_tl.constexpr) else x


def _load(ptr: Ptr, mask=None, other=0.0, **_):
    off = ptr._index(mask)
    out = ptr.flat[off]
    if mask is not None:
        out = torch.where(torch.as_tensor(mask), out, torch.as_tensor(other, dtype=out.dtype))
    return out


def _store(ptr: Ptr, value, mask=None, **_):
    off = ptr._index(mask)
    value = torch.as_tensor(value).to(ptr.flat.dtype).expand(off.shape)
    keep = torch.ones(off.shape, dtype=torch.bool) if mask is None else torch.as_tensor(mask).expand(off.shape)
    ptr.flat[off[keep]] = value[keep]


class _Layout:
    def __init__(self, *args, **kwargs):
        pass

    @staticmethod
    def get_default_for(*args, **kwargs):
        return _Layout()


class _MemType:
    def __init__(self, layout):
        self.layout = layout


class Smem:
    """A shared-memory buffer (or a view of one)."""

    def __init__(self, data: torch.Tensor, layout):
        self.data = data
        self.dtype = data.dtype
        self.type = _MemType(layout)
        self.shape = list(data.shape)

    def index(self, i):
        return Smem(self.data[int(i)], self.type.layout)

    def permute(self, order):
        return Smem(self.data.permute(*order), self.type.layout)


class _Abort:
    """Set when a partition fails, so that the others stop waiting."""

    def __init__(self):
        self.error: BaseException | None = None


class Barrier:
    """One mbarrier: arrival count, transaction bytes and the number of completed phases."""

    def __init__(self, cond: threading.Condition, abort: _Abort):
        self.cond = cond
        self.abort = abort
        self.count = None
        self.pending = 0
        self.tx = 0
        self.completed = 0

    def init(self, count):
        self.count = self.pending = int(count)

    def _check_init(self):
        if self.count is None:
            raise EmulationError("mbarrier used before mbarrier.init")

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.completed += 1
            self.pending = self.count
            self.cond.notify_all()

    def arrive(self, count=1, tx=0):
        with self.cond:
            self._check_init()
            self.tx += tx
            self.pending -= count
            if self.pending < 0:
                raise EmulationError("mbarrier arrived more often than its count in one phase")
            self._maybe_complete()

    def complete_tx(self, nbytes):
        with self.cond:
            self.tx -= nbytes
            if self.tx < 0:
                raise EmulationError("TMA completed more bytes than the barrier expects")
            self._maybe_complete()

    def wait(self, parity):
        parity = int(parity)
        deadline = time.monotonic() + TIMEOUT_S
        with self.cond:
            self._check_init()
            while self.completed % 2 == parity:  # PTX try_wait.parity: the phase of this parity completed?
                if self.abort.error is not None:
                    raise EmulationError("another partition failed") from self.abort.error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EmulationError(f"deadlock: mbarrier wait for phase parity {parity} never completed "
                                         f"({self.pending} arrivals and {self.tx} bytes missing)")
                self.cond.wait(min(left, 0.05))


class BarrierArray:
    def __init__(self, n, cond, abort):
        self.bars = [Barrier(cond, abort) for _ in range(n)]

    def index(self, i):
        return self.bars[int(i)]


class _BlockType:
    def __init__(self, shape, dtype):
        self.shape = shape
        self.nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


class Descriptor:
    """A TMA tensor descriptor of a 2-D row-major region."""

    def __init__(self, base: Ptr, shape, strides, block_shape):
        self.base = base
        self.shape = [int(_value(s)) for s in shape]
        self.strides = [int(_value(s)) for s in strides]
        self.block_shape = [int(_value(b)) for b in block_shape]
        self.block_type = _BlockType(self.block_shape, base.flat.dtype)
        if self.strides[-1] != 1:
            raise EmulationError("a TMA descriptor needs a unit inner stride")

    def box(self, coord):
        r0, c0 = (int(c) for c in coord)
        rows = r0 + torch.arange(self.block_shape[0])
        cols = c0 + torch.arange(self.block_shape[1])
        inside = ((rows >= 0) & (rows < self.shape[0]))[:, None] & ((cols >= 0) & (cols < self.shape[1]))[None, :]
        off = self.base.offset + rows[:, None] * self.strides[0] + cols[None, :]
        return _load(Ptr(self.base.flat, off), mask=inside, other=0)


# ----------------------------------------------------------------------------------------------
# Per-thread state: the program id and the wgmma groups in flight
# ----------------------------------------------------------------------------------------------
_thread = threading.local()


class _Mma:
    def __init__(self, a, b, acc, use_acc):
        self.a, self.b, self.acc, self.use_acc = a, b, acc, bool(use_acc)
        self.snapshot = [x.data.clone() for x in (a, b) if isinstance(x, Smem)]
        self.result = None

    def compute(self):
        now = [x.data for x in (self.a, self.b) if isinstance(x, Smem)]
        if any(not torch.equal(s, n) for s, n in zip(self.snapshot, now)):
            raise EmulationError("shared memory read by an in-flight wgmma changed before its wait")
        a = self.a.data if isinstance(self.a, Smem) else self.a
        out = a.float() @ self.b.data.float()
        if self.use_acc:
            acc = self.acc.result if isinstance(self.acc, Token) else self.acc
            if acc is None:
                raise EmulationError("a wgmma accumulates onto one that has not completed")
            out = out + acc.float()
        self.result = out


class Token:
    """The result of an asynchronous wgmma: usable only after a warpgroup_mma_wait."""

    def __init__(self, mma: _Mma):
        self.mma = mma

    @property
    def result(self):
        return self.mma.result


def _warpgroup_mma(a, b, acc, *, use_acc=True, is_async=False, **_):
    mma = _Mma(a, b, acc, _bool(use_acc))
    if not is_async:
        mma.compute()
        return mma.result
    _thread.pending.append(mma)
    return Token(mma)


def _warpgroup_mma_wait(num_outstanding=0, deps=None):
    _yield()  # the wgmma runs meanwhile: a buffer released too early gets refilled here
    while len(_thread.pending) > int(_value(num_outstanding)):
        _thread.pending.pop(0).compute()
    out = []
    for d in deps:
        if isinstance(d, Token):
            if d.result is None:
                raise EmulationError("warpgroup_mma_wait returns a wgmma result that is still in flight")
            d = d.result
        out.append(d)
    return out[0] if len(out) == 1 else tuple(out)


def _bool(x):
    return bool(torch.as_tensor(x))


# ----------------------------------------------------------------------------------------------
# The stand-in modules
# ----------------------------------------------------------------------------------------------
class _Lang(types.SimpleNamespace):
    """The element-wise, reduction and creation ops shared by the ``gl`` and ``tl`` stand-ins."""


def _t(x):
    return torch.as_tensor(_value(x))


def _reduce(x, axis, combine_fn, keep_dims=False):
    """``tl.reduce``: ``combine_fn`` folded over ``axis`` (an emulated JIT function, element-wise)."""
    parts = _t(x).unbind(int(_value(axis)))
    out = parts[0]
    for part in parts[1:]:
        out = combine_fn(out, part)
    return out.unsqueeze(int(_value(axis))) if keep_dims else out


def _lang() -> _Lang:
    lang = _Lang(
        constexpr=_value, float32=torch.float32, float16=torch.float16, bfloat16=torch.bfloat16, int64=torch.int64,
        int32=torch.int32, int1=torch.bool,
        program_id=lambda axis=0: torch.tensor(_thread.pid, dtype=torch.int32),
        num_programs=lambda axis=0: torch.tensor(_thread.grid, dtype=torch.int32),
        arange=lambda start, end, layout=None: torch.arange(int(_value(start)), int(_value(end)), dtype=torch.int32),
        full=lambda shape, value, dtype, layout=None: torch.full([int(_value(s)) for s in shape], float(value),
                                                                 dtype=dtype),
        zeros=lambda shape, dtype, layout=None: torch.zeros([int(_value(s)) for s in shape], dtype=dtype),
        where=lambda c, a, b: torch.where(_t(c), _t(a), _t(b)),
        maximum=lambda a, b, propagate_nan=None: torch.maximum(_t(a), _t(b)),  # NaN-keeping, as PropagateNan.ALL
        PropagateNan=real_tl.PropagateNan, reduce=_reduce,
        minimum=lambda a, b: torch.minimum(_t(a), _t(b)),
        max=lambda x, axis: x.amax(int(axis)),
        sum=lambda x, axis: x.sum(int(axis)),
        exp2=lambda x: torch.exp2(_t(x)),
        log2=lambda x: torch.log2(_t(x)),
        abs=lambda x: torch.abs(_t(x)),
        cdiv=lambda a, b: (_t(a) + _t(b) - 1) // _t(b),
        load=_load, store=_store,
        convert_layout=lambda x, layout, assert_trivial=False: x,
        static_range=lambda *a: range(*(int(_value(x)) for x in a)),
        NVMMADistributedLayout=_Layout, DotOperandLayout=_Layout, SliceLayout=_Layout, BlockedLayout=_Layout,
        NVMMASharedLayout=_Layout,
    )
    lang.math = types.SimpleNamespace(exp2=lang.exp2, log2=lang.log2)
    return lang


def _allocate_shared_memory(dtype, shape, layout, value=None):
    shape = [int(_value(s)) for s in shape]
    if isinstance(layout, _MBarrierLayout):
        return BarrierArray(shape[0], _thread.cond, _thread.abort) if len(shape) > 1 \
            else BarrierArray(1, _thread.cond, _thread.abort).index(0)
    data = torch.full(shape, float("nan"), dtype=dtype)  # poisoned until written
    return Smem(data, layout)


class _MBarrierLayout(_Layout):
    pass


def _yield():
    time.sleep(1e-4)  # lets the other partitions run between any two barrier operations


def _mb_init(bar, count):
    bar.init(_value(count))


def _mb_expect(bar, nbytes, pred=True):
    _yield()
    if _bool(pred):
        bar.arrive(1, tx=int(_value(nbytes)))


def _mb_arrive(bar, *, count=1, pred=True):
    if _bool(pred):
        bar.arrive(int(_value(count)))
    _yield()


def _mb_wait(bar, phase, pred=True, deps=()):
    _yield()
    if _bool(pred):
        bar.wait(phase)


def _tma_load(desc: Descriptor, coord, bar: Barrier, result: Smem, pred=True, **_):
    if not _bool(pred):
        return
    if list(result.data.shape) != desc.block_shape:
        raise EmulationError(f"TMA box {desc.block_shape} into a buffer of shape {list(result.data.shape)}")
    result.data.copy_(desc.box(coord).to(result.dtype))
    bar.complete_tx(desc.block_type.nbytes)


def _make_tensor_descriptor(base, shape, strides, block_shape, layout=None, padding_option="zero"):
    return Descriptor(base, shape, strides, block_shape)


def _warp_specialize(functions_and_args, worker_num_warps, worker_num_regs=None):
    abort = _thread.abort
    pid, grid, cond = _thread.pid, _thread.grid, _thread.cond

    def run(fn, args):
        _thread.pid, _thread.grid, _thread.cond, _thread.abort, _thread.pending = pid, grid, cond, abort, []
        try:
            fn(*args)
            if _thread.pending:
                raise EmulationError(f"{fn.__name__} ended with {len(_thread.pending)} wgmma groups never waited")
        except BaseException as e:  # handed to the launching thread below
            if abort.error is None:
                abort.error = e
            with cond:
                cond.notify_all()

    threads = [threading.Thread(target=run, args=(fn, tuple(args)), daemon=True) for fn, args in functions_and_args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if abort.error is not None:
        raise abort.error


def _modules() -> dict:
    lang = _lang()
    gl = _Lang(**vars(lang), allocate_shared_memory=_allocate_shared_memory, warp_specialize=_warp_specialize)
    mbarrier = types.SimpleNamespace(MBarrierLayout=_MBarrierLayout, init=_mb_init, expect=_mb_expect,
                                     arrive=_mb_arrive, wait=_mb_wait)
    tma = types.SimpleNamespace(make_tensor_descriptor=_make_tensor_descriptor, async_load=_tma_load,
                                async_copy_global_to_shared=_tma_load)
    return dict(gl=gl, tl=lang, mbarrier=mbarrier, tma=tma, _tma_load=_tma_load, _barrier=lambda: None,
                warpgroup_mma=_warpgroup_mma, warpgroup_mma_wait=_warpgroup_mma_wait)


def _rebuild(fn, fakes: dict, done: dict):
    """The raw Python function of a (Gluon or Triton) JIT function, its globals swapped for the
    stand-ins and its JIT callees rebuilt the same way."""
    if id(fn) in done:
        return done[id(fn)]
    raw = fn.fn
    g = dict(raw.__globals__)
    new = types.FunctionType(raw.__code__, g, raw.__name__, raw.__defaults__, raw.__closure__)
    done[id(fn)] = new
    for name in raw.__code__.co_names:
        v = g.get(name)
        if isinstance(v, _JIT):
            g[name] = _rebuild(v, fakes, done)
        elif isinstance(v, real_tl.constexpr):
            g[name] = v.value
    for name, v in fakes.items():
        if name in g:
            g[name] = v
    return new


def launch(kernel, grid: int, *args, **constexprs):
    """Run ``kernel`` (a ``gluon.jit`` function) on ``grid`` programs, one after another. Tensor
    arguments become pointers, Python numbers 0-d tensors; ``constexprs`` bind by name."""
    fn = _rebuild(kernel, _modules(), {})
    params = list(inspect.signature(kernel.fn).parameters)
    runtime = [p for p in params if p not in constexprs]
    if len(args) != len(runtime):
        raise TypeError(f"{kernel.fn.__name__} takes {len(runtime)} runtime arguments ({runtime}), got {len(args)}")
    bound = dict(zip(runtime, args))
    call = []
    for p in params:
        v = constexprs[p] if p in constexprs else bound[p]
        if isinstance(v, torch.Tensor):
            v = Ptr.of(v)
        elif isinstance(v, bool) or p in constexprs:
            pass
        elif isinstance(v, int):
            v = torch.tensor(v, dtype=torch.int32 if abs(v) < 2**31 else torch.int64)
        elif isinstance(v, float):
            v = torch.tensor(v, dtype=torch.float32)
        call.append(v)
    for pid in range(grid):
        _thread.pid, _thread.grid, _thread.cond, _thread.abort, _thread.pending = pid, grid, threading.Condition(), \
            _Abort(), []
        fn(*call)

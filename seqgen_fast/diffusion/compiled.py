"""The fused scheduler step inside ``torch.compile``: its state kept where tracing does not specialise on it.

Dynamo specialises a graph on every Python int it reads from an object: diffusers' ``_step_index``,
``lower_order_nums`` and ``this_order``, and the wrapper's noise offset. A step that reads them as ints
would recompile at every step, and ``fullgraph=True`` fails at the recompile limit. While the fused step
is traced, that state lives on the device instead:

- ``DeviceCounter``: an int held in a (1,) int64 device tensor, stored in diffusers' own attribute. Read
  eagerly (``int()``, ``__index__``, comparisons, arithmetic) it is that int, at the cost of one host sync,
  so diffusers' own methods (``scale_model_input``, its ``step``) keep working. The first eager fused step
  turns it back into an int (``to_host``).
- The noise offset of compiled steps: ``_State.compiled_offset``, a device tensor the kernel adds to the
  host offset.
- The coefficient row of a step: chosen on the device from the counters (``row``), and read by the kernel
  through its per-sample row path. An index past the schedule gives a NaN row; eagerly it is an error.
- The coefficient tables: ``set_timesteps`` rebuilds every table the scheduler has used. A table still
  missing when a step is traced is built once, at trace time (``table_while_tracing``).
- Solver history slots that diffusers leaves None are filled with zeros the first time
  (``fill_history``). diffusers never reads a slot its warm-up has not filled, and the graph then does not
  depend on which slots are set.

Under compile, the schedule is seen through ``set_timesteps`` (or an eager step): assigning schedule
attributes by hand between compiled steps is not seen.
"""
from __future__ import annotations

import torch

COUNTERS = ("_step_index", "lower_order_nums", "this_order")


class DeviceCounter:
    """An int kept on the device as a (1,) int64 tensor ``value`` (see the module docstring)."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor):
        self.value = value

    def __int__(self) -> int:
        return int(self.value.item())

    __index__ = __int__

    def __reduce__(self):
        return int, (int(self),)

    def __repr__(self) -> str:
        return repr(int(self))


def _as_int(name: str):
    return lambda self, *args: getattr(int(self), name)(*args)


for _name in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__bool__", "__str__",
              "__format__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__",
              "__mod__", "__neg__"):
    setattr(DeviceCounter, _name, _as_int(_name))


def to_host(s) -> None:
    """Before an eager step: the counters back to ints, and the compiled steps' noise offset folded into the
    host offset (one sync each, only after compiled steps)."""
    d = s.__dict__
    for name in COUNTERS:
        value = d.get(name)
        if type(value) is DeviceCounter:
            d[name] = int(value)
    sf = s._sf_state
    if sf.compiled_offset is not None:
        sf.offset += int(sf.compiled_offset.item())
        sf.compiled_offset = None


def counter(s, name: str, device) -> torch.Tensor:
    """Counter ``name`` as a (1,) int64 device tensor (a host int is copied: the graph holds its value)."""
    value = getattr(s, name)
    if type(value) is DeviceCounter:
        return value.value
    return torch.full((1,), int(value), dtype=torch.int64, device=device)


def store(s, name: str, value: torch.Tensor) -> None:
    """Set counter ``name`` to the (1,) device tensor ``value``."""
    current = getattr(s, name, None)
    if type(current) is DeviceCounter:
        current.value = value
    else:
        setattr(s, name, DeviceCounter(value))


def step_index(s, timestep, device) -> torch.Tensor:
    """The step index as a (1,) int64 device tensor: diffusers' counter, else its begin index, else (diffusers'
    ``index_for_timestep``) the position of ``timestep`` in ``s.timesteps``, the second of two equal ones.
    A timestep not in the schedule gives n, past the end."""
    if s._step_index is not None:
        return counter(s, "_step_index", device)
    begin = getattr(s, "_begin_index", None)
    if begin is not None:
        return torch.full((1,), int(begin), dtype=torch.int64, device=device)
    schedule = s.timesteps.to(device)
    n = schedule.shape[0]
    t = torch.as_tensor(timestep, device=device).to(schedule.dtype).reshape(-1)[:1]
    pos = torch.arange(n, device=device)
    eq = schedule == t
    first = torch.where(eq, pos, n).amin()
    second = torch.where(eq & (pos != first), pos, n).amin()
    return torch.where(second < n, second, first).reshape(1)


def row(block: torch.Tensor | int, index: torch.Tensor, n: int) -> torch.Tensor:
    """Row ``block * n + index`` of a table of stacked n-row blocks; -1 (a NaN row) for an index past them."""
    return torch.where((index >= 0) & (index < n), block * n + index, -1)


def at(selector: torch.Tensor, index: torch.Tensor, column: int = 0) -> torch.Tensor:
    """``selector[index, column]`` (an (n, C) float table of small ints) as int64, the index clamped in range."""
    n = selector.shape[0]
    return selector[:, column].index_select(0, index.clamp(0, n - 1)).to(torch.int64)


def fill_history(s, shape, dtype, device, timestep=None) -> None:
    """diffusers' None history slots filled with zeros, each its own tensor: ``model_outputs`` and UniPC's
    ``timestep_list`` (which diffusers keeps but does not compute with; zeros like ``timestep``)."""
    mo = s.model_outputs
    for j in range(len(mo)):
        if mo[j] is None:
            mo[j] = torch.zeros(shape, dtype=dtype, device=device)
    tl = getattr(s, "timestep_list", ())
    for j in range(len(tl)):
        if tl[j] is None:
            tl[j] = torch.zeros_like(torch.as_tensor(timestep, device=device))


def noise_offset(sf, device) -> torch.Tensor:
    """The device part of this compiled step's noise offset (added to the host offset); advanced by one."""
    offset = sf.compiled_offset
    if offset is None:
        offset = torch.zeros(1, dtype=torch.int64, device=device)
    sf.compiled_offset = offset + 1
    return offset


@torch._dynamo.assume_constant_result
def table_while_tracing(s, key: tuple, build, args: tuple, schedule: bool):
    """A table a traced step needs and the scheduler does not have yet. It is built once, at trace time, into
    ``_State.pending``: storing it in ``_State.tables`` would fail the guards of the graph being traced.
    The next ``set_timesteps`` or eager step moves it to the tables."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    pending = s._sf.pending
    tab = pending.get(key)
    if tab is None:
        with unset_fake_temporarily():
            tab = pending[key] = s._build_table(key[-1], build, args, schedule)
    return tab

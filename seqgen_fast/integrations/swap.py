"""``seqgen_fast.swap_modules(model)``: replace torch modules by seqgen_fast ones, in place.

Each family registers a converter for the torch class it replaces (``register_swap``), next to
the module class that does the replacing. A converter receives the torch module and returns the
seqgen_fast module holding the same parameters (same device, dtype and training mode).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

_CONVERTERS: dict[type, Callable[[torch.nn.Module], torch.nn.Module]] = {}
_PROVIDERS = ("seqgen_fast.nn.lstm", "seqgen_fast.nn.attention")


def register_swap(torch_cls: type, convert: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
    """Make :func:`swap_modules` replace instances of exactly ``torch_cls`` with ``convert(m)``."""
    _CONVERTERS[torch_cls] = convert


def _converter(module: torch.nn.Module):
    return _CONVERTERS.get(type(module))  # exact type: subclasses may change forward


def swap_modules(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``torch.nn.LSTM``, ``LSTMCell`` and ``MultiheadAttention`` inside ``model``
    by its seqgen_fast twin, weights kept, and return ``model``.

    Only exact instances are swapped (a subclass may override ``forward``). When ``model``
    itself is such a module, the converted module is returned (it cannot replace itself).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"swap_modules: model must be a torch.nn.Module, got {type(model).__name__}")
    for name in _PROVIDERS:
        importlib.import_module(name)
    root = _converter(model)
    if root is not None:
        return root(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            convert = _converter(child)
            if convert is not None:
                setattr(parent, name, convert(child))
    return model

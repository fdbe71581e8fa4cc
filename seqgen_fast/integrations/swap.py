"""``seqgen_fast.swap_modules(model)``: replace torch modules by seqgen_fast ones, in place.

Which torch classes are replaced, and by what, comes from the family manifest
(``seqgen_fast._families``, each family's ``replaces``): the seqgen_fast class's
``from_torch(module)`` returns a module holding the same Parameter objects (same device, dtype
and training mode).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from .._families import FAMILIES


def _resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def converters() -> dict[type, Callable[[torch.nn.Module], torch.nn.Module]]:
    """torch class -> the ``from_torch`` of the seqgen_fast class replacing it, over every family."""
    table = {}
    for f in FAMILIES:
        for cls_name, torch_path in f.replaces.items():
            table[_resolve(torch_path)] = getattr(importlib.import_module(f.nn), cls_name).from_torch
    return table


def swap_modules(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every module of a class some family replaces (``torch.nn.LSTM``, ``LSTMCell``,
    ``MultiheadAttention``, ...) inside ``model`` by its seqgen_fast twin, weights kept, and
    return ``model``.

    Only exact instances are swapped (a subclass may override ``forward``). When ``model``
    itself is such a module, the converted module is returned (it cannot replace itself).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"swap_modules: model must be a torch.nn.Module, got {type(model).__name__}")
    table = converters()
    root = table.get(type(model))  # exact type: subclasses may change forward
    if root is not None:
        return root(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            convert = table.get(type(child))
            if convert is not None:
                setattr(parent, name, convert(child))
    return model

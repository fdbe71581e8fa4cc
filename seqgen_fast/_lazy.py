"""Lazy attribute loading for the package's public namespaces.

The public modules map each exported name to the module that defines it, so importing
``seqgen_fast`` stays cheap (no Triton compile, no optional packages) and each family's code
loads on first use.
"""
from __future__ import annotations

import importlib


def lazy_getattr(module_name: str, exports: dict[str, str]):
    """A module-level ``__getattr__`` serving ``exports`` (name -> defining module)."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__

"""Integrations with model code: ``swap`` (torch modules), ``transformers``, ``diffusers``.

Optional packages (transformers, diffusers) are imported lazily here and nowhere else.
"""

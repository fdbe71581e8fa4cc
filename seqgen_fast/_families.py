"""The one family manifest: every kernel family of seqgen_fast, and what it adds to the public surface.

Everything that lists families reads this table, and nothing else does:

* ``seqgen_fast.functional`` and ``seqgen_fast.nn`` export the names given here (loaded lazily);
* ``seqgen_fast.diffusion`` (and any other public namespace) exports its ``namespaces`` entries;
* :func:`seqgen_fast.swap_modules` replaces each torch class in ``replaces`` by the family's class;
* ``seqgen-fast check`` imports ``seqgen_fast.checks.<name>`` and ``seqgen-fast bench`` imports
  ``seqgen_fast.bench.<name>``; both accept the family names as ``--family``;
* ``seqgen-fast info`` lists the families and the capabilities of their backends.

Adding a family means one entry here plus its files (see CONTRIBUTING.md). This module imports
nothing of seqgen_fast: it is data.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """One kernel family.

    name: the family's name on the command line (``--family``) and of its ``checks``/``bench`` modules.
    ops: the module that registers its ``torch.library`` ops and dispatchers and defines ``functional``.
    functional: names that ``seqgen_fast.functional`` exports from ``ops``.
    nn: the module defining its ``seqgen_fast.nn`` classes (``replaces`` keys), or None.
    replaces: nn class name -> the torch class it replaces (``"torch.nn.LSTM"``): the class has a
        ``from_torch(module)`` constructor and ``swap_modules`` uses it.
    namespaces: other public namespaces -> {name: defining module}.
    extras: optional packages (pip extras of seqgen_fast) some of its checks or integrations use.
    """

    name: str
    ops: str
    functional: tuple[str, ...] = ()
    nn: str | None = None
    replaces: dict[str, str] = field(default_factory=dict)
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    extras: tuple[str, ...] = ()


FAMILIES: tuple[Family, ...] = (
    Family("lstm", ops="seqgen_fast.ops.lstm", functional=("lstm", "lstm_cell"), nn="seqgen_fast.nn.lstm",
           replaces={"LSTM": "torch.nn.LSTM", "LSTMCell": "torch.nn.LSTMCell"}),
    Family("gru", ops="seqgen_fast.ops.gru", functional=("gru", "gru_cell"), nn="seqgen_fast.nn.gru",
           replaces={"GRU": "torch.nn.GRU", "GRUCell": "torch.nn.GRUCell"}),
    Family("attention", ops="seqgen_fast.ops.attention",
           functional=("scaled_dot_product_attention", "flash_attention"), nn="seqgen_fast.nn.attention",
           replaces={"MultiheadAttention": "torch.nn.MultiheadAttention"}, extras=("transformers",)),
    Family("decode", ops="seqgen_fast.ops.decode", functional=("decode_attention",)),
    Family("rotary", ops="seqgen_fast.ops.rotary", functional=("rotary_embedding",)),
    Family("diffusion", ops="seqgen_fast.ops.diffusion",
           namespaces={"seqgen_fast.diffusion": {"fast_scheduler": "seqgen_fast.diffusion.schedulers",
                                                 "fast_class": "seqgen_fast.diffusion.schedulers",
                                                 "sample": "seqgen_fast.diffusion.sampling"}},
           extras=("diffusers",)),
    Family("sampling", ops="seqgen_fast.ops.sampling", functional=("sample_tokens",)),
)

NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)


def family(name: str) -> Family:
    """The family called ``name``; ValueError listing the known names otherwise."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"unknown kernel family {name!r}; known: {', '.join(NAMES)}")


def exports(namespace: str) -> dict[str, str]:
    """Public names of ``namespace`` (``"seqgen_fast.functional"``, ``"seqgen_fast.nn"``, ...) ->
    the module defining each, over every family."""
    out: dict[str, str] = {}
    for f in FAMILIES:
        if namespace == "seqgen_fast.functional":
            out.update({name: f.ops for name in f.functional})
        elif namespace == "seqgen_fast.nn" and f.nn is not None:
            out.update({name: f.nn for name in f.replaces})
        out.update(f.namespaces.get(namespace, {}))
    return out

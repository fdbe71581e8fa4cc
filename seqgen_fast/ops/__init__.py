"""torch.library ops of every kernel family (see ``_library.custom_op`` for the pattern)."""
import importlib

FAMILIES = ("lstm", "attention", "decode", "diffusion", "sampling")


def load_all() -> None:
    """Import every family's op module, registering its ops, dispatchers and checks."""
    for family in FAMILIES:
        importlib.import_module(f"{__name__}.{family}")

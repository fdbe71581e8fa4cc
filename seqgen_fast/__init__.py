"""seqgen_fast: fused CUDA and Triton kernels for sequence-generation models.

Drop-in replacements for ``torch.nn.LSTM``/``LSTMCell``/``MultiheadAttention`` and
``scaled_dot_product_attention``, flash attention and KV-cache decode, and fused diffusion
scheduler steps. Each op dispatches between the ``cuda``, ``triton`` and ``reference`` backends
(see ``seqgen_fast._backend``); ``seqgen-fast info`` says which are available here and why not.
"""
from ._backend import BACKENDS, BackendError, use_backend
from ._lazy import lazy_getattr

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendError", "use_backend", "debug_checks", "swap_modules", "warmup", "functional", "nn", "diffusion",
           "__version__"]

from . import diffusion, functional, nn  # noqa: E402  (light: their contents load lazily)

__getattr__ = lazy_getattr(__name__, {"swap_modules": "seqgen_fast.integrations.swap",
                                      "debug_checks": "seqgen_fast._debug",
                                      "warmup": "seqgen_fast.ops.attention"})

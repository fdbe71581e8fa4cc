"""Test support shared by every family's tests (imported as the package ``support``; pytest puts
``tests/`` on ``sys.path``):

* :mod:`support.utils`     -- relative error norms against float64 references, output poisoning;
* :mod:`support.aot`       -- ahead-of-time sm_90 compiles of the Triton kernels (PTX facts, ptxas
  register and spill counts) on a machine without a GPU;
* :mod:`support.emulation` -- the host SIMT emulation that runs the CUDA kernels of ``csrc/`` on the CPU.
"""

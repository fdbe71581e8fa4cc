"""Test support shared by every family's tests (imported as the package ``support``; pytest puts
``tests/`` on ``sys.path``):

* :mod:`support.utils`     -- relative error norms against float64 references, output poisoning;
* :mod:`support.aot`       -- ahead-of-time sm_90 compiles of the Triton kernels (PTX facts, ptxas
  register and spill counts) on a machine without a GPU;
* :mod:`support.sass`      -- the sm_90a SASS of the CUDA kernels of ``csrc/`` (instruction mix,
  local memory, registers), read with cuobjdump;
* :mod:`support.emulation` -- the host SIMT emulation that runs the CUDA kernels of ``csrc/`` on the
  CPU (``emulation/``: its headers, entered through ``csrc/common.cuh``'s seam);
* :mod:`support.emulated_recurrence` -- a recurrent family's ``_C`` functions on that emulation;
* :mod:`support.gluon_emulation` -- what the Gluon attention kernels need to run on the CPU;
* :mod:`support.fuzz`      -- the differential fuzz suite's strategies and error rule;
* :mod:`support.distributed` -- gloo process groups on loopback, started by the test.
"""

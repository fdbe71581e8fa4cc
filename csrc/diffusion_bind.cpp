// Python bindings of the fused diffusion step (csrc/diffusion.cu); layouts and math in csrc/diffusion.h.
#include <pybind11/pybind11.h>

#include "diffusion.h"
#include "registry.h"

namespace py = pybind11;

SEQGEN_BINDINGS(diffusion) {
  m.def("diffusion_step", &seqgen::diffusion::step, py::arg("sample"), py::arg("model_output"), py::arg("out"),
        py::arg("x0"), py::arg("noise"), py::arg("coef"), py::arg("timesteps"), py::arg("ts_dtype"),
        py::arg("ts_stride"), py::arg("guidance"), py::arg("model_scale"), py::arg("threshold"), py::arg("batch"),
        py::arg("n"), py::arg("rows"), py::arg("key"), py::arg("cfg"), py::arg("guidance_scale"), py::arg("x0_mode"),
        py::arg("clip_range"), py::arg("noise_mode"), py::arg("seed"), py::arg("offset"), py::arg("rng_offset"),
        py::arg("dtype"),
        py::arg("noise_dtype"), py::arg("device"), py::arg("stream"),
        "Fused DDPM/DDIM-style scheduler step over [B, N] samples (pointers as integers; see csrc/diffusion.h). "
        "Writes out (and x0 when non-zero) on `stream`; no host sync.");
}

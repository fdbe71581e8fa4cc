"""Every error the fused diffusion steps raise at a user's call, one row each (the README's error table):
the call, the exception, its message; where the step replaces diffusers', diffusers' own step raises
the same exception type with a message matching the same pattern.
"""
from __future__ import annotations

import pytest
import torch

from seqgen_fast.diffusion import fast_scheduler
from support.utils import raised

diffusers = pytest.importorskip("diffusers")
SHAPE = (3, 4, 6, 5)


def fused(cls="DDPMScheduler", steps=10, **config):
    s = fast_scheduler(getattr(diffusers, cls)(**config), backend="reference")
    if steps:
        s.set_timesteps(steps)
    return s


def plain(cls="DDPMScheduler", steps=10, **config):
    s = getattr(diffusers, cls)(**config)
    if steps:
        s.set_timesteps(steps)
    return s


X = torch.randn(SHAPE)

# (row id, call on a fused scheduler, exception, message pattern)
ROWS = [
    ("model_output of another shape", lambda s: s.step(torch.randn(2, 4, 6, 5), s.timesteps[0], X), ValueError,
     r"DDPMScheduler.step: model_output of shape \(2, 4, 6, 5\) does not"),
    ("guidance without 2B rows", lambda s: s.step(torch.randn(SHAPE), s.timesteps[0], X, guidance_scale=5.0),
     ValueError, r"DDPMScheduler.step: model_output has 3 rows, expected 6"),
    ("guidance_scale tensor of another batch",
     lambda s: s.step(torch.randn(6, 4, 6, 5), s.timesteps[0], X, guidance_scale=torch.ones(4)), ValueError,
     r"DDPMScheduler.step: guidance_scale must be a float or a \(3,\) tensor"),
    ("guidance_rescale without guidance", lambda s: s.step(torch.randn(SHAPE), s.timesteps[0], X, guidance_rescale=0.5),
     ValueError, r"DDPMScheduler.step: guidance_rescale needs guidance_scale"),
    ("timestep off the schedule", lambda s: s.step(torch.randn(SHAPE), 3, X), ValueError,
     r"timestep: 3 is outside the schedule of DDPMScheduler"),
    ("timestep tensor of another batch", lambda s: s.step(torch.randn(SHAPE), s.timesteps[:2], X), ValueError,
     r"DDPMScheduler.step: timestep must be a scalar or a \(3,\) tensor"),
    ("sample not a tensor", lambda s: s.step(torch.randn(SHAPE), s.timesteps[0], X.tolist()), TypeError,
     r"DDPMScheduler.step: sample and model_output must be tensors"),
    ("variance_noise not a tensor", lambda s: s.step(torch.randn(SHAPE), s.timesteps[0], X, variance_noise=1.0),
     TypeError, r"DDPMScheduler.step: variance_noise must be a tensor"),
    ("variance_noise of another shape",
     lambda s: s.step(torch.randn(SHAPE), s.timesteps[0], X, variance_noise=torch.randn(2, 4, 6, 5)), ValueError,
     r"DDPMScheduler.step: variance_noise has shape \(2, 4, 6, 5\)"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_step_errors(row):
    _, call, exc, pattern = row
    with pytest.raises(exc, match=pattern):
        call(fused())


# rows where the fused step replaces diffusers' check: (row id, class, config, call, exception, pattern)
PARITY = [
    ("step before set_timesteps", "DDIMScheduler", {}, 0, lambda s: s.step(torch.randn(SHAPE), 10, X), ValueError,
     r"Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"),
    ("generator and variance_noise", "DDIMScheduler", {}, 10,
     lambda s: s.step(torch.randn(SHAPE), s.timesteps[0], X, eta=0.5, generator=torch.Generator(),
                      variance_noise=torch.randn(SHAPE)), ValueError, r"Cannot pass both generator and variance_noise"),
    ("Euler with an integer index", "EulerDiscreteScheduler", {}, 10,
     lambda s: s.step(torch.randn(SHAPE), 3, X), ValueError,
     r"(?i)passing integer indices \(e.g. from `enumerate\(timesteps\)`\) as timesteps to "
     r"`EulerDiscreteScheduler.step\(\)` is not supported"),
    ("Euler ancestral predicting the sample", "EulerAncestralDiscreteScheduler", dict(prediction_type="sample"), 10,
     lambda s: s.step(torch.randn(SHAPE), s.timesteps[0], X), NotImplementedError,
     r"prediction_type not implemented yet: sample"),
]


@pytest.mark.parametrize("row", PARITY, ids=[r[0] for r in PARITY])
def test_step_errors_match_diffusers(row):
    _, cls, config, steps, call, exc, pattern = row
    for s in (fused(cls, steps, **config), plain(cls, steps, **config)):
        with pytest.raises(exc, match=pattern):
            call(s)


def test_unsupported_scheduler_class():
    with pytest.raises(TypeError, match="PNDMScheduler"):
        fast_scheduler(diffusers.PNDMScheduler())


def table() -> str:
    """The README's markdown table of :data:`ROWS` and :data:`PARITY` (the messages the fused steps raise)."""
    lines = ["| call | exception | message | diffusers' own step |", "|---|---|---|---|"]
    for name, call, _, _ in ROWS:
        e = raised(lambda: call(fused()))
        lines.append(f"| {name} | `{type(e).__name__}` | {str(e).replace('|', '/')} | |")
    for name, cls, config, steps, call, _, _ in PARITY:
        e = raised(lambda: call(fused(cls, steps, **config)))
        lines.append(f"| {name} ({cls}) | `{type(e).__name__}` | {str(e).replace('|', '/')} | raises the same |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())

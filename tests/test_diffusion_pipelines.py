"""Tiny diffusers pipelines (built from config, random weights, nothing downloaded) give the same images with
``accelerate(pipe)`` -- the fused scheduler -- as with diffusers' own scheduler, for the same generator."""
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from seqgen_fast.integrations.diffusers import accelerate  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


def _vae(**extra):
    return diffusers.AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                   norm_num_groups=4, sample_size=8, **extra)


def _stable_diffusion(scheduler):
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
    pipe = diffusers.StableDiffusionPipeline(vae=_vae(), text_encoder=None, tokenizer=None, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    embeds = torch.randn(1, 5, 16), torch.randn(1, 5, 16)

    def run(pipe, seed, **kw):
        return pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=4, height=8,
                    width=8, output_type="np", generator=torch.Generator().manual_seed(seed), **kw).images
    return pipe, run


def _dit(scheduler):
    transformer = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4,
                                                  out_channels=8, num_layers=1, sample_size=4, patch_size=2,
                                                  num_embeds_ada_norm=1000, norm_num_groups=2)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=_vae(), scheduler=scheduler)

    def run(pipe, seed, **kw):
        return pipe(class_labels=[1, 3], num_inference_steps=4, guidance_scale=3.0, output_type="np",
                    generator=torch.Generator().manual_seed(seed), **kw).images
    return pipe, run


def _flux(scheduler):
    transformer = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=transformer)
    embeds = torch.randn(1, 6, 16), torch.randn(1, 8)

    def run(pipe, seed, **kw):
        return pipe(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], num_inference_steps=4, height=16,
                    width=16, output_type="np", generator=torch.Generator().manual_seed(seed), **kw).images
    return pipe, run


CASES = [
    pytest.param(_stable_diffusion, lambda: diffusers.DDIMScheduler(), dict(eta=0.6), id="sd-ddim-eta",
                 marks=pytest.mark.smoke),
    pytest.param(_stable_diffusion, lambda: diffusers.EulerAncestralDiscreteScheduler(), {}, id="sd-euler-a"),
    pytest.param(_dit, lambda: diffusers.DPMSolverMultistepScheduler(), {}, id="dit-dpm"),
    # clip_sample off: an x0 within rounding of the clip edge lands on either side, and the model amplifies it
    pytest.param(_dit, lambda: diffusers.DDIMScheduler(clip_sample=False), {}, id="dit-ddim"),
    pytest.param(_flux, lambda: diffusers.FlowMatchEulerDiscreteScheduler(), {}, id="flux-flow"),
]


@pytest.mark.parametrize("build,scheduler,kw", CASES)
def test_pipeline_images_match_diffusers(build, scheduler, kw):
    torch.manual_seed(0)
    pipe, run = build(scheduler())
    pipe.set_progress_bar_config(disable=True)
    want = run(pipe, 3, **kw)
    accelerate(pipe, cuda_graph=True)  # on the CPU the denoiser runs eagerly (its reason is kept)
    assert type(pipe.scheduler).__name__ == type(scheduler()).__name__
    got = run(pipe, 3, **kw)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    assert not np.allclose(run(pipe, 4, **kw), got) or not kw  # the generator decides the noise
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    assert any("not CUDA" in r for r in model.forward.reasons.values())


def test_accelerate_bad_input():
    with pytest.raises(TypeError, match="scheduler"):
        accelerate(object())


@pytest.mark.gpu
def test_graphed_denoiser_replays_on_the_gpu():
    torch.manual_seed(0)
    pipe, run = _stable_diffusion(diffusers.DDIMScheduler())
    pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    want = run(pipe, 3)
    accelerate(pipe, cuda_graph=True)
    got = run(pipe, 3)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert not pipe.unet.forward.reasons, pipe.unet.forward.reasons

"""The models/ package: what spandrel's descriptors tell of the inputs (inpainting, face
restoration, size requirements)."""

from __future__ import annotations

import pytest
import spandrel
import torch
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from spandrel.architectures.GFPGAN import GFPGAN
from spandrel.architectures.LaMa import LaMa
from spandrel.architectures.RestoreFormer import RestoreFormer

from layerdiff.models import load_model
from layerdiff.models.spandrel import input_specs
from layerdiff.records import InputKind


def random_state_dict(build) -> dict:
    """Random weights for an architecture built on the meta device: spandrel's LaMa and
    GFPGAN have one size only (tens of millions of weights), too slow to initialise."""
    with torch.device("meta"):
        module = build()
    generator = torch.Generator().manual_seed(0)
    return {key: torch.rand(value.shape, generator=generator) if value.is_floating_point()
            else torch.zeros(value.shape, dtype=value.dtype)
            for key, value in module.state_dict().items()}


# --------------------------------------------------------------------------- spandrel's inputs


def test_lama_takes_an_image_and_a_mask(tmp_path):
    path = tmp_path / "big-lama.safetensors"
    save_file(random_state_dict(lambda: LaMa(in_nc=4, out_nc=3)), str(path))

    loaded = load_model(path)

    assert loaded.architecture == "LaMa" and loaded.input_channels == 3
    image, mask = loaded.inputs
    assert (image.name, image.kind, image.shape) == ("img", InputKind.IMAGE, (1, 3, 64, 64))
    assert (mask.name, mask.kind, mask.shape) == ("mask", InputKind.MASK, (1, 1, 64, 64))
    assert image.dtype == mask.dtype == "float32"
    assert image.dynamic_axes == mask.dynamic_axes == (2, 3)
    # layerdiff runs the module itself, which takes (image, mask) as the specs say.
    with torch.no_grad():
        out = loaded.module(torch.rand(image.shape), (torch.rand(mask.shape) > 0.5).float())
    assert out.shape == (1, 3, 64, 64)


def test_gfpgan_takes_one_fixed_size(tmp_path):
    path = tmp_path / "GFPGANv1.4.safetensors"
    save_file(random_state_dict(lambda: GFPGAN(
        out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
        fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
        sft_half=True)), str(path))

    loaded = load_model(path)

    assert loaded.architecture == "GFPGAN"
    (image,) = loaded.inputs
    assert (image.name, image.shape, image.dynamic_axes) == ("x", (1, 3, 512, 512), ())


def test_restoreformer_takes_multiples_of_32(tmp_path):
    torch.manual_seed(0)
    # The smallest that spandrel recognises: GroupNorm needs 32 channels, and its
    # attention sits at the 16x16 level of a 512 resolution (six levels).
    model = RestoreFormer(n_embed=16, embed_dim=32, ch=32, out_ch=3, ch_mult=(1,) * 6,
                          num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, in_channels=3,
                          resolution=512, z_channels=32, double_z=False, enable_mid=True,
                          head_size=8)
    torch.save(model.state_dict(), tmp_path / "RestoreFormer.pth")

    loaded = load_model(tmp_path / "RestoreFormer.pth")

    assert loaded.architecture == "RestoreFormer"
    (image,) = loaded.inputs
    assert (image.name, image.shape, image.dynamic_axes) == ("input", (1, 3, 64, 64), (2, 3))


@pytest.mark.parametrize("requirements, size", [
    (spandrel.SizeRequirements(), (64, 64)),
    (spandrel.SizeRequirements(multiple_of=24), (72, 72)),
    (spandrel.SizeRequirements(minimum=100), (100, 100)),
    (spandrel.SizeRequirements(multiple_of=128, square=True), (128, 128)),  # Uformer
])
def test_image_size_meets_the_size_requirements(requirements, size):
    torch.manual_seed(0)
    model = Compact(num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=2, upscale=2)
    compact = spandrel.ModelLoader().load_from_state_dict(model.state_dict())
    descriptor = spandrel.ImageModelDescriptor(
        compact.model, model.state_dict(), architecture=compact.architecture, purpose="SR",
        tags=[], supports_half=True, supports_bfloat16=True, scale=2, input_channels=1,
        output_channels=1, size_requirements=requirements)

    (image,) = input_specs(descriptor)

    assert (image.name, image.kind, image.dynamic_axes) == ("x", InputKind.IMAGE, (2, 3))
    assert image.shape == (1, 1, *size)

"""A zoo of small real models with random weights, for the "any model" tests (issue 11).

Each builder is a zero-argument function returning an ``nn.Module`` in eval mode with
deterministic random weights (``torch.manual_seed(0)`` inside); each builds in well under a
second and exports to ONNX in seconds. ``EXAMPLES[name]()`` gives example inputs for it: a
dict of name -> tensor in the order of forward's parameters (keyword-only ones last, to be
passed by keyword). ``OTHER[name]()`` gives inputs of another size or sequence length, for
checking dynamic axes.

The file doubles as a CLI entry point (``layerdiff report tests/zoo.py:resnet ...``): it is
importable on its own, never imports layerdiff, and imports the model libraries (spandrel,
timm, transformers) inside the builders only.

Models: ``lama`` (spandrel LaMa, FFT convolutions; two inputs image + mask), ``gfpgan``
(spandrel GFPGAN face restoration, fixed 512x512), ``resnet``, ``convnext``, ``vit`` (timm),
``bert`` (transformers BertModel: int64 ``input_ids`` + ``attention_mask``, returns a
``ModelOutput``; ``bert_wrapped`` the same behind a wrapper the legacy exporter can take),
``dict_output`` (forward returns a dict), ``keyword`` (forward takes a keyword-only tensor;
``keyword_optional`` an optional one, passed by keyword).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["lama", "gfpgan", "resnet", "convnext", "vit", "bert", "bert_wrapped",
           "dict_output", "keyword", "keyword_optional", "BUILDERS", "EXAMPLES", "OTHER",
           "KEYWORD_ONLY"]


# --- spandrel -----------------------------------------------------------------------------

def lama() -> nn.Module:
    """spandrel's LaMa with its generator shrunk: ngf 8, 3 downsamplings, 1 FFC ResNet block.

    ``spandrel.architectures.LaMa.LaMa`` only takes in_nc/out_nc and always builds the full
    27M-parameter big-lama generator (ngf 64, 18 blocks); the same module's
    ``FFCResNetGenerator`` takes the sizes, so the wrapper (and every module name below
    ``model.model``) is spandrel's own. forward(img, mask): img (N,3,H,W) in [0,1], mask
    (N,1,H,W) of 0/1; H and W multiples of 8, at least 16 (spandrel's size requirement).
    The FFT (torch.fft.rfftn / irfftn) exports only with the dynamo exporter (ONNX DFT).
    """
    from spandrel.architectures.LaMa import LaMa
    from spandrel.architectures.LaMa.__arch.LaMa import FFCResNetGenerator

    import spandrel.architectures.LaMa.__arch.LaMa as arch

    def small(in_nc, out_nc):
        return FFCResNetGenerator(in_nc, out_nc, ngf=8, n_downsampling=3, n_blocks=1)

    torch.manual_seed(0)
    arch.FFCResNetGenerator = small  # LaMa.__init__ looks the generator up in its module
    try:
        model = LaMa(in_nc=4, out_nc=3)
    finally:
        arch.FFCResNetGenerator = FFCResNetGenerator
    _randomize_norms(model)
    # PyTorch's default init shrinks the signal layer by layer: the output would sit at
    # sigmoid(0) = 0.5 +- 0.015 and a fault inside the generator would barely show.
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model.eval()


def gfpgan() -> nn.Module:
    """spandrel's GFPGAN (GFPGANv1Clean) at 1/16 width; input fixed at (1,3,512,512).

    ``narrow=1/16`` and a 32-wide style (instead of 512) and 2 MLP layers; forward(x)
    returns the restored image only, without the random noise injection
    (``randomize_noise=False``) and without the intermediate RGB list, so the output is
    deterministic. The class is a subclass, so module names are GFPGANv1Clean's own.
    """
    from spandrel.architectures.GFPGAN import GFPGAN

    class GFPGANFace(GFPGAN):
        def forward(self, x):  # noqa: D102
            image, _ = super().forward(x, return_rgb=False, randomize_noise=False)
            return image

    torch.manual_seed(0)
    model = GFPGANFace(out_size=512, num_style_feat=32, channel_multiplier=1, num_mlp=2,
                       input_is_latent=True, different_w=True, narrow=1 / 16, sft_half=True)
    return model.eval()


# --- timm ---------------------------------------------------------------------------------

def resnet() -> nn.Module:
    """timm resnet10t, 10 classes, at a quarter width: stem 8, channels (16,32,64,128)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10, stem_width=8,
                              channels=(16, 32, 64, 128))
    _randomize_norms(model)
    return model.eval()


def convnext() -> nn.Module:
    """timm convnext_atto shrunk to depths (1,1,1,1), dims (16,32,64,128), 10 classes.

    Layer scale starts at 1.0, not timm's 1e-6: with 1e-6 every block's branch is invisible
    in the output and a fault inside a block cannot be seen.
    """
    import timm

    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=10,
                             depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
                             ls_init_value=1.0).eval()


def vit() -> nn.Module:
    """timm vit_tiny_patch16_224 at img_size 64, depth 2, 10 classes (dynamic_img_size)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                             img_size=64, depth=2, dynamic_img_size=True).eval()


# --- transformers -------------------------------------------------------------------------

def bert() -> nn.Module:
    """A tiny BertModel from a config: hidden 32, 2 layers, 2 heads, intermediate 64, vocab 512.

    forward(input_ids, attention_mask, ...) returns a ``BaseModelOutputWithPoolingAndCrossAttentions``
    (last_hidden_state, pooler_output). Eager attention.
    """
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128)
    config._attn_implementation = "eager"
    return BertModel(config, add_pooling_layer=True).eval()


class BertWrapper(nn.Module):
    """forward(input_ids, attention_mask) -> self.bert(input_ids=..., attention_mask=...).

    The legacy exporter cannot export transformers 5's BertModel itself (it passes the
    parameters positionally and transformers' ``merge_with_config_defaults`` then adds
    ``use_cache`` by keyword: "got multiple values for argument 'use_cache'"); through this
    wrapper it can. Module names gain a ``bert.`` prefix.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.bert = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask)


def bert_wrapped() -> nn.Module:
    """:func:`bert` behind :class:`BertWrapper`: exportable by the legacy exporter too."""
    return BertWrapper(bert()).eval()


# --- plain PyTorch, for structured outputs and keyword inputs -----------------------------

class DictOutput(nn.Module):
    """A small conv net whose forward returns {"features": (N,16,H/2,W/2), "logits": (N,10)}."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.down(self.stem(x))
        logits = self.head(self.pool(features).flatten(1))
        return {"features": features, "logits": logits}


class Keyword(nn.Module):
    """forward(x, *, gain): gain (N,8,1,1) scales the features; it must be passed by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, *, gain: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)) * gain)


class KeywordOptional(nn.Module):
    """forward(x, gain=None): the same as :class:`Keyword`, gain optional (positional or keyword).

    Unlike a keyword-only parameter, the legacy exporter can take this one through kwargs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        y = self.act(self.conv1(x))
        return self.conv2(y if gain is None else y * gain)


def keyword_optional() -> nn.Module:
    torch.manual_seed(0)
    return KeywordOptional().eval()


def dict_output() -> nn.Module:
    torch.manual_seed(0)
    return DictOutput().eval()


def keyword() -> nn.Module:
    torch.manual_seed(0)
    return Keyword().eval()


# --- helpers and tables -------------------------------------------------------------------

def _randomize_norms(model: nn.Module) -> None:
    """Give BatchNorm layers non-trivial running statistics and affine weights (seeded)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def _image(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _lama_inputs(h: int, w: int) -> dict[str, torch.Tensor]:
    mask = torch.zeros(1, 1, h, w)
    mask[..., h // 4: h // 2, w // 4: 3 * w // 4] = 1.0
    return {"img": _image(1, h, w), "mask": mask}


def _bert_inputs(length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 512, (1, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones(1, length, dtype=torch.int64)}


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "lama": lama, "gfpgan": gfpgan, "resnet": resnet, "convnext": convnext, "vit": vit,
    "bert": bert, "bert_wrapped": bert_wrapped, "dict_output": dict_output,
    "keyword": keyword, "keyword_optional": keyword_optional,
}

# name -> zero-argument function giving a dict of example inputs, in forward's order.
EXAMPLES: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "lama": lambda: _lama_inputs(32, 32),
    "gfpgan": lambda: {"x": _image(1, 512, 512)},
    "resnet": lambda: {"x": _image(1, 64, 64)},
    "convnext": lambda: {"x": _image(1, 64, 64)},
    "vit": lambda: {"x": _image(1, 64, 64)},
    "bert": lambda: _bert_inputs(16),
    "dict_output": lambda: {"x": _image(1, 32, 32)},
    "keyword": lambda: {"x": _image(1, 32, 32), "gain": torch.linspace(0.5, 2.0, 8).view(1, 8, 1, 1)},
}
EXAMPLES["bert_wrapped"] = EXAMPLES["bert"]
EXAMPLES["keyword_optional"] = EXAMPLES["keyword"]

# Inputs of another size / sequence length (gfpgan takes 512x512 only: another image).
OTHER: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "lama": lambda: _lama_inputs(48, 64),
    "gfpgan": lambda: {"x": _image(1, 512, 512, seed=1)},
    "resnet": lambda: {"x": _image(2, 96, 80, seed=1)},
    "convnext": lambda: {"x": _image(2, 96, 128, seed=1)},
    "vit": lambda: {"x": _image(2, 96, 80, seed=1)},
    "bert": lambda: _bert_inputs(24),
    "dict_output": lambda: {"x": _image(2, 48, 40, seed=1)},
    "keyword": lambda: {"x": _image(2, 40, 48, seed=1),
                        "gain": torch.linspace(2.0, 0.5, 16).view(2, 8, 1, 1)},
}
OTHER["bert_wrapped"] = OTHER["bert"]
OTHER["keyword_optional"] = OTHER["keyword"]

# Parameters to pass by keyword, not positionally (keyword-only for "keyword").
KEYWORD_ONLY: dict[str, tuple[str, ...]] = {"keyword": ("gain",), "keyword_optional": ("gain",)}

"""The bundled natural photograph: a real image for image models, run by default beside
the random input (random values are what find a layer; a photo is what people judge a
conversion by: flat areas, edges, skin, a colour cast).

``data/photo.npy`` is 128x128 RGB (uint8, read without pickles): the face of scikit-image's
``astronaut`` sample (NASA's photograph of Eileen Collins, public domain), a 256x256 crop at
(128, 16) downscaled with Lanczos. It ships as an array so that no image decoder is needed.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

LABEL = "photo (bundled)"
CHANNELS = (1, 3, 4)  # grey, RGB, RGBA (opaque)


def photo(shape: tuple[int, ...]) -> torch.Tensor:
    """The photo as float32 values in [0, 1] of ``shape`` (N, C, H, W): scaled to cover
    H x W (antialiased), centre-cropped, repeated over the batch."""
    batch, channels, height, width = shape
    if channels not in CHANNELS:
        raise ValueError(f"the photo has no {channels}-channel form")
    with resources.files("layerdiff.data").joinpath("photo.npy").open("rb") as file:
        rgb = np.load(file, allow_pickle=False)
    image = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    scale = max(height / image.shape[2], width / image.shape[3])
    size = (max(height, round(image.shape[2] * scale)), max(width, round(image.shape[3] * scale)))
    if size != tuple(image.shape[2:]):
        image = F.interpolate(image, size=size, mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0, 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    image = image[:, :, top:top + height, left:left + width]
    if channels == 1:  # ITU-R BT.601 luma
        image = (image * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif channels == 4:
        image = torch.cat([image, torch.ones_like(image[:, :1])], dim=1)
    return image.expand(batch, -1, -1, -1).contiguous()

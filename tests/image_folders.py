"""Small image folders (the ImageFolder layout) generated for tests of
`python -m hscl_jax.data.prepare` and of training on its output."""

from __future__ import annotations

import os

import numpy as np


def save_image(path, pixels: np.ndarray, image_format: str = "PNG", mode: str | None = None):
    """Writes uint8 `pixels` to `path` (folders made as needed), converted to `mode` if given."""
    import PIL.Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = PIL.Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    image.save(path, format=image_format)


def write_image_folder(root, classes, per_class: int, side: int, seed: int = 0) -> None:
    """root/<class>/<i>.png: `per_class` random side x side RGB images per class, each class a
    little darker in its own channel, so that the classes differ."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 256, (side, side, 3), np.uint8)
            pixels[..., label % 3] //= 2
            save_image(os.path.join(root, name, f"{i}.png"), pixels)

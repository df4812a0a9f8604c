"""`random_images`: a TFDS dataset of random PNG images, for pipeline tests and benchmarks.

Each builder config fixes the number of examples and the image side, so that datasets of several
sizes (e.g. 5,000 and 100,000 64x64x3 images for the memory benchmark) live side by side in one
data dir. Images are uniform noise encoded as PNG (decoding them costs what decoding CIFAR does),
or as JPEGs of varying sides for the "_varied" config (like ImageNet); labels cycle over 10
classes. Importing this module imports tensorflow_datasets and registers the
builder; `random_images_info` gives the matching `DatasetInfo` for `train_iterator(info=...)`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from hscl_jax.data.info import CIFAR_MEAN, CIFAR_STD, DatasetInfo

RANDOM_IMAGES_CLASSES = 10
_PIXEL_SEED = 7


@dataclasses.dataclass
class RandomImagesConfig(tfds.core.BuilderConfig):
    """num_examples train examples (and num_examples // 4 test examples) of size^2 x 3 pixels,
    or, with variable_size, JPEGs whose sides vary between size / 2 and 2 x size."""

    num_examples: int = 0
    image_size: int = 0
    variable_size: bool = False


def _config(num_examples: int, image_size: int, variable_size: bool = False) -> RandomImagesConfig:
    kind = "varied JPEG" if variable_size else f"{image_size}x{image_size}x3 PNG"
    return RandomImagesConfig(
        name=f"{num_examples}x{image_size}px" + ("_varied" if variable_size else ""),
        num_examples=num_examples,
        image_size=image_size,
        variable_size=variable_size,
        description=f"{num_examples} random {kind} images.",
    )


class RandomImages(tfds.core.GeneratorBasedBuilder):
    """Uniform-noise RGB images as PNG with cycling labels; sizes fixed by the builder config."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [
        _config(48, 16),
        _config(96, 16),
        _config(48, 16, variable_size=True),
        _config(5_000, 64),
        _config(100_000, 64),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        if config.variable_size:
            image = tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
        else:
            size = config.image_size
            image = tfds.features.Image(shape=(size, size, 3), encoding_format="png")
        return self.dataset_info_from_configs(
            description="Random images for input-pipeline tests and benchmarks.",
            features=tfds.features.FeaturesDict(
                {
                    "image": image,
                    "label": tfds.features.ClassLabel(num_classes=RANDOM_IMAGES_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the pixels come from a seeded generator.
        count = self.builder_config.num_examples
        return {
            "train": self._generate_examples(count, split_seed=0),
            "test": self._generate_examples(max(count // 4, 1), split_seed=1),
        }

    def _generate_examples(self, count: int, split_seed: int):
        config = self.builder_config
        size = config.image_size
        for index in range(count):
            # One generator per example: any example can be regenerated on its own.
            rng = np.random.default_rng([_PIXEL_SEED, split_seed, index])
            shape = (size, size)
            if config.variable_size:
                shape = tuple(rng.integers(size // 2, 2 * size + 1, size=2))
            image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
            yield index, {"image": image, "label": index % RANDOM_IMAGES_CLASSES}


def random_images_name(num_examples: int, image_size: int, variable_size: bool = False) -> str:
    """The TFDS name ("random_images/<config>") of one of the BUILDER_CONFIGS."""
    name = _config(num_examples, image_size, variable_size).name
    if name not in {config.name for config in RandomImages.BUILDER_CONFIGS}:
        known = ", ".join(config.name for config in RandomImages.BUILDER_CONFIGS)
        raise ValueError(f"No random_images config {name!r}; expected one of {known}.")
    return f"random_images/{name}"


def random_images_info(
    num_examples: int, image_size: int, variable_size: bool = False
) -> DatasetInfo:
    """`DatasetInfo` of a random_images config: CIFAR statistics, crops of the full size."""
    return DatasetInfo(
        name=random_images_name(num_examples, image_size, variable_size),
        image_size=image_size,
        channels=3,
        num_classes=RANDOM_IMAGES_CLASSES,
        crop_size=image_size,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        train_split="train",
        test_split="test",
        num_train=num_examples,
        num_test=max(num_examples // 4, 1),
        grayscale=False,
        variable_size=variable_size,
    )


def prepare_random_images(
    num_examples: int, image_size: int, data_dir: str, variable_size: bool = False
) -> RandomImages:
    """Builds one random_images config as ArrayRecord files in `data_dir` (once; then reused)."""
    name = random_images_name(num_examples, image_size, variable_size)
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP
            ),
        )
    return builder

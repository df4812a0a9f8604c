"""`random_images`: a TFDS dataset of random images that the package knows nothing of, for the
pipeline tests (a catalogue-like dataset read by name, one stored as TFRecord).

Each builder config fixes the number of examples and the image side. Images are uniform noise
encoded as PNG, or as JPEGs of varying sides for the "_varied" config (like ImageNet), whose
TFDS metadata gives the side to decode them to, as `python -m hscl_jax.data.prepare` does; labels
cycle over 10 classes. Importing this module imports tensorflow_datasets and registers the
builder.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from hscl_jax.data.tfds_source import PREPARED_METADATA_KEY

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
    # TFDS looks for a builder's metadata files in its Python package; this module has none.
    pkg_dir_path = epath.Path(__file__).parent
    BUILDER_CONFIGS = [
        _config(48, 16),
        _config(96, 16),
        _config(48, 16, variable_size=True),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        if config.variable_size:
            image = tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
        else:
            size = config.image_size
            image = tfds.features.Image(shape=(size, size, 3), encoding_format="png")
        size = {"image_size": config.image_size, "crop_size": config.image_size}
        return self.dataset_info_from_configs(
            description="Random images for input-pipeline tests.",
            metadata=tfds.core.MetadataDict({PREPARED_METADATA_KEY: size}),
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
            yield index, {"image": _encoded(image, config), "label": index % RANDOM_IMAGES_CLASSES}


def _encoded(image: np.ndarray, config: RandomImagesConfig) -> bytes:
    """The image as PNG (JPEG for the varied config), encoded by PIL: TFDS would import
    TensorFlow to encode a numpy array."""
    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="JPEG" if config.variable_size else "PNG")
    return buffer.getvalue()


def prepare_random_images(
    num_examples: int, image_size: int, data_dir: str, variable_size: bool = False
) -> RandomImages:
    """Builds one random_images config as ArrayRecord files in `data_dir` (once; then reused)."""
    config = _config(num_examples, image_size, variable_size)
    builder = RandomImages(config=config.name, data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP
            ),
        )
    return builder

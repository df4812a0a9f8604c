"""Per-dataset metadata: the registered recipes' in one table, any other dataset's read from its
prepared TFDS files (hscl_jax.data.tfds_source). No TensorFlow import."""

from __future__ import annotations

import dataclasses

# The reference normalises every paper dataset (STL-10 included) with these CIFAR-10 statistics, as
# the HCL / SimCLR-CIFAR code it descends from does.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

# The digits train split's (pixel / 255; tests/test_data.py recomputes them).
DIGITS_MEAN = (0.3055,)
DIGITS_STD = (0.3759,)

# The usual ImageNet statistics (torchvision's), for imagenet2012 and its subset imagenette.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one dataset.

    Attributes:
      name: dataset name as used in the data config ("digits", "cifar10", ...).
      image_size: stored image height = width, in pixels.
      channels: 1 (grayscale) or 3 (RGB).
      num_classes: number of labels.
      crop_size: side of the training crop (and of the model input during training).
      mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
      train_split, test_split: TFDS split names used for training and for evaluation.
      num_train, num_test: number of examples in those splits (of the real, non-mocked data).
      grayscale: True when colour augmentations (jitter, random grayscale) make no sense.
      variable_size: True when the stored images differ in size (e.g. ImageNet): each is then
        decoded on the host with its shorter side resized to image_size and centre-cropped to
        image_size x image_size (uint8), so that everything downstream sees one shape.
      tfds_name: the TFDS catalogue name with its builder config, when it differs from name.
      manual_download: what to put where before `tfds build`, for datasets TFDS cannot download.
      image_key, label_key: the TFDS features holding the image and the class label.
      class_names: the name of each label, when the dataset stores them.
    """

    name: str
    image_size: int
    channels: int
    num_classes: int
    crop_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_split: str
    test_split: str
    num_train: int
    num_test: int
    grayscale: bool
    variable_size: bool = False
    tfds_name: str | None = None
    manual_download: str | None = None
    image_key: str = "image"
    label_key: str = "label"
    # Left out of equality and hashing: a jit-compiled function keyed on this info (as a static
    # argument) should not hash a thousand class names on every call.
    class_names: tuple[str, ...] | None = dataclasses.field(default=None, compare=False)

    @property
    def augmentation_preset(self) -> str:
        """The augmentation preset a config without one gets: "digits" (mild crops only) for
        grayscale data, "simclr" otherwise (hscl_jax.data.augment_params)."""
        return "digits" if self.grayscale else "simclr"


_DATASETS = {
    "digits": DatasetInfo(
        name="digits",
        image_size=8,
        channels=1,
        num_classes=10,
        crop_size=8,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        train_split="train",
        test_split="test",
        num_train=1438,
        num_test=359,
        grayscale=True,
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        image_size=32,
        channels=3,
        num_classes=10,
        crop_size=32,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        train_split="train",
        test_split="test",
        num_train=50_000,
        num_test=10_000,
        grayscale=False,
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        image_size=32,
        channels=3,
        num_classes=100,
        crop_size=32,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        train_split="train",
        test_split="test",
        num_train=50_000,
        num_test=10_000,
        grayscale=False,
    ),
    # The reference trains on the 5000 labelled train images, random-resized-cropped to 32 px.
    "stl10": DatasetInfo(
        name="stl10",
        image_size=96,
        channels=3,
        num_classes=10,
        crop_size=32,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        train_split="train",
        test_split="test",
        num_train=5_000,
        num_test=8_000,
        grayscale=False,
    ),
    # Host decode: shorter side to 256, centre 256 x 256 (variable_size); random resized crops of
    # 224 px are taken inside that square (the SimCLR/SupCon ImageNet crop size).
    "imagenet2012": DatasetInfo(
        name="imagenet2012",
        image_size=256,
        channels=3,
        num_classes=1000,
        crop_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        train_split="train",
        test_split="validation",
        num_train=1_281_167,
        num_test=50_000,
        grayscale=False,
        variable_size=True,
        manual_download=(
            "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
            "https://image-net.org (registration needed) into DATA_DIR/downloads/manual/"
        ),
    ),
    # The 10-class ImageNet subset; the 320 px variant (shorter side 320) is 1/4 of the full-size
    # download and loses nothing at 256 px.
    "imagenette": DatasetInfo(
        name="imagenette",
        image_size=256,
        channels=3,
        num_classes=10,
        crop_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        train_split="train",
        test_split="validation",
        num_train=9_469,
        num_test=3_925,
        grayscale=False,
        variable_size=True,
        tfds_name="imagenette/320px-v2",
    ),
    # Random images and labels shaped like CIFAR-10, made in numpy (throughput runs without TF).
    "synthetic": DatasetInfo(
        name="synthetic",
        image_size=32,
        channels=3,
        num_classes=10,
        crop_size=32,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        train_split="train",
        test_split="test",
        num_train=4096,
        num_test=1024,
        grayscale=False,
    ),
}

DATASET_NAMES = tuple(_DATASETS)


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """The metadata of dataset `name`: a registered recipe's (DATASET_NAMES), else that of the
    TFDS dataset `name` prepared in `data_dir` (None: TFDS's default data dir), read from its
    files (hscl_jax.data.tfds_source.prepared_dataset_info); DataError when there is none."""
    if name in _DATASETS:
        return _DATASETS[name]
    from hscl_jax.data import tfds_source

    return tfds_source.prepared_dataset_info(name, data_dir)

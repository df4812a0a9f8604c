"""H-SCL on ImageNet (ILSVRC-2012): ResNet-50 with the ImageNet stem, LARS, global batch 4096.

The large-batch recipe of SimCLR and SupCon on ImageNet, with the H-SCL loss:
- data: TFDS `imagenet2012`, each image decoded on the host with its shorter side resized to
  256 px and centre-cropped to 256 x 256 (uint8), then SimCLR augmentation with 224 px random
  resized crops; evaluation on the 50,000 validation images resized to 224 px;
- model: ResNet-50, ImageNet stem (7x7 stride-2 convolution + max-pool), head 2048 -> 512 -> 128,
  bfloat16 compute (float32 parameters);
- loss: H-SCL, beta = 1 (override with --config.loss.beta), temperature 0.1 as SimCLR and SupCon
  use at this batch size, every other same-label view a positive;
- optimiser: LARS (momentum 0.9, trust coefficient 0.001), learning rate 0.3 x 4096 / 256 = 4.8,
  10 warm-up epochs then cosine decay to 0, weight decay 1e-6, BatchNorm and biases excluded from
  decay and trust-ratio scaling; 100 epochs of 312 steps.

ImageNet cannot be downloaded by TFDS: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into
DATA_DIR/downloads/manual/, run `tfds build imagenet2012 --data_dir=DATA_DIR
--file_format=array_record` once, then

    python train.py --config=configs/imagenet.py --workdir=/path/to/run \
        --config.data.data_dir=DATA_DIR --config.data.decode_workers=16

(a missing dataset stops the run at once with those steps). Every process of a multi-host job
reads only its slice of each global batch; see docs/multi-host.md.

Hardware: a TPU pod slice or a multi-GPU, multi-host job (4096 images x 2 views of 224 px per
step). Throughput and accuracy: NOT run in this project (no accelerator host with ImageNet was
available); no number is claimed. The weighted-kNN monitor runs only at the end (its bank is
every training image's feature).
"""

from hscl_jax import config as config_lib

_BATCH = 4096
_STEPS_PER_EPOCH = 1_281_167 // _BATCH  # 312, the last partial batch dropped


def get_config():
    config = config_lib.base_config("imagenet2012")
    config.global_batch_size = _BATCH
    config.num_epochs = 100
    config.model.name = "resnet50"
    config.model.stem = "imagenet"
    config.model.dtype = "bfloat16"
    config.loss.temperature = 0.1
    config.optim.name = "lars"
    config.optim.learning_rate = 0.3 * _BATCH / 256
    config.optim.momentum = 0.9
    config.optim.weight_decay = 1e-6
    config.optim.weight_decay_on_bn_and_bias = False
    config.optim.schedule = "warmup_cosine"
    config.optim.warmup_steps = 10 * _STEPS_PER_EPOCH
    config.data.eval_image_size = 224
    config.eval_every_steps = 0
    config.checkpoint_every_steps = _STEPS_PER_EPOCH
    return config

"""Prime (ell = 2, b = 16) on CIFAR-10 pixels at the paper's training scale (docs/method/prime.md §6.5).

Data: TFDS ``cifar10`` prepared on disk in the array_record format (nothing is
downloaded; ``tfds build cifar10 --file_format=array_record`` where there is
internet, then copy ``~/tensorflow_datasets/cifar10``):

  python -m mdm_jax.main --config=cifar10_prime --workdir=runs/c10_prime \
      --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Each image is 32x32x3 = 3,072 pixel-channel tokens of V = 256.  The paper uses an
ADM U-Net (~100M+ parameters); here the backbone is ``image_dit``: a DiT-B-sized
transformer (12 x 768, 12 heads) over 2x2 patches (256 patch tokens), with Prime's
per-channel digit embedding.  Optimiser as in the paper: AdamW lr 1e-4, betas
(0.9, 0.95), constant LR, global batch 512, EMA 0.999, ~412k steps (epoch 4,250).
The paper trains with the unweighted mean cross-entropy ("flat" here) and reports
FID; this project reports bits/dim (valid ELBO) and a classifier Frechet distance
(mdm_jax/cli/eval_images.py; not FID).  Differences: schedule linear (the paper used
alpha = (1 - t)^3), DiT instead of U-Net, no flips.

Variants: ``:ell=N``, ``:mdm`` (ell = 1), ``:levels=K``, ``:tiny``.
"""

from mdm_jax.configs.base import get_base_config
from mdm_jax.configs.fashion_mnist_prime import add_image_keys, apply_variants, parse_arg


def paper_image_config(image_shape, tfds_name: str, eval_split: str, num_steps: int):
  c = get_base_config()
  add_image_keys(c, image_shape, "tfds_images")
  c.data.tfds_name = tfds_name
  c.data.tfds_eval_split = eval_split
  c.objective = "diffusion"
  c.prime.ell = 2
  c.model.patch_size = 2
  c.model.pixel_dim = 64              # per pixel channel; 2x2x3 patch -> 768 inputs
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.dropout = 0.1
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.training.batch_size = 512
  c.training.num_steps = num_steps
  c.training.learning_rate = 1e-4
  c.training.lr_schedule = "constant"
  c.training.warmup_steps = 1000
  c.training.b1, c.training.b2 = 0.9, 0.95
  c.training.weight_decay = 0.0
  c.training.ema_decay = 0.999
  c.training.loss_weighting = "flat"  # the paper's plain CE; eval is always the ELBO
  c.training.log_every = 100
  c.eval.every_steps = 10000
  c.eval.batch_size = 256
  c.eval.num_batches = 40             # 10,240 images
  c.eval.num_time_samples = 1
  c.eval.fd_num_samples = 50000
  c.checkpoint.every_steps = 5000
  c.sampling.num_steps = 512          # NFE 512 as in the paper's headline CIFAR-10 number
  c.sampling.num_samples = 64
  c.mesh.shape = (-1, 1, 1)
  return c


def get_config(arg: str = ""):
  c = paper_image_config((32, 32, 3), "cifar10", "test", 412_000)
  opts = parse_arg(arg)
  if opts.pop("mdm", False):
    c.prime.ell = 1
  return apply_variants(c, ",".join(f"{k}={v}" if v is not True else k for k, v in opts.items()))

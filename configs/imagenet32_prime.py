"""Prime (ell = 2) on ImageNet-32 (TFDS ``downsampled_imagenet/32x32``) at the paper's scale.

Same model and optimiser as ``configs/cifar10_prime.py`` (docs/method/prime.md §6.5): 32x32x3 =
3,072 tokens of V = 256, DiT 12 x 768 over 2x2 patches, AdamW 1e-4 (0.9, 0.95), batch
512, EMA 0.999; the paper's best ImageNet-32 checkpoint is at epoch 975, about
2.44M steps of 512 images; the headline number used NFE 1024.  The dataset has no
labels, so the classifier Frechet distance needs a feature classifier trained on
another labelled 32x32x3 dataset (e.g. CIFAR-10); bits/dim is always available.

  python -m mdm_jax.main --config=imagenet32_prime --workdir=runs/i32_prime \
      --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Variants: ``:ell=N``, ``:mdm``, ``:levels=K``, ``:tiny``.
"""

from mdm_jax.configs.cifar10_prime import paper_image_config
from mdm_jax.configs.fashion_mnist_prime import apply_variants, parse_arg


def get_config(arg: str = ""):
  c = paper_image_config((32, 32, 3), "downsampled_imagenet/32x32", "validation", 2_440_000)
  c.sampling.num_steps = 1024
  opts = parse_arg(arg)
  if opts.pop("mdm", False):
    c.prime.ell = 1
  return apply_variants(c, ",".join(f"{k}={v}" if v is not True else k for k, v in opts.items()))

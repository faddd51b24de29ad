"""MC-DiT and its baselines on CIFAR-10 (32x32x3, 10 classes): Gaussian diffusion, GPU scale.

The same arms and keys as ``configs/fashion_mnist_mcdit.py`` (see it and
``docs/mc_dit.md``), at the spec's ``small`` size by default: DiT-S width (384, 6
heads), 2x2 patches (256 tokens), E 10 + D_n 2 (+ D_c 2 | + 1 side block), batch 256,
50k steps, bf16 compute, EMA 0.9999.  Data: TFDS ``cifar10`` prepared on disk in the
array_record format (nothing is downloaded; see docs/images.md):

  python -m mdm_jax.main --config=cifar10_mcdit:arm=mcdit --workdir=runs/c10_mcdit \
      --config.data.tfds_data_dir=/path/to/tensorflow_datasets

Variants: those of fashion_mnist_mcdit (``arm=``, ``tiny``, ``patch=``, ``ratio=``,
``lambda=``, ``n2c``, ``mask_token``, ``context_t``, ``single_decoder``, ``c_only``,
``edm``, ``smoke``); ``tiny`` gives the 128-wide CPU
model over 4x4 patches.
"""

from mdm_jax.configs.base import get_base_config, parse_arg
from mdm_jax.configs.fashion_mnist_mcdit import add_gaussian_keys, apply_gaussian_variants


def get_config(arg: str = ""):
  c = get_base_config()
  add_gaussian_keys(c, (32, 32, 3), "tfds_images", 10)
  c.data.tfds_name = "cifar10"
  c.data.tfds_eval_split = "test"
  opts = parse_arg(arg)
  if not opts.get("tiny"):
    opts["small"] = True
  opts.pop("tiny", None)
  return apply_gaussian_variants(c, ",".join(f"{k}={v}" if v is not True else k
                                             for k, v in opts.items()))

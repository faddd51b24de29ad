"""Prime (partial masking) on Fashion-MNIST pixels: 28x28x1, 256 levels, ell = 2 (b = 16).

Each pixel is one token of V = 256 values written as ell base-b digits; an image is
the raster row of 784 tokens.  The backbone is ``image_dit`` (a DiT over 4x4 patches,
49 patch tokens), sized for 2 CPU cores.  Data: Debian's full Fashion-MNIST
(``bash launch/setup_env.sh`` extracts it; see mdm_jax/data/images.py).

  python -m mdm_jax.main --config=fashion_mnist_prime --workdir=runs/fmnist_prime

Variants: ``:ell=N`` (1 = plain MDM; 2, 4, 8 are exact for 256 levels), ``:levels=K``
(K levels per pixel), ``:tiny`` (a seconds-long smoke run on 256 images), combinable
as ``:ell=4,tiny``.  Evaluation: ``eval_bits_per_token`` is bits per dimension
(sub-pixel) from the valid ELBO; sample grids are ``samples/step_N.png``; the
classifier-feature Frechet distance comes from ``python -m mdm_jax.cli.eval_images``.
"""

from mdm_jax.configs.base import get_base_config, parse_arg  # noqa: F401 (re-exported)


def add_image_keys(c, image_shape, dataset: str):
  """The image data values (mdm_jax/data/images.py) and the image_dit model values."""
  c.data.dataset = dataset
  c.data.num_levels = 256             # levels per channel (tokens); 256 = raw 8-bit pixels
  c.data.image_size = 0               # image_folder: resize to N x N (0 = native)
  c.data.channels = int(image_shape[2])   # image_folder: 1 (grey) | 3 (RGB)
  c.data.tfds_name = ""               # tfds_images: e.g. cifar10, downsampled_imagenet/32x32
  c.data.tfds_data_dir = ""
  c.data.tfds_train_split = "train"
  c.data.tfds_eval_split = "test"
  c.data.max_train_examples = 0       # 0 = all
  c.data.max_eval_examples = 0
  c.data.eval_fraction = 0.1          # image_folder only (the others have a test split)
  c.data.seq_len = int(image_shape[0] * image_shape[1] * image_shape[2])
  c.data.tokenizer = "byte"           # unused by image data (the "tokenizer" is pixels)
  c.model.name = "image_dit"
  c.model.image_shape = tuple(int(s) for s in image_shape)
  c.model.patch_size = 2
  c.model.pixel_dim = 32
  # Frechet distance on the project's own classifier (mdm_jax/cli/eval_images.py).
  c.eval.classifier_path = ""         # trained by `python -m mdm_jax.cli.eval_images --mode=train_classifier`
  c.eval.fd_num_samples = 1000
  # Di[M]O on pixels: no label smoothing for the auxiliary model.  With the paper's 0.1
  # the auxiliary is always broader than the generator, so g keeps sharpening the
  # generator towards the teacher's mode, and on Fashion-MNIST that mode is black:
  # the generator collapsed to black images by step 20 (FD 1043).  With 0 it does not
  # collapse (its entropy cycles between 1.4 and 4.6 nats) and at 200 steps its
  # one-step FD was 200 (docs/images.md).
  c.distill.label_smoothing = 0.0
  return c


def apply_variants(c, arg: str, allow_ell: bool = True):
  opts = parse_arg(arg)
  valid = {"ell", "tiny", "levels"} if allow_ell else {"tiny", "levels"}
  unknown = set(opts) - valid
  if unknown:
    raise ValueError(f"Unknown config variant(s) {sorted(unknown)}; valid: {sorted(valid)}.")
  if "ell" in opts:
    c.prime.ell = int(opts["ell"])
  if "levels" in opts:
    c.data.num_levels = int(opts["levels"])
  if opts.get("tiny"):
    c.data.max_train_examples = 256
    c.data.max_eval_examples = 32
    c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
    c.model.cond_dim = 32
    c.model.pixel_dim = 8
    c.model.patch_size = 4
    c.training.batch_size = 8
    c.training.num_steps = 6
    c.training.warmup_steps = 2
    c.training.log_every = 3
    c.eval.every_steps = 6
    c.eval.batch_size = 8
    c.eval.num_batches = 1
    c.eval.num_time_samples = 1
    c.eval.fd_num_samples = 16
    c.checkpoint.every_steps = 6
    c.checkpoint.async_save = False
    c.sampling.num_steps = 4
    c.sampling.num_samples = 4
  return c


def get_fashion_base():
  c = get_base_config()
  add_image_keys(c, (28, 28, 1), "fashion_mnist")
  # ~1.2M parameters; 4x4 patches -> 49 patch tokens, 784 pixel logits each pass.
  c.model.patch_size = 4
  c.model.pixel_dim = 16
  c.model.num_layers = 4
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.gate_init = 1.0             # plain pre-LN start: learns faster on a CPU budget
  c.training.batch_size = 32
  c.training.num_steps = 2000
  c.training.learning_rate = 2e-3
  c.training.warmup_steps = 100
  c.training.ema_decay = 0.99
  c.training.log_every = 50
  c.eval.every_steps = 1000
  c.eval.batch_size = 64
  c.eval.num_batches = 8
  c.eval.num_time_samples = 2
  c.checkpoint.every_steps = 500
  c.sampling.num_steps = 128
  c.sampling.num_samples = 16
  return c


def get_config(arg: str = ""):
  c = get_fashion_base()
  c.objective = "diffusion"
  c.prime.ell = 2
  return apply_variants(c, arg)

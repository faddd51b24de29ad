"""MC-DiT and its baselines (plain DiT, MDT-style masking) on Fashion-MNIST: Gaussian diffusion.

DDPM (T = 1000, linear betas, ε-prediction, fixed variance) with a class-conditional
patch DiT (``model.name = "mc_dit"``, ``mdm_jax/networks/mc_dit.py``); labels dropped
with p = 0.1 for classifier-free guidance.  One config line picks the arm
(``model.arm``), see ``docs/mc_dit.md`` and ``docs/method/mc_dit.md`` §3-5:

  dit    E 4 + D_n 2 blocks (a 6-block DiT)
  mdt    + MDT-v1's masked pass (4 encoder blocks on the kept tokens, 1 side block, D_n 2), r = 0.3
  mcdit  + the clean-reconstruction decoder D_c (2 blocks) on clean visible + noisy masked
         patches, x0 targets, λ_C = 1, r = 0.5

  python -m mdm_jax.main --config=fashion_mnist_mcdit:arm=mcdit --workdir=runs/mcdit/fm_mcdit
  python -m mdm_jax.main --config=fashion_mnist_mcdit:arm=mcdit --workdir=runs/mcdit/fm_mcdit \
      --mode=sample                     # PNG grid from the EMA weights (E + D_n only)
  python -m mdm_jax.cli.eval_gaussian --config=fashion_mnist_mcdit:arm=mcdit \
      --workdir=runs/mcdit/fm_mcdit --classifier_path=runs/img/fmnist_classifier

Variants (comma-separated after ':'):
  arm=dit|mdt|mcdit   the training arm (default mcdit)
  tiny | small        the spec's sizes: tiny 128/4, 4x4 patches, batch 64, fp32 (2 CPU cores;
                      default); small 384/6 (DiT-S), 10+2(+2) blocks, 2x2 patches, batch 256,
                      50k steps, bf16 (1 GPU)
  patch=2|4           patch size (4: 49 tokens, CPU; 2: 196 tokens, GPU)
  ratio=R  lambda=L   mask ratio r and λ_C (ablation sweeps)
  n2c                 mcdit with noisy visible context (noisy-to-clean ablation)
  mask_token          mcdit with a learned token instead of noisy masked patches (MAE-style)
  context_t           mcdit with visible patches at a small level t_u = floor(u t), told to
                      their tokens (model.context_time)
  single_decoder      mcdit whose branch C decodes with D_n (no D_c)
  c_only              single_decoder with gaussian.lambda_g = 0: C without G (collapse ablation)
  edm                 EDM formulation (σ-sampling, preconditioning, Heun sampler) instead of DDPM
  smoke               a seconds-long run on 256 images (tests)
"""

from mdm_jax.configs.base import get_base_config, parse_arg
from mdm_jax.configs.fashion_mnist_prime import add_image_keys

ARM_DEFAULT_RATIO = {"dit": 0.0, "mdt": 0.3, "mcdit": 0.5}
VARIANTS = {"arm", "tiny", "small", "patch", "ratio", "lambda", "n2c", "mask_token", "edm",
            "smoke", "context_t", "single_decoder", "c_only"}


def add_gaussian_keys(c, image_shape, dataset: str, num_classes: int):
  """Image data values + the mc_dit model values + the ``gaussian`` block (keys declared in base.py)."""
  add_image_keys(c, image_shape, dataset)
  c.objective = "gaussian"
  c.prime.ell = 1                     # unused: pixels are dequantised to floats in [-1, 1]
  c.data.class_labels = True          # batches carry labels (class-conditional + CFG)
  m = c.model
  m.name = "mc_dit"
  m.arm = "mcdit"                     # dit | mdt | mcdit
  m.n_encoder = 4                     # E
  m.n_decoder = 2                     # D_n: the sampling path is E + D_n
  m.aux_decoder_depth = 2             # mcdit: D_c (0 turns branch C off)
  m.side_depth = 1                    # mdt: side-interpolater blocks
  m.num_classes = int(num_classes)    # 0 = unconditional
  m.c2c_mask_token = False            # mcdit: learned token for masked inputs of branch C
  m.shared_decoder = False            # mcdit ablation: branch C decodes with D_n (no D_c)
  m.context_time = False              # mcdit: visible tokens of C embed their own noise level
  m.d_model, m.num_heads, m.mlp_ratio, m.cond_dim = 128, 4, 4, 128
  m.patch_size = 4
  m.gate_init = 0.0                   # adaLN-Zero
  m.time_conditioning = True
  gc = c.gaussian
  gc.form = "ddpm"                    # ddpm (ε-prediction, fixed variance) | edm
  gc.schedule = "linear"              # ddpm betas: linear (1e-4..0.02) | cosine
  gc.num_timesteps = 1000
  gc.edm_p_mean, gc.edm_p_std, gc.edm_sigma_data = -1.2, 1.2, 0.5
  gc.edm_sigma_min, gc.edm_sigma_max, gc.edm_rho = 0.002, 80.0, 7.0
  gc.mask_ratio = 0.5                 # mdt / mcdit: K = round(r N) masked patches per image
  gc.lambda_c = 1.0                   # mcdit: L = L_G + λ_C L_C
  gc.context = "clean"                # mcdit: clean (c2c) | noisy (n2c ablation) |
                                      # small_t (context_t: visible at t_u ~ U[0, t); needs
                                      # model.context_time)
  gc.lambda_g = 1.0                   # mcdit: weight of L_G (0 with single_decoder: "C without G")
  gc.label_dropout = 0.1              # classifier-free guidance training
  gc.sampler = "ddim"                 # ddim | ddpm (form ddpm) | edm_heun (form edm)
  gc.ddim_eta = 0.0
  gc.ddpm_variance = "small"          # small (posterior β̃) | large (β)
  gc.guidance = 1.0                   # CFG w: 1 = conditional, unguided; 1.5 = guided
  gc.clip_x0 = True
  gc.eval_buckets = 8                 # held-out L_G at 8 fixed noise levels
  # Training: AdamW 3e-4, 1k warm-up, clip 1, constant LR (docs/method/mc_dit.md §3.4).
  t = c.training
  t.batch_size, t.num_steps = 64, 5000
  t.learning_rate, t.lr_schedule, t.warmup_steps = 3e-4, "constant", 1000
  t.b1, t.b2, t.weight_decay, t.grad_clip = 0.9, 0.999, 0.0, 1.0
  t.ema_decay = 0.999
  t.t_min = 1e-6                      # u ~ U[t_min, 1] (stratified) -> step floor(u T)
  t.log_every = 50
  c.eval.every_steps, c.eval.batch_size, c.eval.num_batches = 1000, 64, 4
  c.eval.fd_num_samples = 1000
  c.sampling.num_steps = 100          # DDIM η = 0 for tracking; DDPM 250 for final tables
  c.sampling.num_samples = 64
  c.checkpoint.every_steps = 1000
  return c


def apply_gaussian_variants(c, arg: str):
  opts = parse_arg(arg)
  unknown = set(opts) - VARIANTS
  if unknown:
    raise ValueError(f"Unknown config variant(s) {sorted(unknown)}; valid: {sorted(VARIANTS)}.")
  arm = str(opts.get("arm", c.model.arm))
  if arm not in ARM_DEFAULT_RATIO:
    raise ValueError(f"arm={arm!r}: choose dit, mdt or mcdit.")
  c.model.arm = arm
  c.gaussian.mask_ratio = ARM_DEFAULT_RATIO[arm]
  if opts.get("small"):
    c.model.d_model, c.model.num_heads, c.model.cond_dim = 384, 6, 384
    c.model.n_encoder = 10
    c.model.patch_size = 2
    c.model.dtype = "bfloat16"
    c.training.batch_size, c.training.num_steps = 256, 50_000
    c.training.ema_decay = 0.9999
    c.eval.every_steps, c.checkpoint.every_steps = 5000, 5000
    c.eval.batch_size, c.eval.num_batches = 256, 8
  if "patch" in opts:
    c.model.patch_size = int(opts["patch"])
  if "ratio" in opts:
    c.gaussian.mask_ratio = float(opts["ratio"])
  if "lambda" in opts:
    c.gaussian.lambda_c = float(opts["lambda"])
  if opts.get("n2c"):
    c.gaussian.context = "noisy"
  if opts.get("mask_token"):
    c.model.c2c_mask_token = True
  if opts.get("context_t"):            # visible patches at a small noise level t_u < t
    c.gaussian.context = "small_t"
    c.model.context_time = True
  if opts.get("single_decoder"):       # one decoder: branch C also decodes with D_n
    c.model.shared_decoder = True
    c.model.aux_decoder_depth = 0
  if opts.get("c_only"):               # the collapse ablation: C without G, one decoder
    c.model.shared_decoder = True
    c.model.aux_decoder_depth = 0
    c.gaussian.lambda_g = 0.0
  if opts.get("edm"):
    c.gaussian.form = "edm"
    c.gaussian.sampler = "edm_heun"
    c.sampling.num_steps = 32
  if opts.get("smoke"):
    c.data.max_train_examples, c.data.max_eval_examples = 256, 32
    c.model.d_model, c.model.num_heads, c.model.cond_dim, c.model.mlp_ratio = 32, 2, 32, 2
    c.model.n_encoder, c.model.n_decoder, c.model.aux_decoder_depth = 1, 1, 1
    c.model.patch_size = 4
    c.training.batch_size, c.training.num_steps = 8, 4
    c.training.warmup_steps, c.training.log_every = 2, 2
    c.eval.every_steps, c.eval.batch_size, c.eval.num_batches = 4, 8, 1
    c.eval.fd_num_samples = 16
    c.checkpoint.every_steps, c.checkpoint.async_save = 4, False
    c.sampling.num_steps, c.sampling.num_samples = 4, 4
  return c


def get_config(arg: str = ""):
  c = get_base_config()
  add_gaussian_keys(c, (28, 28, 1), "fashion_mnist", 10)
  return apply_gaussian_variants(c, arg)

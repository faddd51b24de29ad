"""Every configuration key of mdm_jax, with its default and meaning: the one place keys are declared.

Experiment configs (``shakespeare_prime`` and friends, in this folder, installed as
``mdm_jax.configs``) start from ``get_base_config()`` and override a few values; they
never add keys.  Any value can be overridden on the command line
(``--config.model.num_layers=6``); a key that is not declared here is an error.
``docs/reference.md`` lists every key with its default, generated from this file.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "diffusion": masked diffusion (prime.ell == 1 is the plain MDM, ell > 1 is Prime).
  # "ar": autoregressive baseline with the same backbone and a causal mask.
  c.objective = "diffusion"

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "shakespeare"      # shakespeare | text_files | array_record (--mode=prepare)
  c.data.path = ""                    # text_files: files/globs, comma-separated; array_record: dir
  c.data.tokenizer = "char"           # char | byte | bpe | gpt2
  c.data.bpe_vocab_size = 1024        # tokenizer == "bpe"
  c.data.gpt2_bpe_path = ""           # tokenizer == "gpt2": path to gpt2.tiktoken (r50k_base)
  c.data.seq_len = 256                # tokens per training sequence
  c.data.eval_fraction = 0.01         # tail of the token stream held out for eval
  c.data.token_order = "id"           # id | context | random: context renumbers the vocabulary so
                                      # that tokens used in similar contexts get nearby ids (Prime's
                                      # high digits then mean word classes); random is a seeded
                                      # shuffle (shuffle_seed); mdm_jax/data/token_order.py
  c.data.shuffle_seed = 0
  c.data.max_invalid_utf8 = 0.001     # text_files: largest fraction of bytes that may be invalid
                                      # UTF-8 (replaced by U+FFFD, counted in a warning); above
                                      # it (and past 64 bytes) the corpus is refused; 1.0 accepts all
  # Images (mdm_jax/data/images.py): data.dataset = fashion_mnist | image_folder | tfds_images.
  c.data.num_levels = 256             # levels per pixel channel (tokens); 256 = raw 8-bit pixels
  c.data.image_size = 0               # image_folder: resize to N x N (0 = native)
  c.data.channels = 3                 # image_folder: 1 (grey) | 3 (RGB)
  c.data.tfds_name = ""               # tfds_images: e.g. cifar10, downsampled_imagenet/32x32
  c.data.tfds_data_dir = ""           # tfds_images: TFDS data_dir ("" = TFDS's default)
  c.data.tfds_train_split = "train"   # tfds_images
  c.data.tfds_eval_split = "test"     # tfds_images
  c.data.max_train_examples = 0       # images: use at most this many (0 = all)
  c.data.max_eval_examples = 0        # images: likewise for the eval split
  c.data.class_labels = False         # images: batches also carry int32 labels (class-conditional)

  # ---------------------------------------------------------------- Prime
  c.prime = ml_collections.ConfigDict()
  c.prime.ell = 2                     # sub-tokens per token; 1 = plain MDM
  c.prime.permute = False             # fixed seeded permutation of token ids before encoding
  c.prime.perm_seed = 0
  c.prime.loss = "marginal"           # marginal (valid bound, default) | joint (paper, NOT a bound)
  c.prime.carry_over = True           # restrict predictions to tokens consistent with observed digits
  c.prime.chunk_point = 1.0           # v2 grouped noise: for t > this a token's digits are masked
                                      # together in training (1 = Prime; eval is always independent)

  # ---------------------------------------------------------------- schedule
  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "linear"          # linear | cosine | polynomial | loglinear | geometric (+ below)
  c.schedule.power = 1.0              # polynomial: alpha = 1 - t**power
  c.schedule.eps = 1e-3               # loglinear: alpha = (1 - t)(1 + eps t): MDLM's 1 - (1-eps) t
                                      # near t = 0, and fully masked (alpha = 0) at t = 1
  c.schedule.sigma_min = 1e-4         # geometric
  c.schedule.sigma_max = 20.0         # geometric
  # Multivariate (per-position) schedules, mdm_jax/diffusion/schedules/:
  # name = learned_poly | plackett_luce | left_to_right | slot_poly | learned_tilt | genmd4
  c.schedule.order = "free"           # learned_poly, plackett_luce: free (one log w per position)
                                      # | mlp (position MLP)
  c.schedule.order_hidden = 64        # learned_poly, order=mlp: hidden width
  c.schedule.max_log_w = 5.0          # learned_poly: log w is centred and clipped to +-max_log_w
  c.schedule.num_masks = 2            # learned schedules: masks (plackett_luce: order prefixes) per
                                      # sequence in training (>= 2: leave-one-out score gradient)
  c.schedule.grad_scale = 0.05        # learned schedules: gradient scale of their parameters
                                      # (Adam-invariant; keeps their noisy gradient out of the
                                      # global-norm clip)
  c.schedule.lr_scale = 1.0           # learned_tilt, genmd4: the optimiser's step on the schedule's
                                      # parameters relative to the network's (stored divided by it)
  c.schedule.sharpness = 1.0          # left_to_right: 0 = linear MDM, 1 = exactly left-to-right AR
  c.schedule.slot_tilt = 1.0          # slot_poly (per-digit, Prime): alpha_j = 1 - t**w_j with
                                      # log w_j = tilt (ell-1-j)/(ell-1) (min 0); > 0 decodes a token's
                                      # leading digit first (coarse to fine), 0 = linear

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.name = "dit"
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.mlp_ratio = 4
  c.model.cond_dim = 128
  c.model.dropout = 0.0
  c.model.time_conditioning = False   # MDLM default: time-agnostic network (enables sampler caching)
  c.model.tie_embeddings = False      # only possible with prime.ell == 1
  c.model.digit_merge = "concat"      # Prime input: concat (paper, D/ell per digit) | sum (v2)
                                      # | joint (one row per partial state, (b+1)**ell rows)
  c.model.per_slot_tables = False     # v2 "non-shared": one digit table per slot
  c.model.norm_eps = 1e-6             # LayerNorm epsilon (converted MDLM / MDM-Prime models: 1e-5)
  c.model.mlp_bias = False            # MLP biases (converted MDLM / MDM-Prime models: True)
  c.model.head_bias = False           # output-head bias (converted MDLM / MDM-Prime models: True)
  c.model.dtype = "float32"           # compute dtype: float32 | bfloat16
  c.model.param_dtype = "float32"
  c.model.attention_impl = "xla"      # xla | cudnn (GPU) | splash (TPU Pallas kernel; length a
                                      # multiple of 128; other backends fall back to xla)
  c.model.scan_layers = True
  c.model.remat = "none"              # what a block keeps for the backward pass: none (all) |
                                      # matmuls (matmul outputs) | dots (the 4 projections) |
                                      # dots_attention (projections + attention output) |
                                      # attention (attention output) | full (block input)
  # Residual gate offset: 0.0 is adaLN-Zero (MDLM/DiT; blocks start as the identity);
  # 1.0 starts them as ordinary pre-LN blocks, which learns faster on tiny budgets.
  c.model.gate_init = 0.0
  c.model.local_conv = 0              # > 0: residual depthwise conv (odd width) over length in
                                      # each block: masked positions read their neighbours early
  c.model.loss_chunk = 0              # > 0: the output head and the loss run this many positions
                                      # at a time, rematerialised (never all [B, L, V] logits at
                                      # once; same values); 0 = full logits (dit only)
  c.model.vocab_multiple = 0          # > 1: the untied output head is V rounded up to a multiple
                                      # of this wide (128 x the tensor-axis size shards it; the
                                      # extra logits are masked); 0 = exactly V (changes the
                                      # parameters: a checkpoint restores only with its own value)
  # Image backbones (model.name = image_dit | mc_dit; mdm_jax/networks/).
  c.model.image_shape = (28, 28, 1)   # (H, W, C); data.seq_len must equal H * W * C
  c.model.patch_size = 2              # p x p patches
  c.model.pixel_dim = 32              # image_dit: embedding width of one pixel channel's digits
  # mc_dit (objective = "gaussian"; docs/method/mc_dit.md): the dit | mdt | mcdit arms.
  c.model.arm = "mcdit"               # dit | mdt | mcdit
  c.model.n_encoder = 4               # E
  c.model.n_decoder = 2               # D_n: the sampling path is E + D_n
  c.model.aux_decoder_depth = 2       # mcdit: D_c (0 turns branch C off)
  c.model.side_depth = 1              # mdt: side-interpolater blocks
  c.model.num_classes = 0             # class-conditional with this many classes (0 = unconditional)
  c.model.c2c_mask_token = False      # mcdit: learned token for masked inputs of branch C
  c.model.shared_decoder = False      # mcdit ablation: branch C decodes with D_n (no D_c)
  c.model.context_time = False        # mcdit: visible tokens of C embed their own noise level

  # ---------------------------------------------------------------- training
  c.training = ml_collections.ConfigDict()
  c.training.batch_size = 32          # global batch (sequences per step)
  c.training.num_microbatches = 1     # gradient accumulation
  c.training.num_steps = 2000
  c.training.learning_rate = 1e-3
  c.training.lr_schedule = "cosine"   # constant | cosine
  c.training.warmup_steps = 100
  c.training.min_lr_ratio = 0.1
  c.training.weight_decay = 0.0
  c.training.b1 = 0.9
  c.training.b2 = 0.99
  c.training.grad_clip = 1.0
  c.training.ema_decay = 0.999        # 0 disables the EMA
  c.training.ema_warmup = True        # decay min(ema_decay, (1+n)/(10+n)) at step n, so the EMA
                                      # (and checkpoints_best, chosen by its bound) leaves the
                                      # initial parameters within the first steps
  c.training.t_min = 1e-3             # t ~ U[t_min, 1], stratified over the global batch
  c.training.antithetic = True
  c.training.loss_weighting = "elbo"  # elbo | flat (mean CE over masked tokens; eval is always elbo)
  c.training.log_every = 50

  # ---------------------------------------------------------------- eval
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 500
  c.eval.batch_size = 32
  c.eval.num_batches = 8              # 0 = the whole eval split
  c.eval.num_time_samples = 4         # stratified t samples per sequence
  c.eval.use_ema = True
  c.eval.seed = 1234                  # fixed eval key, never split from the training key
  c.eval.classifier_path = ""         # images: the feature classifier of the Frechet distance
                                      # (python -m mdm_jax.cli.eval_images --mode=train_classifier)
  c.eval.fd_num_samples = 1000        # images: samples for the classifier Frechet distance

  # ---------------------------------------------------------------- sampling
  c.sampling = ml_collections.ConfigDict()
  # ancestral | confidence | first_hitting | punt | eb | fast_dllm | maskgit | self_correct
  # | remdm (diffusion); ar (objective="ar").  See mdm_jax/sampling/*.py and docs.
  c.sampling.sampler = "ancestral"
  c.sampling.num_steps = 256          # grid steps T; first_hitting: event budget; punt/eb/fast_dllm: step cap
  c.sampling.num_samples = 4
  c.sampling.seq_len = 0              # 0 = data.seq_len
  c.sampling.temperature = 1.0
  c.sampling.top_k = 0                # 0 = off
  c.sampling.top_p = 1.0              # 1.0 = off
  c.sampling.every_steps = 0          # 0 = only at the end of training
  c.sampling.seed = 42
  c.sampling.use_ema = True
  c.sampling.scorer_workdir = ""      # an AR run: add its generative perplexity to sample stats
  c.sampling.precision = "float32"    # the samplers' random draws: float32 | float64 (CPU/GPU only)
  c.sampling.masking_picture = True   # also draw sample 0's masking trajectory (samples/*_masking.png)
  # Sampler options: each is passed only to the samplers that take it (mdm_jax/sampling/generate.py).
  c.sampling.confidence = "prob"      # confidence: prob | max_prob | margin | neg_entropy
  c.sampling.block_len = 0            # confidence: semi-AR blocks (1 = left to right; 0 = off)
  c.sampling.punt_eps = 0.05          # punt: independence tolerance (nats for kl); inf = top-K confidence
  c.sampling.punt_max_candidates = 0  # punt: K candidates per step (0 = every masked token)
  c.sampling.punt_divergence = "kl"   # punt: kl | logprob (|log Q(x^) - log P(x^)|)
  c.sampling.punt_confidence = "max_prob"  # punt: prob | max_prob | margin | neg_entropy
  c.sampling.punt_mode = "sequential" # punt: sequential (1 call per level) | batched (1 call per step)
  c.sampling.eb_gamma = 0.1           # eb: entropy bound (nats); 0 = one token per step
  c.sampling.fast_dllm_threshold = 0.9  # fast_dllm: commit tokens with max-prob >= this (> 1: one by one)
  c.sampling.maskgit_select_temp = 1.0  # maskgit/self_correct: Gumbel noise on the selection (0 = greedy)
  c.sampling.correction_phases = (0.4, 0.6, 0.8)  # self_correct: phase starts, as fractions of T
  c.sampling.correction_caps = (16.0, 8.0, 4.0)   # self_correct: re-masks per step per phase (>= 1 count, < 1 fraction)
  c.sampling.correction_score = "raw" # self_correct: raw (logits at decoded tokens) | probe (extra masked call)
  c.sampling.correction_probe_frac = 0.25  # self_correct, probe: fraction of decoded tokens masked per probe
  c.sampling.remdm_schedule = "cap"   # remdm: cap | rescale | conf | loop
  c.sampling.remdm_eta = -1.0         # remdm: eta; < 0 = the variant's default (cap .008, rescale .015, loop .02)
  c.sampling.remdm_t_on = 0.55        # remdm loop: the refinement phase is t in (t_off, t_on]
  c.sampling.remdm_t_off = 0.05
  c.sampling.remdm_alpha_on = 0.9     # remdm loop: alpha held during the refinement phase

  # ---------------------------------------------------------------- Di[M]O distillation
  # --mode=distill --teacher_workdir=DIR: a one-step generator distilled from a trained
  # diffusion model (mdm_jax/trainers/distill.py, docs/method/algorithms.md §5).  Defaults are
  # the paper's MaskGIT recipe; the image configs override the step count and learning rate
  # for small models.
  c.distill = ml_collections.ConfigDict()
  c.distill.num_steps = 50_000
  c.distill.batch_size = 64
  c.distill.learning_rate = 1e-5      # generator and auxiliary (Adam, constant after warm-up)
  c.distill.aux_learning_rate = -1.0  # < 0 = learning_rate
  c.distill.warmup_steps = 100
  c.distill.b1 = 0.9
  c.distill.b2 = 0.999
  c.distill.grad_clip = 1.0
  c.distill.ema_decay = 0.9999        # EMA of the generator; 0 disables
  c.distill.r_init = 0.6              # token initialisation: fraction of [MASK] in the input
  c.distill.sigma_p = 0.1             # ... and Gaussian perturbation of the input embeddings
  c.distill.mask_ratio = "schedule"   # re-mask ratio: schedule (the teacher's) | arccos | cosine | uniform
  c.distill.beta = 0.0                # 0 = forward KL (paper), 1 = reverse KL, between = Jeffreys mix
  c.distill.gen_temperature = 1.0     # tau_g: generator samples ~ softmax(z / tau_g)
  c.distill.label_smoothing = 0.1     # auxiliary cross-entropy
  c.distill.aux_steps = 1             # auxiliary updates per generator update
  c.distill.frozen_params = ("digit_table", "pos_row", "pos_col", "head_bias", "embed/table")
  c.distill.teacher_use_ema = True    # distil the teacher's EMA parameters
  c.distill.use_ema = True            # sample / evaluate the generator's EMA parameters
  c.distill.log_every = 10
  c.distill.checkpoint_every = 100
  c.distill.num_samples = 64          # PNG grid of one-step samples at the end
  c.distill.seed = 0

  # ---------------------------------------------------------------- Gaussian image diffusion
  # objective = "gaussian" (mdm_jax/tasks/gaussian.py, docs/method/mc_dit.md), model.name = mc_dit.
  c.gaussian = ml_collections.ConfigDict()
  c.gaussian.form = "ddpm"            # ddpm (epsilon-prediction, fixed variance) | edm
  c.gaussian.schedule = "linear"      # ddpm betas: linear (1e-4..0.02) | cosine
  c.gaussian.num_timesteps = 1000
  c.gaussian.edm_p_mean = -1.2        # edm: log sigma ~ N(p_mean, p_std^2) in training
  c.gaussian.edm_p_std = 1.2
  c.gaussian.edm_sigma_data = 0.5
  c.gaussian.edm_sigma_min = 0.002
  c.gaussian.edm_sigma_max = 80.0
  c.gaussian.edm_rho = 7.0            # edm sampler: Karras time steps
  c.gaussian.mask_ratio = 0.5         # mdt / mcdit: K = round(r N) masked patches per image
  c.gaussian.lambda_c = 1.0           # mcdit: L = lambda_g L_G + lambda_c L_C
  c.gaussian.context = "clean"        # mcdit: clean (c2c) | noisy (n2c ablation) | small_t
                                      # (visible patches at t_u ~ U[0, t); needs model.context_time)
  c.gaussian.lambda_g = 1.0           # mcdit: weight of L_G (0 with shared_decoder: "C without G")
  c.gaussian.label_dropout = 0.1      # classifier-free guidance training
  c.gaussian.sampler = "ddim"         # ddim | ddpm (form ddpm) | edm_heun (form edm)
  c.gaussian.ddim_eta = 0.0
  c.gaussian.ddpm_variance = "small"  # small (posterior beta~) | large (beta)
  c.gaussian.guidance = 1.0           # CFG w: 1 = conditional, unguided; 1.5 = guided
  c.gaussian.clip_x0 = True
  c.gaussian.eval_buckets = 8         # held-out L_G at this many fixed noise levels

  # ---------------------------------------------------------------- profiler (docs/outputs.md)
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 0            # trace steps start_step .. start_step+num_steps-1; 0 = off
  c.profile.num_steps = 5             # into WORKDIR/profile (TensorBoard profile plugin / XProf)

  # ---------------------------------------------------------------- experiment tracking
  # metrics.jsonl and TensorBoard (scalars, sample texts and pictures) are always written;
  # wandb is optional: pip install 'mdm_jax[wandb]'.
  c.wandb = ml_collections.ConfigDict()
  c.wandb.enabled = False
  c.wandb.project = "mdm_jax"
  c.wandb.entity = ""                 # "" = your default entity
  c.wandb.name = ""                   # "" = the workdir's name
  c.wandb.mode = "online"             # online | offline (sync later: wandb sync WORKDIR/wandb) | disabled

  # ---------------------------------------------------------------- checkpoints
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500       # also saved at the last step and on SIGTERM (preemption)
  c.checkpoint.max_to_keep = 3        # newest steps kept; each carries checksums of its files
  c.checkpoint.async_save = True      # write in the background while training goes on
  c.checkpoint.check_free_space = True  # refuse a save the disk cannot hold (off for odd mounts)
  c.checkpoint.keep_best = 1          # also keep the N best steps by eval bound (checkpoints_best/); 0 = off
  c.checkpoint.restore = "latest"     # eval/sample modes: latest | best

  # ---------------------------------------------------------------- sharding
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)           # over axes (data, fsdp, tensor); -1 = the rest
  c.mesh.axes = ("data", "fsdp", "tensor")
  # () = JAX's device order.  Else a permutation of range(#devices): the mesh is those
  # devices, in this order, reshaped to mesh.shape (row-major), e.g. to choose which mesh
  # axes cross hosts: with 2 hosts x 2 devices, (0, 2, 3, 1) and shape (1, 2, 2) put both
  # fsdp and tensor across the hosts.
  c.mesh.device_order = ()
  # logical axis name -> mesh axis (or None = replicated); order matters.
  c.mesh.logical_rules = (
      ("batch", ("data", "fsdp")),
      ("length", None),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("vocab", "tensor"),
      ("cond", None),
      ("layers", None),
  )
  return c


def get_config():
  return get_base_config()


def parse_arg(arg: str) -> dict:
  """``"ell=3,tiny"`` -> ``{"ell": "3", "tiny": True}``: the config-file argument after ':'."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    k, _, v = item.partition("=")
    out[k.strip()] = v.strip() if v else True
  return out

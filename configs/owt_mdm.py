"""Masked diffusion (MDM / MDLM ELBO, ell = 1) on OpenWebText: the full-size setup.

GPT-2 tokens (vocab 50,257), 1,024-token packed sequences, DiT-small (12 layers,
d_model 768, 12 heads, ~92 M parameters outside the embedding and the head),
global batch 512, AdamW with linear warm-up then a constant LR, EMA 0.9999,
bfloat16 compute with float32 parameters, FSDP over every device.  This is the
MDLM recipe (Sahoo et al. 2024) that the Prime paper builds on.

1. Prepare the data once (needs the ``datasets`` package and the Hugging Face
   hub, or a local copy; ~9 B tokens, the last 1.25% of the documents, about
   MDLM's 100k, are held out for eval)::

     python -m mdm_jax.main --mode=prepare --config=owt_mdm \\
         --source=hf:Skylion007/openwebtext --output=data/owt_gpt2_1024

   The GPT-2 BPE comes from a local ``gpt2.tiktoken`` (``pip install --no-deps
   openai-whisper`` ships it and it is found automatically; or set
   ``--config.data.gpt2_bpe_path=/path/to/gpt2.tiktoken``).  The prepared
   directory holds its own copy of the tokenizer, so training needs no file.

2. Train (one process per host; on a TPU pod see launch/tpu_pod.sh, on GPUs
   launch/slurm_gpu.sbatch)::

     python -m mdm_jax.main --config=owt_mdm --workdir=runs/owt_mdm \\
         --config.data.path=data/owt_gpt2_1024

Variants (combinable, comma-separated): ``:microbatches=N`` (gradient
accumulation: N microbatches of 512/N sequences; the result is the same
batch-512 step), ``:smoke`` (2 layers x 64 wide, batch 8, 20 steps: checks the
data and the launch on a CPU in a minute).  Any key can be overridden with
``--config.KEY=VALUE``.

Hardware: a v5p-32 / v4-32 pod slice or 8-16 H100s.  1 M steps (512 x 1024 x
1 M = 524 B tokens) is a multi-day run; the eval bound is reported every 10k
steps and checkpoints are written every 5k (re-running the command resumes).
On TPUs, ``--config.model.attention_impl=splash --config.model.remat=dots_attention``
runs the Pallas splash kernel (no [L, L] scores in memory; BENCHMARKS.md); on GPUs,
``--config.model.attention_impl=cudnn``.
"""

from mdm_jax.configs.base import get_base_config, parse_arg  # noqa: F401 (re-exported)

_VARIANTS = ("ell", "microbatches", "smoke")


def set_dit_small(c):
  """DiT-small as in MDLM: 12 x 768, 12 heads, MLP 4x, 128-wide conditioning."""
  c.model.name = "dit"
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.mlp_ratio = 4
  c.model.cond_dim = 128
  c.model.dropout = 0.1
  c.model.time_conditioning = False   # MDLM: time-agnostic network
  c.model.gate_init = 0.0             # adaLN-Zero
  c.model.dtype = "bfloat16"          # compute; parameters, optimizer, EMA and losses stay f32
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  # Scanned blocks keep every matmul output and recompute the elementwise work: no extra
  # FLOPs, and the memory of unrolled layers (owt_mdm on v5p, 8 sequences per chip: 10.9
  # GiB of temporaries against 18.8 with remat "none"; BENCHMARKS.md).  Where activations
  # still do not fit: "dots_attention" (5.6 GiB, 1.03x the FLOPs) or "full" (2.8, 1.25x).
  c.model.remat = "matmuls"
  c.model.loss_chunk = 128            # head + loss 128 positions at a time: no [B, L, V] logits
  c.model.vocab_multiple = 128        # 50,257 -> 50,304 head columns (x the tensor-axis size
                                      # to shard the head over it)
  return c


def set_large_training(c, *, num_steps: int):
  c.training.batch_size = 512         # global: sequences per optimizer step, over all hosts
  c.training.num_microbatches = 1
  c.training.num_steps = num_steps
  c.training.learning_rate = 3e-4
  c.training.lr_schedule = "constant"
  c.training.warmup_steps = 2500
  c.training.weight_decay = 0.0       # AdamW (decoupled); MDLM trains with 0
  c.training.b1 = 0.9
  c.training.b2 = 0.999
  c.training.grad_clip = 1.0
  c.training.ema_decay = 0.9999
  c.training.log_every = 100
  c.eval.every_steps = 10_000
  c.eval.batch_size = 512
  c.eval.num_batches = 16
  c.eval.num_time_samples = 4
  c.eval.use_ema = True
  c.sampling.num_steps = 1000
  c.sampling.num_samples = 8
  c.sampling.every_steps = 50_000
  c.checkpoint.every_steps = 5000
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True
  # FSDP over all devices (parameters, optimizer state and the batch are sharded);
  # e.g. (2, -1, 1) for 2-way data parallelism across slices.
  c.mesh.shape = (1, -1, 1)
  c.schedule.name = "loglinear"       # MDLM's: alpha(t) = (1 - t)(1 + eps t) ~ 1 - (1 - eps) t
  c.schedule.eps = 1e-3
  return c


def apply_variants(c, arg: str, allowed=_VARIANTS):
  opts = parse_arg(arg)
  unknown = set(opts) - set(allowed)
  if unknown:
    raise ValueError(f"Unknown config variant(s) {sorted(unknown)}; valid: {sorted(allowed)} "
                     "(ell=N, microbatches=N, smoke).")
  if "ell" in opts:
    c.prime.ell = int(opts["ell"])
  if "microbatches" in opts:
    c.training.num_microbatches = int(opts["microbatches"])
  if opts.get("smoke"):
    c.model.num_layers, c.model.d_model, c.model.num_heads = 2, 64, 2
    c.model.dtype = "float32"
    c.training.batch_size = 8
    c.training.num_microbatches = 1
    c.training.num_steps = 20
    c.training.warmup_steps = 5
    c.training.log_every = 5
    c.eval.every_steps = 20
    c.eval.batch_size = 8
    c.eval.num_batches = 1
    c.eval.num_time_samples = 1
    c.checkpoint.every_steps = 20
    c.sampling.num_steps = 8
    c.sampling.num_samples = 2
    c.sampling.every_steps = 0
    c.mesh.shape = (-1, 1, 1)
  return c


def get_owt_base():
  c = get_base_config()
  c.data.dataset = "array_record"
  c.data.path = "data/owt_gpt2_1024"   # written by --mode=prepare (see the docstring)
  c.data.tokenizer = "gpt2"
  c.data.gpt2_bpe_path = ""            # "" = openai-whisper's gpt2.tiktoken; or a path
  c.data.seq_len = 1024
  c.data.eval_fraction = 0.0125        # prepare: documents held out (MDLM: the last 100k)
  set_dit_small(c)
  set_large_training(c, num_steps=1_000_000)
  return c


def get_config(arg: str = ""):
  c = get_owt_base()
  c.objective = "diffusion"
  c.prime.ell = 1
  return apply_variants(c, arg, allowed=("microbatches", "smoke"))

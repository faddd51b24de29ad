"""Masked diffusion (MDM / MDLM ELBO, ell = 1) on LM1B (One Billion Words): full size.

The papers' LM1B setup (MDLM, and Prime after it): 128-token sequences,
DiT-small (12 x 768, 12 heads), global batch 512, AdamW with warm-up and a
constant LR, EMA 0.9999, bfloat16 compute, FSDP; 1 M steps (~65 B tokens).

**Tokenizer: not bert-base-uncased.**  The papers use BERT's uncased WordPiece
(30,522 ids).  Its vocabulary is not available offline here, so this config uses
what mdm_jax has: a byte-level BPE of 32,768 ids trained by ``--mode=prepare``
on the first 20 M characters of the LM1B training text (cased, lossless).  Its
size is close to BERT's, and 32,768 = 2**15 gives Prime exact digit bases
(ell = 3: b = 32; ell = 5: b = 8).  Likelihoods are therefore per BPE token and
not directly comparable with the papers' per-WordPiece numbers.  Sentences are
packed into 128-token rows (MDLM's "wrap" setting), not padded one per row.

1. Prepare once (TFDS ``lm1b`` in the array_record format; ``--tfds_download``
   needs the internet; the test split is the eval set)::

     python -m mdm_jax.main --mode=prepare --config=lm1b_mdm \\
         --source=tfds:lm1b --eval_split=test --tfds_download --output=data/lm1b_bpe32k_128

2. Train::

     python -m mdm_jax.main --config=lm1b_mdm --workdir=runs/lm1b_mdm \\
         --config.data.path=data/lm1b_bpe32k_128

Variants: ``:microbatches=N``, ``:smoke`` (see configs/owt_mdm.py).
"""

from mdm_jax.configs.base import get_base_config
from mdm_jax.configs.owt_mdm import apply_variants, set_dit_small, set_large_training


def get_lm1b_base():
  c = get_base_config()
  c.data.dataset = "array_record"
  c.data.path = "data/lm1b_bpe32k_128"   # written by --mode=prepare (see the docstring)
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 32768
  c.data.seq_len = 128
  c.data.eval_fraction = 0.01            # only used when no --eval_split is given to prepare
  set_dit_small(c)
  c.model.loss_chunk = 32                # 4 slices of the 128 positions
  set_large_training(c, num_steps=1_000_000)
  c.eval.num_batches = 64                # 64 x 512 x 128 = 4.2 M tokens
  c.sampling.num_steps = 128
  c.sampling.num_samples = 16
  return c


def get_config(arg: str = ""):
  c = get_lm1b_base()
  c.objective = "diffusion"
  c.prime.ell = 1
  return apply_variants(c, arg, allowed=("microbatches", "smoke"))

#!/usr/bin/env bash
# The Fashion-MNIST comparison of docs/results/mc_dit.md: three arms at equal steps (N) and DiT at 2N
# (equal FLOPs: the mdt and mcdit arms cost ~2x a DiT step), each followed by its evaluation
# (held-out denoising loss by noise level + Frechet distance on the project's own classifier),
# then XLA's FLOPs per train step.  Run from the repo root:
#   bash docs/mc_dit/run_comparison.sh N NSAMPLES     (the docs used N=150, NSAMPLES=200)
set -euo pipefail
N=${1:-150}
NS=${2:-200}
source "$(dirname "$0")/common.sh"
train_eval dit arm=dit $N
train_eval mdt arm=mdt $N
train_eval mcdit arm=mcdit $N
# DiT at 2N = resume a copy of the N-step run (constant LR after warm-up: the same as one run)
rm -rf $R/fm_dit_2x && cp -r $R/fm_dit $R/fm_dit_2x && rm -f $R/fm_dit_2x/gaussian_eval_step_*.json
train_eval dit_2x arm=dit $((2 * N))
for arm in dit mdt mcdit; do
  .venv/bin/python -m mdm_jax.cli.eval_gaussian --mode=flops --config=$CFG:arm=$arm \
    --config.training.batch_size=32 > $R/flops_$arm.json 2> $R/flops_$arm.log
done

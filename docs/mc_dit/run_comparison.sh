#!/usr/bin/env bash
# The Fashion-MNIST comparison of docs/mc_dit.md: three arms at equal steps (N) and DiT at 2N
# (equal FLOPs: the mdt and mcdit arms cost ~2x a DiT step), each followed by its evaluation
# (held-out denoising loss by noise level + Frechet distance on the project's own classifier),
# then XLA's FLOPs per train step.  Run from the repo root:
#   bash docs/mc_dit/run_comparison.sh N NSAMPLES     (the docs used N=150, NSAMPLES=200)
set -euo pipefail
N=${1:-150}
NS=${2:-200}
R=runs/mcdit
CFG=configs/fashion_mnist_mcdit.py
CLF=${CLF:-runs/img/fmnist_classifier}
COMMON="--config.training.batch_size=32 --config.training.learning_rate=1e-3 \
 --config.training.warmup_steps=50 --config.training.ema_decay=0.98 \
 --config.eval.every_steps=$N --config.checkpoint.every_steps=$N --config.checkpoint.keep_best=0 \
 --config.sampling.num_steps=25 --config.training.log_every=25"
EVAL="--classifier_path=$CLF --num_samples=$NS --sample_batch=100 --sample_steps=25 \
 --guidance=1.0 --config.eval.batch_size=64 --config.eval.num_batches=4"
mkdir -p $R
train_eval() {  # run arm steps [copy_from]
  local run=$1 arm=$2 steps=$3
  /usr/bin/time -f "wall_s %e user_s %U" .venv/bin/python -m mdm_jax.main \
    --config=$CFG:arm=$arm --workdir=$R/fm_$run --config.training.num_steps=$steps $COMMON \
    > $R/fm_$run.log 2>&1
  .venv/bin/python -m mdm_jax.eval_gaussian --config=$CFG:arm=$arm --workdir=$R/fm_$run $EVAL \
    > $R/eval_$run.json 2> $R/eval_$run.log
}
train_eval dit dit $N
train_eval mdt mdt $N
train_eval mcdit mcdit $N
# DiT at 2N = resume a copy of the N-step run (constant LR after warm-up: the same as one run)
rm -rf $R/fm_dit_2x && cp -r $R/fm_dit $R/fm_dit_2x && rm -f $R/fm_dit_2x/gaussian_eval_step_*.json
train_eval dit_2x dit $((2 * N))
for arm in dit mdt mcdit; do
  .venv/bin/python -m mdm_jax.eval_gaussian --mode=flops --config=$CFG:arm=$arm \
    --config.training.batch_size=32 > $R/flops_$arm.json 2> $R/flops_$arm.log
done

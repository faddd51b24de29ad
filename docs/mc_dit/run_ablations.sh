#!/usr/bin/env bash
# The MC-DiT ablations of docs/mc_dit.md (mc_dit.md §5), with the same recipe as
# run_comparison.sh (N steps, batch 32), then the branch-C probes of every run with a clean
# branch (context probe = D_c's inpainting MSE; collapse probe = ||ΔX̂0|| / ||Δinput|| when the
# masked patches' noise is redrawn).  Run from the repo root after run_comparison.sh:
#   bash docs/mc_dit/run_ablations.sh N NSAMPLES     (the docs used N=150, NSAMPLES=200)
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
train_eval() {  # run variant
  local run=$1 var=$2
  /usr/bin/time -f "wall_s %e user_s %U" .venv/bin/python -m mdm_jax.main \
    --config=$CFG:$var --workdir=$R/fm_$run --config.training.num_steps=$N $COMMON \
    > $R/fm_$run.log 2>&1
  .venv/bin/python -m mdm_jax.eval_gaussian --config=$CFG:$var --workdir=$R/fm_$run $EVAL \
    > $R/eval_$run.json 2> $R/eval_$run.log
}
probes() {  # run variant
  .venv/bin/python -m mdm_jax.eval_gaussian --mode=probes --config=$CFG:$2 --workdir=$R/fm_$1 \
    --config.eval.batch_size=64 --config.eval.num_batches=4 > $R/probes_$1.json 2> $R/probes_$1.log
}
train_eval c_only arm=mcdit,c_only          # C without G on one decoder (the collapse ablation)
train_eval context_t arm=mcdit,context_t    # visible patches at a small t_u < t
train_eval n2c arm=mcdit,n2c                # noisy-to-clean: visible patches at t
probes mcdit arm=mcdit
probes c_only arm=mcdit,c_only
probes context_t arm=mcdit,context_t
probes n2c arm=mcdit,n2c

#!/usr/bin/env bash
# Train mdm_jax on a Cloud TPU pod slice (v5p-32, v4-32, ...): every worker VM of the
# slice runs the same `python -m mdm_jax.main` command at the same time, and JAX joins
# them into one job (mdm_jax/core/distributed.py calls jax.distributed.initialize()).
#
#   bash launch/tpu_pod.sh create   # create the TPU VM slice
#   bash launch/tpu_pod.sh setup    # copy this checkout to every worker, build .venv, mount the bucket
#   bash launch/tpu_pod.sh train    # start training on all workers at once (same command everywhere)
#   bash launch/tpu_pod.sh logs     # copy each worker's log and the run's metrics/samples back here
#   bash launch/tpu_pod.sh delete   # delete the slice (the bucket keeps data and checkpoints)
#   bash launch/tpu_pod.sh stop     # stop a detached training run (DETACH=1) on all workers
#   bash launch/tpu_pod.sh ssh      # shell on worker $WORKER (default 0)
#
# DRY_RUN=1 prints every command instead of running it.  Settings are environment
# variables (defaults below), e.g.
#   TPU_NAME=prime-l4 ZONE=us-east5-a ACCELERATOR=v5p-32 BUCKET=gs://my-bucket \
#   CONFIG=owt_prime:ell=4 bash launch/tpu_pod.sh train
#
# Storage: checkpoints must be visible to every worker (each host writes its shards and
# process 0 commits them), so WORKDIR lives on a Cloud Storage bucket mounted with
# gcsfuse at the same path ($MOUNT) on all workers; the prepared dataset
# (python -m mdm_jax.main --mode=prepare ...) is read from the same bucket.  Upload it
# once with e.g. `gcloud storage cp -r data/owt_gpt2_1024 $BUCKET/data/`.
set -euo pipefail

# ------------------------------------------------------------------ settings
TPU_NAME="${TPU_NAME:-mdm-jax}"
ZONE="${ZONE:-us-east5-a}"                    # v5p: us-east5-a; v4: us-central2-b
PROJECT="${PROJECT:-}"                        # empty = gcloud's default project
ACCELERATOR="${ACCELERATOR:-v5p-32}"          # v5p-32 / v4-32 = 16 chips on 4 worker VMs
case "$ACCELERATOR" in                        # TPU VM software version for the accelerator
  v5p-*)      DEFAULT_VERSION=v2-alpha-tpuv5 ;;
  v5litepod-*) DEFAULT_VERSION=v2-alpha-tpuv5-lite ;;
  v6e-*)      DEFAULT_VERSION=v2-alpha-tpuv6e ;;
  *)          DEFAULT_VERSION=tpu-ubuntu2204-base ;;
esac
VERSION="${VERSION:-$DEFAULT_VERSION}"
SPOT="${SPOT:-0}"                             # 1 = spot capacity (preemptible; resume by re-running train)
BUCKET="${BUCKET:-gs://YOUR_BUCKET}"          # holds data/ and runs/
MOUNT="${MOUNT:-/mnt/gcs}"                    # where BUCKET is mounted on every worker
REMOTE_DIR="${REMOTE_DIR:-mdm_jax}"           # checkout location on the workers (under ~)
SYNC="${SYNC:-copy}"                          # copy = this working tree; git = clone REPO_URL@GIT_REF
REPO_URL="${REPO_URL:-}"
GIT_REF="${GIT_REF:-main}"
PYTHON="${PYTHON:-python3.11}"                # jax 0.10+ needs Python >= 3.11
JAX_SPEC="${JAX_SPEC:-jax[tpu]>=0.10.2,<0.13}"
CONFIG="${CONFIG:-owt_prime:ell=4}"
_cfg="${CONFIG##*/}"; _cfg="${_cfg/.py/}"
RUN_NAME="${RUN_NAME:-$(echo "$_cfg" | tr ':=,' '___')}"
WORKDIR="${WORKDIR:-$MOUNT/runs/$RUN_NAME}"
DATA_PATH="${DATA_PATH:-$MOUNT/data/owt_gpt2_1024}"
EXTRA_ARGS="${EXTRA_ARGS:-}"                  # more flags for mdm_jax.main, e.g. --config.training.num_steps=1000
DETACH="${DETACH:-0}"                         # 1 = nohup on the workers and return at once
LOG_DIR="${LOG_DIR:-tpu_logs/$RUN_NAME}"      # local destination of `logs`
WORKER="${WORKER:-0}"
DRY_RUN="${DRY_RUN:-0}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_LOG="mdm_jax_train.log"                # per worker, in ~ on the worker

# ------------------------------------------------------------------ helpers
quote() {   # one word, single-quoted only when the shell needs it
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

run() {   # run a command, or print it (copy-pasteable) when DRY_RUN=1
  if [[ "$DRY_RUN" == 1 ]]; then
    local first=1 a
    for a in "$@"; do
      [[ $first == 1 ]] || printf ' '
      quote "$a"
      first=0
    done
    echo
  else
    "$@"
  fi
}

gcloud_tpu() {   # gcloud compute tpus tpu-vm SUBCOMMAND ... with zone and project
  local sub="$1"; shift
  local extra=(--zone="$ZONE")
  [[ -n "$PROJECT" ]] && extra+=(--project="$PROJECT")
  run gcloud compute tpus tpu-vm "$sub" "$@" "${extra[@]}"
}

on_all() {   # run a shell command on every worker of the slice at the same time
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

num_workers() {
  if [[ "$DRY_RUN" == 1 ]]; then   # 4 chips per worker VM; v4/v5p name TensorCores (2 per chip)
    local n="${ACCELERATOR##*-}"
    case "$ACCELERATOR" in v4-*|v5p-*) n=$((n / 2)) ;; esac
    echo $(( n / 4 > 0 ? n / 4 : 1 ))
    return
  fi
  local extra=(--zone="$ZONE")
  [[ -n "$PROJECT" ]] && extra+=(--project="$PROJECT")
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${extra[@]}" \
      --format='value(networkEndpoints[].ipAddress)' | tr ';,' '\n\n' | grep -c .
}

# ------------------------------------------------------------------ subcommands
cmd_create() {
  local args=("$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION")
  [[ "$SPOT" == 1 ]] && args+=(--spot)
  gcloud_tpu create "${args[@]}"
}

cmd_setup() {
  local fetch
  if [[ "$SYNC" == git ]]; then
    [[ -n "$REPO_URL" ]] || { echo "SYNC=git needs REPO_URL=..." >&2; exit 2; }
    fetch="if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR fetch --quiet origin; \
else git clone --quiet $REPO_URL ~/$REMOTE_DIR; fi && git -C ~/$REMOTE_DIR checkout --quiet $GIT_REF"
  else
    # This working tree (tracked + untracked, not ignored files), as one tarball per worker.
    local tarball=/tmp/mdm_jax_src.tgz
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "git -C $(printf '%q' "$ROOT") ls-files -z -co --exclude-standard | tar -C $(printf '%q' "$ROOT") -czf $tarball --null -T -"
    else
      git -C "$ROOT" ls-files -z -co --exclude-standard | tar -C "$ROOT" -czf "$tarball" --null -T -
    fi
    gcloud_tpu scp "$tarball" "$TPU_NAME":/tmp/mdm_jax_src.tgz --worker=all
    fetch="mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/mdm_jax_src.tgz -C ~/$REMOTE_DIR"
  fi
  local bucket_name="${BUCKET#gs://}"
  on_all "set -e; $fetch
command -v $PYTHON >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq ${PYTHON}-venv ${PYTHON}; }
command -v gcsfuse >/dev/null || { \
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; }
sudo mkdir -p $MOUNT && sudo chown \$(id -u):\$(id -g) $MOUNT
mountpoint -q $MOUNT || gcsfuse --implicit-dirs $bucket_name $MOUNT
cd ~/$REMOTE_DIR && { [ -x .venv/bin/python ] || $PYTHON -m venv .venv; }
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e . '$JAX_SPEC'
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
}

train_command() {   # the command every worker runs (identical on all of them)
  local py="cd ~/$REMOTE_DIR && MDM_JAX_DISTRIBUTED=1 .venv/bin/python -m mdm_jax.main \
--config=$CONFIG --workdir=$WORKDIR --config.data.path=$DATA_PATH $EXTRA_ARGS"
  if [[ "$DETACH" == 1 ]]; then
    echo "$py > ~/$REMOTE_LOG 2>&1 < /dev/null & echo \$! > ~/mdm_jax_train.pid; echo started \$(hostname)"
  else
    echo "set -o pipefail; $py 2>&1 | tee ~/$REMOTE_LOG"
  fi
}

cmd_train() {
  on_all "$(train_command)"
}

cmd_stop() {
  on_all "[ -f ~/mdm_jax_train.pid ] && kill \$(cat ~/mdm_jax_train.pid) && rm ~/mdm_jax_train.pid || true"
}

cmd_logs() {
  local n i
  n="$(num_workers)"
  run mkdir -p "$LOG_DIR"
  for ((i = 0; i < n; i++)); do
    gcloud_tpu scp "$TPU_NAME:$REMOTE_LOG" "$LOG_DIR/worker_$i.log" --worker="$i"
  done
  # Process 0 wrote metrics.jsonl, final_metrics.json, config.json, samples/ and
  # tensorboard/ into WORKDIR; bring those back without the checkpoints.
  gcloud_tpu ssh "$TPU_NAME" --worker=0 \
      --command="tar -C $WORKDIR --exclude=./checkpoints --exclude=./tokenizer -czf /tmp/mdm_jax_run.tgz ."
  gcloud_tpu scp "$TPU_NAME:/tmp/mdm_jax_run.tgz" "$LOG_DIR/run.tgz" --worker=0
  run tar -xzf "$LOG_DIR/run.tgz" -C "$LOG_DIR"
  echo "logs and metrics in $LOG_DIR" >&2
}

cmd_delete() {
  gcloud_tpu delete "$TPU_NAME" --quiet
}

cmd_ssh() {
  gcloud_tpu ssh "$TPU_NAME" --worker="$WORKER"
}

usage() {
  echo "usage: [VAR=value ...] bash launch/tpu_pod.sh create|setup|train|logs|delete|stop|ssh" >&2
  echo "       (DRY_RUN=1 prints the commands; settings are at the top of this file)" >&2
}

case "${1:-}" in
  create) cmd_create ;;
  setup)  cmd_setup ;;
  train)  cmd_train ;;
  logs)   cmd_logs ;;
  delete) cmd_delete ;;
  stop)   cmd_stop ;;
  ssh)    cmd_ssh ;;
  -h|--help|help) usage ;;
  *) usage; exit 2 ;;
esac

#!/usr/bin/env bash
# The GPU path, checked and measured in one command (docs/BENCHMARKS.md#the-gpu-path):
#   bash benchmarks/gpu_check.sh OUT            # on one H100/H200: within 9 minutes (DEADLINE_S, below)
#   bash benchmarks/gpu_check.sh OUT --dry-run  # the same stages on a CPU at smoke sizes (tests/test_gpu_check.py)
# Stages, in the order they run (what the next device run owes first), everything written to OUT (at most 8 files):
#   cuda-tests: the CUDA tests (bf16 numerics, SDPA kernels, no host-device sync in a step, fused AdamW, real runs);
#   sweep: the image budget sweep of the `gpu` preset end to end (shortened: 16 train-seconds at the full budget,
#      points at 0.25, 0.5 and 1, no anytime points): tables (runs, evals, training progress), figures, report;
#   compile: data2vec 2.0 image eager at larger per-GPU batches, eager at the paper's (its teacher from bf16
#      weights, and casting its fp32 weights at every forward), with its whole model compiled, and replayed as
#      CUDA graphs (reduce-overhead): rows in bench.json;
#   fairseq: our data2vec 2.0 step against fairseq's (bench_vs_fairseq.py) at base size in bf16, every modality,
#      each side in its own mixed precision, the table in log.txt; only with a fairseq checkout ($D2V2_FAIRSEQ, or
#      the one offline_bundle.sh put in .gpu/);
#   bench: bench_step.py at base size, bf16, every method (FLOPs/update, MFU, peak memory, kernels/step);
#   runner: the runner against the bare step (bench_runner.py) on the gpu preset's data2vec 2.0 image run.
# Each stage runs under its own time limit, and the whole script under DEADLINE_S seconds (default 540 on a
# GPU, none in a dry run; 0: none): a stage gets at most what is left, and one that would get less than it needs
# is skipped, the log's last line naming the skipped ones as a STAGES=... for a second call. A stage that fails
# is reported in OUT/log.txt and the next one still runs; the exit status is the number of failed stages.
# STAGES="bench runner" runs only those stages (default: all six). Python packages missing on the machine are
# installed from .gpu/whl (wheels) if present, Fashion-MNIST is read from .gpu/fashion-mnist if the Debian package
# is not installed, and fairseq is unpacked from .gpu/fairseq.tar.gz (all made by benchmarks/offline_bundle.sh).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT [--dry-run]}
DRY=${2:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/log.txt"
WORK=$(mktemp -d)                  # the sweep's runs (gigabytes of checkpoints), gone at exit
trap 'rm -rf "$WORK"' EXIT
cd "$REPO"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
failed=0
deferred=()
STAGES=${STAGES:-cuda-tests sweep compile fairseq bench runner}
# the least time a stage needs to return something (a stage given less is skipped, not started)
declare -A NEEDS=([cuda-tests]=60 [sweep]=240 [compile]=150 [fairseq]=90 [bench]=90 [runner]=45)
MARGIN_S=15                        # after the last stage: the compile rows merged, the work folder removed
stage() {   # stage NAME SECONDS COMMAND...: run it with a time limit, log its output, count a failure
  local name=$1 limit=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) say "stage $name: skipped (STAGES=$STAGES)"; return ;; esac
  if [ "$DEADLINE_S" -gt 0 ]; then            # SECONDS: since the script started
    local left=$((DEADLINE_S - MARGIN_S - SECONDS))
    if [ "$left" -lt "${NEEDS[$name]}" ]; then
      say "stage $name: skipped (deadline: $left s left of DEADLINE_S=$DEADLINE_S, it needs ${NEEDS[$name]})"
      deferred+=("$name")
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  say "stage $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  say "stage $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

# ---- the environment
if ! python3 -c "import pydantic, snakemake, jsonschema, omegaconf, hydra, bitarray, timm" 2>/dev/null && [ -d .gpu/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .gpu/whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
if ! command -v python >/dev/null; then          # the workflow's rules call `python`
  mkdir -p "$WORK/bin" && ln -s "$(command -v python3)" "$WORK/bin/python" && export PATH="$WORK/bin:$PATH"
fi
FMNIST=/usr/share/datasets/fashion-mnist
[ -d "$FMNIST" ] || FMNIST="$REPO/.gpu/fashion-mnist"
FAIRSEQ=${D2V2_FAIRSEQ:-}
if [ -z "$FAIRSEQ" ] && [ -f .gpu/fairseq.tar.gz ]; then
  mkdir -p "$WORK/fairseq" && tar xzf .gpu/fairseq.tar.gz -C "$WORK/fairseq" && FAIRSEQ="$WORK/fairseq"
fi
{
  echo "host $(hostname); $(date -u)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  python3 -c "import numpy, pandas, pydantic, snakemake, matplotlib; print('numpy', numpy.__version__, 'pandas', pandas.__version__, 'pydantic', pydantic.__version__, 'snakemake', snakemake.__version__, 'matplotlib', matplotlib.__version__)"
  echo "git $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
} >>"$LOG" 2>&1

if [ "$DRY" = "--dry-run" ]; then
  BENCH=(--presets smoke --device cpu --steps 2 --warmup 1)
  SWEEP=(preset=gpu "methods={image: [data2vec2, mae]}" "launcher={pretrain_threads: 1, finetune_threads: 1}"
         "budget={image: {kind: train_seconds, value: 4}}" "budget_sweep={image: [0.5, 1.0]}"
         "checkpoint_fractions=[1.0]" "pretrain={common: {device: cpu, precision: fp32}, image: {batch_size: 8}}"
         "finetune={common: {device: cpu}, image: {budget: {value: 3}, eval_max_samples: 200}}"
         "data={root: $REPO/data, num_workers: 1, image: {fmnist_source: $FMNIST}}")
  RUNNER=(--preset smoke --device cpu --updates 4 --warmup 2 --repeats 1 --batch-size 8)
  VS_FAIRSEQ=(--dry-run --dtype bf16)
  SCAN_BATCHES=(4 8)
  declare -A LIMIT=([cuda-tests]=300 [sweep]=900 [compile]=300 [fairseq]=600 [bench]=300 [runner]=300)
  DEADLINE_S=${DEADLINE_S:-0}
  GRAPH_MODES=()
  FT_CORES=2
else
  BENCH=(--presets base --device cuda --dtype bf16 --steps 10 --warmup 3)
  SWEEP=(preset=gpu "budget={image: {kind: train_seconds, value: 16}}" "budget_sweep={image: [0.25, 0.5, 1.0]}"
         "checkpoint_fractions=[1.0]" "data={root: $WORK/data, image: {fmnist_source: $FMNIST}}")
  RUNNER=(--preset gpu --device cuda --precision bf16 --updates 40 --warmup 5 --repeats 2)
  VS_FAIRSEQ=(--device cuda --threads 0 --presets base --dtype bf16 --steps 10 --repeats 3 --warmup 3)
  SCAN_BATCHES=(32 64)              # the paper's per-GPU 16 in bench and compile; 64 about 33 GB at its peak
  declare -A LIMIT=([cuda-tests]=160 [sweep]=340 [compile]=300 [fairseq]=150 [bench]=130 [runner]=70)
  DEADLINE_S=${DEADLINE_S:-540}
  GRAPH_MODES=(reduce-overhead)
  FT_CORES=16
fi

# ---- the CUDA tests (they skip on a CPU)
stage cuda-tests "${LIMIT[cuda-tests]}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py

# ---- the gpu preset's image budget sweep, end to end: the pretraining runs one at a time (--cores 2, so
# each train-only clock measures one job on the whole GPU), then the fine-tunes side by side (their time
# is not compared)
CFG=$(printf '%q ' "${SWEEP[@]}")
stage sweep "${LIMIT[sweep]}" bash -c "python3 -m snakemake -d '$WORK/wf' --cores 2 --scheduler greedy \
  --until pretrain --config $CFG && python3 -m snakemake -d '$WORK/wf' --cores $FT_CORES --scheduler greedy --config $CFG"
# progress.csv: every run's loss and collapse diagnostics (target_var, pred_var, target_pos_share) at each logging
# interval, what a failed sweep is read from (docs/BENCHMARKS.md#the-gpu-preset-replayed-on-a-cpu); the anytime
# curve is left out: with checkpoint_fractions [1.0] it holds only the sweep curve's last points
if [ -d "$WORK/wf" ]; then
  for f in results/report.md results/tables/evals.csv results/tables/runs.csv results/tables/progress.csv \
           results/figures/speedups.png results/figures/curves_image_fmnist_sweep.png; do
    if [ -f "$WORK/wf/$f" ]; then cp "$WORK/wf/$f" "$OUT/"; else say "missing: $f"; fi
  done
  [ -f "$WORK/wf/results/report.md" ] || tail -n 40 "$WORK"/wf/logs/*/*/*/*/*.log "$WORK"/wf/logs/*.log >>"$LOG" 2>/dev/null
fi

# ---- data2vec 2.0 image at base size eager at SCAN_BATCHES (does a larger per-GPU batch leave the host behind?);
# eager at the paper's batch with and without the teacher's autocast copy (d2v2.model.ema) and with its whole model
# compiled; then in each of GRAPH_MODES (CUDA graphs), a fresh process per compiled row; the rows join bench.json
D2V2_IMAGE="${BENCH[*]} --modalities image --methods data2vec2"
stage compile "${LIMIT[compile]}" bash -c "python3 benchmarks/bench_step.py $D2V2_IMAGE --batch-size ${SCAN_BATCHES[*]} \
  --json '$WORK/rows-batches.json' && python3 benchmarks/bench_step.py $D2V2_IMAGE --compile off model \
  --teacher-copy on off --json '$WORK/rows-default.json' && for mode in ${GRAPH_MODES[*]}; do \
  python3 benchmarks/bench_step.py $D2V2_IMAGE --compile model --compile-mode \$mode --json '$WORK/rows-'\$mode.json \
  || exit 1; done"

# ---- our step against fairseq's, the paper's per-GPU batches, each side in its own bf16 (its table goes to the log)
if [ -n "$FAIRSEQ" ]; then
  stage fairseq "${LIMIT[fairseq]}" python3 benchmarks/bench_vs_fairseq.py --fairseq "$FAIRSEQ" "${VS_FAIRSEQ[@]}"
else
  say "stage fairseq: skipped (no fairseq checkout: set D2V2_FAIRSEQ, or bundle one with offline_bundle.sh)"
fi

# ---- every method's step at base size, eager
stage bench "${LIMIT[bench]}" python3 benchmarks/bench_step.py "${BENCH[@]}" --json "$OUT/bench.json"

# ---- the runner's overhead over the bare step
stage runner "${LIMIT[runner]}" bash -c "python3 -m d2v2 prepare-data --root '$REPO/data' --modalities image \
  image.fmnist_source='$FMNIST' && python3 benchmarks/bench_runner.py ${RUNNER[*]} --data-root '$REPO/data'"

ls "$WORK"/rows-*.json >/dev/null 2>&1 && python3 - "$OUT/bench.json" "$WORK"/rows-*.json <<'EOF' 2>>"$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = json.loads(out.read_text()) if out.is_file() else {"rows": []}
for extra in sys.argv[2:]:
    rows["rows"] += json.loads(Path(extra).read_text())["rows"]
out.write_text(json.dumps(rows, indent=1))
EOF
[ "${#deferred[@]}" -eq 0 ] || say "left for a second call: STAGES=\"${deferred[*]}\""
say "done: $failed failed stage(s) in $SECONDS s"
exit "$failed"

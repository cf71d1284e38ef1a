#!/usr/bin/env bash
# The README's GPU figures in one go: the card, the matmul ceiling, the records' times to 99.0% (training only and
# on the bench's cold clock), host-to-device copies per training epoch, CUDA graphs (torch.compile reduce-overhead)
# against eager, and the whole process timed from outside (imports, CUDA start-up, data and compilation included).
# Each step is its own bench process with its own time limit; a step that fails or runs out leaves the others.
#
#   MNIST_ROOT=/path/to/data scripts/gpu_bench.sh OUTDIR      # about 5 minutes on an H100
#   STEPS="cold records" MNIST_ROOT=/path/to/data scripts/gpu_bench.sh OUTDIR     # only those steps
#   BENCH_EXTRA='--quick trainer.device=cpu' MNIST_ROOT=tiny scripts/gpu_bench.sh /tmp/x   # a dry run of the script
#
# Writes OUTDIR/summary.md (every step's table, its command and its wall time), OUTDIR/results.tar.gz (every
# step's results.json and results.md) and OUTDIR/gpu.txt.
set -uo pipefail
out=${1:?usage: scripts/gpu_bench.sh OUTDIR}
py=${PYTHON:-python3}
work=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv \
  | tee "$out/gpu.txt"
"$py" -c "import sys, torch, hydra, omegaconf; print('python', sys.version.split()[0], 'torch', torch.__version__,
          'hydra', hydra.__version__, 'omegaconf', omegaconf.__version__, torch.cuda.get_device_name())" \
  | tee -a "$out/gpu.txt"

step() {  # step NAME LIMIT_S BENCH_ARGS...: one bench process, timed from outside
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local t0 t1 rc
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086  # BENCH_EXTRA is a list of words
  timeout "$limit" "$py" -m mnist_sweep.bench --out "$work/$name" "$@" data.download=false ${BENCH_EXTRA:-}
  rc=$?
  t1=$(date +%s.%N)
  {
    printf '\n## %s: exit %s, whole process %s s\n\n`python -m mnist_sweep.bench %s`\n\n' "$name" "$rc" \
      "$("$py" -c "print(f'{$t1 - $t0:.2f}')")" "$*"
    cat "$work/$name/results.md" 2>/dev/null
  } >>"$out/summary.md"
  tar -czf "$out/results.tar.gz" -C "$work" .
  echo "== $name: exit $rc after $("$py" -c "print(f'{$t1 - $t0:.1f}')") s"
}

eager=(trainer.compile=false)  # speedrun_gpu without its CUDA graphs
# Every step unless STEPS names some, e.g. STEPS="cold records".
want() { [[ -z ${STEPS:-} || " $STEPS " == *" $1 "* ]]; }
# the whole process to 99.0%, first on the machine (an empty inductor cache): one seed, stopped at the target
want cold && step cold 100 --recipes speedrun_gpu --seeds 1 --stop-at-target --ceiling-seconds 0
# the records: 3 seeds of each speed record, the ceiling, the copy count
want records && step records 150 --recipes speedrun_gpu,speedrun --seeds 3 --count-copies --ceiling-seconds 2
want eager_cold && step eager_cold 60 --recipes speedrun_gpu --seeds 1 --stop-at-target --ceiling-seconds 0 \
  "${eager[@]}"
want eager && step eager 60 --recipes speedrun_gpu --seeds 3 --count-copies --ceiling-seconds 0 "${eager[@]}"
want accuracy && step accuracy 90 --recipes accuracy --seeds 1 --count-copies --ceiling-seconds 0
# larger and smaller batches, eager; torch.compile without CUDA graphs
want batch2000 && step batch2000 60 --recipes speedrun_gpu --seeds 3 --ceiling-seconds 0 "${eager[@]}" \
  data.batch_size=2000 optimizer.lr=0.03 trainer.epochs=5
want batch500 && step batch500 60 --recipes speedrun_gpu --seeds 3 --ceiling-seconds 0 "${eager[@]}" \
  data.batch_size=500 optimizer.lr=0.01 trainer.epochs=3
want compiled && step compiled 100 --recipes speedrun_gpu --seeds 1 --ceiling-seconds 0 trainer.compile_mode=default
echo "== done"
cat "$out/summary.md"

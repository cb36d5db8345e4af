#!/usr/bin/env bash
# The GPU pass: everything only a CUDA machine can check, in parts that each end within 9 minutes.
#
#   bash benchmarks/gpu_pass.sh PART [PART ...] [--dry-run]
#
# Parts:
#   kernels                   the gpu-marked kernel tests (tests/test_gpu.py's and tests/test_gpu_kernels.py's: compiled
#                             Triton, bf16 / fp16 / fp32 against float64) and benchmarks/bench_kernels.py at every
#                             shape of its grid, one (N, V) slice per command, issue 13's N 16384 first
#   kernels-variants          bench_kernels.py --variants (each design choice of issue 13 switched) at N 16384 beside
#                             ours-triton, CCE and Liger
#   engine                    the other gpu-marked tests (4-bit load, a 2-step run, resume across devices on CUDA),
#                             the demo (which forces the CPU) and the demo's settings run on CUDA through `run`
#   e2e-SHAPE-ours            benchmarks/bench_e2e.py --device cuda, ours and ours-naive, and `lowmem-sdpo plan`
#                             for the same shape as JSON beside it (plan_SHAPE.json), for the plan-vs-measured check
#   e2e-SHAPE-trl             bench_e2e.py's TRL systems on that shape
#                             SHAPE: solar-2048, solar-4096, llama3-8b-2048 (bench_e2e.py's CUDA shapes)
#   e2e                       every e2e part;   all: kernels, kernels-variants, engine, e2e
# --dry-run (works on CPU) prints each command, one per line, and runs nothing.
#
# Each part has GPU_PASS_PART_SECONDS (default 540) of wall time: every command runs under `timeout` with what is
# left, and commands the budget cannot reach are recorded as skipped. The device tool allows 10 minutes per call,
# so run one part per call; `all` runs the parts back to back where there is no such limit.
#
# Wheels: the device image lacks bitsandbytes, datasets, trl, liger-kernel and cut-cross-entropy and has no network.
# On the CPU machine run ../shared/device/wheels.sh first (it fills .whl/); carry .whl to the device. This script
# installs them with the line wheels.sh prints, and puts the repo and kernels/ on PYTHONPATH (no editable install).
#
# Results: under $OUT when set (the device tool brings it back), else benchmarks/results/: per part
# gpu_pass_PART.json (each command, exit status, seconds, log file) and logs/, plus what each command writes.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
PY=${GPU_PASS_PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
BUDGET=${GPU_PASS_PART_SECONDS:-540}
SHAPES=(solar-2048 solar-4096 llama3-8b-2048)
# `lowmem-sdpo plan` flags for each bench_e2e.py CUDA shape (tests/test_gpu_pass.py checks them against
# bench_e2e.SHAPES): its config fixture, sequence length, micro-batch, accumulation and pairs per sDPO step.
declare -A PLAN_ARGS=(
  [solar-2048]="--model tests/fixtures/solar-10.7b --max-length 2048 --batch-size 1 --grad-accum 4 --steps 8,8"
  [solar-4096]="--model tests/fixtures/solar-10.7b --max-length 4096 --batch-size 1 --grad-accum 4 --steps 8,8"
  [llama3-8b-2048]="--model tests/fixtures/llama-3-8b --max-length 2048 --batch-size 1 --grad-accum 4 --steps 8,8"
)
# The demo's settings (lowmem_sdpo/cli/demo_cmd.py DEMO_SETTINGS, checked by tests/test_gpu_pass.py) with
# --device cuda: `lowmem-sdpo demo` itself forces the CPU.
DEMO_RUN_ARGS="--model tiny --steps examples/data/toy_step1.jsonl,examples/data/toy_step2.jsonl \
--max-length 32 --max-prompt-length 24 --beta 0.1 --learning-rate 3e-3 --epochs 6 --batch-size 16 --grad-accum 1 \
--warmup-ratio 0.1 --lora-r 8 --lora-alpha 16 --lora-dropout 0.0 --save-every 20 --diagnostics \
--no-gradient-checkpointing --device cuda"
# What ../shared/device/wheels.sh prints (tests/test_gpu_pass.py compares them where that file is present).
WHEELS_INSTALL="$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl"

usage() {
  echo "usage: bash benchmarks/gpu_pass.sh kernels|kernels-variants|engine|e2e|e2e-SHAPE-ours|e2e-SHAPE-trl|all ... [--dry-run]" >&2
  echo "  SHAPE: ${SHAPES[*]}" >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------- the commands

part_commands() {  # PART -> its commands on stdout, one per line (shell words, run with bash -c)
  local part=$1 r
  r=$(printf %q "$RESULTS")
  case $part in
    kernels)
      echo "LOWMEM_SDPO_TEST_CUDA=1 $PY -m pytest -m gpu tests/test_gpu.py tests/test_gpu_kernels.py -k kernel --junitxml=$r/pytest_kernels.xml"
      # bench_kernels.py's full grid (N x V at D 4096), a slice per command so that a slow slice costs only itself;
      # issue 13's targets are at N 16384, so those slices come first.
      for n in 16384 4096; do
        for v in 32000 128256; do
          echo "$PY benchmarks/bench_kernels.py --n $n --v $v --out $r/bench_kernels_n${n}_v${v}.json"
        done
      done
      ;;
    kernels-variants)
      # Quoted: the variant names hold brackets, which bash -c would otherwise try as globs.
      local variants="'ours-triton[group1]' 'ours-triton[no-filter]' 'ours-triton[element-filter]'"
      variants+=" 'ours-triton[input-atomics]' 'ours-triton[rows]' 'ours-torch[deterministic]'"
      for v in 32000 128256; do
        echo "$PY benchmarks/bench_kernels.py --n 16384 --v $v --impls ours-triton apple-cce liger-flce --variants $variants --out $r/bench_kernels_variants_n16384_v${v}.json"
      done
      ;;
    engine)
      echo "LOWMEM_SDPO_TEST_CUDA=1 $PY -m pytest -m gpu tests/test_gpu.py -k 'not kernel' --junitxml=$r/pytest_engine.xml"
      echo "$PY -m lowmem_sdpo demo --output-dir $r/demo-cpu"
      echo "$PY -m lowmem_sdpo run $DEMO_RUN_ARGS --output-dir $r/demo-cuda"
      ;;
    e2e-*-ours | e2e-*-trl)
      local rest=${part#e2e-} shape systems
      shape=${rest%-*}
      [[ -n ${PLAN_ARGS[$shape]+x} ]] || usage
      if [[ $part == *-ours ]]; then systems="ours ours-naive"; else systems="trl trl-precompute trl-liger"; fi
      echo "$PY benchmarks/bench_e2e.py --device cuda --shapes $shape --systems $systems --out $r/e2e_cuda.json"
      if [[ $part == *-ours ]]; then
        echo "$PY -m lowmem_sdpo plan ${PLAN_ARGS[$shape]} --json > $r/plan_$shape.json"
      fi
      ;;
    *) usage ;;
  esac
}

expand_parts() {  # the named parts -> the parts to run, in order
  local p s
  for p in "$@"; do
    case $p in
      all) expand_parts kernels kernels-variants engine e2e ;;
      e2e) for s in "${SHAPES[@]}"; do echo "e2e-$s-ours"; echo "e2e-$s-trl"; done ;;
      *) echo "$p" ;;
    esac
  done
}

# ------------------------------------------------------------------------------------------------- running

setup_commands() {
  echo "nvidia-smi"
  echo "$PY -c 'import torch, triton, transformers, peft, bitsandbytes; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_name())'"
}

run_part() {  # PART -> runs its commands within BUDGET seconds, writes gpu_pass_PART.json; returns 0 if all passed
  local part=$1 start=$SECONDS failed=0 i=0 cmd left rc began log note
  local table="$RESULTS/logs/$part.tsv"
  : > "$table"
  [[ $part == engine ]] && rm -rf "$RESULTS/demo-cpu" "$RESULTS/demo-cuda"  # run directories of an earlier pass
  while IFS= read -r cmd; do
    i=$((i + 1))
    log="$RESULTS/logs/$part-$i.log"
    left=$((BUDGET - (SECONDS - start)))
    if ((left < 10)); then
      printf '%s\t\t0\t\tskipped: the part budget of %ss is spent\n' "$cmd" "$BUDGET" >> "$table"
      failed=1
      continue
    fi
    echo "[$part $i] $cmd (at most ${left}s)"
    began=$SECONDS
    # stdin from /dev/null: the loop's own stdin is the list of commands.
    timeout --kill-after=20 "$left" bash -c "$cmd" < /dev/null > "$log" 2>&1
    rc=$?
    tail -n 5 "$log"
    note=""
    ((rc == 124 || rc == 137)) && note="timed out"
    ((rc == 0)) || failed=1
    printf '%s\t%s\t%s\t%s\t%s\n' "$cmd" "$rc" "$((SECONDS - began))" "$log" "$note" >> "$table"
  done < <(setup_commands; part_commands "$part")
  "$PY" - "$part" "$table" "$RESULTS/gpu_pass_$part.json" "$BUDGET" <<'PY'
import csv, json, sys

part, table, out, budget = sys.argv[1:]
with open(table) as f:
    rows = [
        {"command": c, "exit": int(e) if e else None, "wall_s": int(w), "log": log or None, "note": note or None}
        for c, e, w, log, note in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    ]
with open(out, "w") as f:
    json.dump({"part": part, "budget_s": int(budget), "passed": all(r["exit"] == 0 for r in rows), "commands": rows}, f, indent=2)
PY
  echo "[$part] $( ((failed)) && echo FAILED || echo passed ): $RESULTS/gpu_pass_$part.json"
  return $failed
}

# ------------------------------------------------------------------------------------------------- main

DRY=0
PARTS=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
    -*) usage ;;
    *) PARTS+=("$arg") ;;
  esac
done
((${#PARTS[@]})) || usage
mapfile -t RUN < <(expand_parts "${PARTS[@]}")
for p in "${RUN[@]}"; do part_commands "$p" > /dev/null || usage; done

if compgen -G ".whl/*.whl" > /dev/null; then
  INSTALL=$WHEELS_INSTALL
else
  INSTALL=""
fi

if ((DRY)); then
  if [[ -n $INSTALL ]]; then echo "$INSTALL"; else echo "# no .whl/ here: run ../shared/device/wheels.sh on the CPU machine first (and carry .whl)"; fi
  setup_commands
  for p in "${RUN[@]}"; do part_commands "$p"; done
  exit 0
fi

mkdir -p "$RESULTS/logs"
unset TRITON_INTERPRET  # compiled Triton, not the interpreter the CPU tests use
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # the device has no network: fail at once instead of retrying
if [[ -n $INSTALL ]]; then
  echo "installing the wheels in .whl/ into /tmp/site"
  bash -c "$INSTALL" || { echo "error: installing .whl/ failed" >&2; exit 1; }
else
  echo "warning: no .whl/ here: bitsandbytes, trl, datasets, liger-kernel and cut-cross-entropy come only from the" \
    "image (it lacks them); run ../shared/device/wheels.sh on the CPU machine and carry .whl" >&2
fi
export PYTHONPATH=/tmp/site:$REPO:$REPO/kernels${PYTHONPATH:+:$PYTHONPATH}

status=0
for p in "${RUN[@]}"; do
  run_part "$p" || status=1
done
exit $status

#!/usr/bin/env bash
# The GPU pass: everything only a CUDA machine can check, in parts that each fit one device call.
#
#   bash benchmarks/gpu_pass.sh PART [PART ...] [--dry-run]
#   bash benchmarks/gpu_pass.sh first-look --prepare     (on the CPU machine, before the device call)
#
# Parts:
#   first-look                the numbers that matter, in one call of at most 8 minutes: preflight; the kernel
#                             benchmark at N 16384, D 4096, V 32000 and 128256, bf16, ours against CCE, Liger
#                             (reduction "none" and "sum") and naive torch; an sDPO step at SOLAR width with
#                             FIRST_LOOK_LAYERS layers (bench_e2e.py --layers) beside `plan`'s prediction for the
#                             same shape, which --prepare computes on the CPU beforehand
#   kernels                   the gpu-marked kernel tests (tests/gpu/test_gpu.py's and tests/gpu/test_gpu_kernels.py's: compiled
#                             Triton, bf16 / fp16 / fp32 against float64) and benchmarks/bench_kernels.py's grid at
#                             N 4096, one (N, V) slice per command
#   kernels-grid-V            bench_kernels.py's grid at N 16384 (issue 13's shape) and V 32000 or 128256;
#                             kernels-grid: both
#   kernels-variants          bench_kernels.py --variants (each design choice of issue 13 switched) at N 16384, LM-like
#                             logits, half the rows ignored, beside ours-triton, CCE and Liger
#   engine                    the other gpu-marked tests (4-bit load, a 2-step run, resume across devices on CUDA),
#                             the demo (which forces the CPU) and the demo's settings run on CUDA through `run`
#   e2e-SHAPE-ours            benchmarks/bench_e2e.py --device cuda, ours and ours-naive, and `lowmem-sdpo plan`
#                             for the same shape as JSON beside it (plan_SHAPE.json), for the plan-vs-measured check
#   e2e-SHAPE-trl             bench_e2e.py's TRL systems on that shape (needs the trl-arrow and trl wheel sets)
#                             SHAPE: solar-2048, solar-4096, llama3-8b-2048 (bench_e2e.py's CUDA shapes)
#   e2e                       every e2e part;   all: kernels, kernels-grid, kernels-variants, engine, e2e
# --dry-run (works on CPU) prints each command with its estimated seconds, and the total, and runs nothing.
#
# Every part starts with the preflight (benchmarks/preflight.py: nvidia-smi, every import, a C compiler and
# Python.h) and stops at once when it fails. A part has GPU_PASS_PART_SECONDS of wall time (first-look 480,
# the others 540): a command whose estimate no longer fits what is left is skipped, and the part's JSON says so;
# every command runs under `timeout` with what is left. The part's JSON (gpu_pass_PART.json) is rewritten after
# every command, so a call cut at its limit keeps what it finished. The commit is LOWMEM_SDPO_COMMIT, else git's
# HEAD, else the one --prepare recorded (the device copy may have no .git); every benchmark JSON records it.
#
# Wheels: the device image lacks bitsandbytes, liger-kernel, cut-cross-entropy (and TRL's set) and has no
# network. On the CPU machine run ../shared/device/wheels.sh core first (it fills .whl/); carry .whl to the
# device. This script installs them with the line wheels.sh prints, and puts the repo and kernels/ on PYTHONPATH.
#
# Results: under $OUT when set (the device tool brings it back), else benchmarks/results/: per part
# gpu_pass_PART.json (each command, estimate, exit status, seconds, log file, note) and logs/, plus what each
# command writes. GPU_PASS_RUNNER (tests only) runs each command as `$GPU_PASS_RUNNER CMD` instead of `bash -c CMD`.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
PY=${GPU_PASS_PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
SHAPES=(solar-2048 solar-4096 llama3-8b-2048)
# `lowmem-sdpo plan` flags for each bench_e2e.py CUDA shape (tests/unit/benchmarks/test_gpu_pass.py checks them against
# bench_e2e.SHAPES): its config fixture, sequence length, micro-batch, accumulation and pairs per sDPO step.
declare -A PLAN_ARGS=(
  [solar-2048]="--model tests/fixtures/solar-10.7b --max-length 2048 --batch-size 1 --grad-accum 4 --steps 8,8"
  [solar-4096]="--model tests/fixtures/solar-10.7b --max-length 4096 --batch-size 1 --grad-accum 4 --steps 8,8"
  [llama3-8b-2048]="--model tests/fixtures/llama-3-8b --max-length 2048 --batch-size 1 --grad-accum 4 --steps 8,8"
)
# first-look's sDPO step: SOLAR's width and vocabulary, 8 of its 48 decoder layers (~4.2 GB in bf16 to build,
# save and load twice in seconds, against 21 GB for all 48).
FIRST_LOOK_SHAPE=solar-2048
FIRST_LOOK_LAYERS=8
PREPARED=benchmarks/results/gpu_pass_prepared.json  # written by --prepare on the CPU machine, carried along
# The demo's settings (lowmem_sdpo/cli/demo_cmd.py DEMO_SETTINGS, checked by tests/unit/benchmarks/test_gpu_pass.py) with
# --device cuda: `lowmem-sdpo demo` itself forces the CPU.
DEMO_RUN_ARGS="--model tiny --steps examples/data/toy_step1.jsonl,examples/data/toy_step2.jsonl \
--max-length 32 --max-prompt-length 24 --beta 0.1 --learning-rate 3e-3 --epochs 6 --batch-size 16 --grad-accum 1 \
--warmup-ratio 0.1 --lora-r 8 --lora-alpha 16 --lora-dropout 0.0 --save-every 20 --diagnostics \
--no-gradient-checkpointing --device cuda"
# What ../shared/device/wheels.sh prints for a set in folder DIR (tests/unit/benchmarks/test_gpu_pass.py compares them where that
# file is present). Its sets: .whl (core: bitsandbytes, liger-kernel, cut-cross-entropy), .whl-trl-arrow and
# .whl-trl (TRL's, each carried in a call of its own: /tmp/site keeps what earlier calls installed while warm).
WHEELS_INSTALL="$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site DIR/*.whl"
WHEEL_SETS=(.whl .whl-trl-arrow .whl-trl)
INSTALL_SECONDS=30  # estimate of installing the core set (~46 MB of wheels)

usage() {
  echo "usage: bash benchmarks/gpu_pass.sh first-look|kernels|kernels-grid[-V]|kernels-variants|engine|e2e|e2e-SHAPE-ours|e2e-SHAPE-trl|all ... [--dry-run]" >&2
  echo "       bash benchmarks/gpu_pass.sh first-look --prepare" >&2
  echo "  SHAPE: ${SHAPES[*]}" >&2
  exit 2
}

part_budget() {  # PART -> its seconds
  local default=540
  [[ $1 == first-look ]] && default=480
  echo "${GPU_PASS_PART_SECONDS:-$default}"
}

# ---------------------------------------------------------------------------------------------- the commands

preflight_command() {
  printf '20\t%s\n' "$PY benchmarks/preflight.py --need-gpu --out $(printf %q "$RESULTS")/preflight.json"
}

part_commands() {  # PART -> its commands on stdout, one per line: estimated seconds, a tab, the command
  local part=$1 r n v
  r=$(printf %q "$RESULTS")
  case $part in
    first-look)
      # Issue 13's shape, LM-like logits with half the rows ignored (the sDPO case: prompts carry no
      # target), frozen (sDPO) and trained lm head; every peer once per V.
      local peers="ours-triton apple-cce liger-flce liger-flce-sum naive-torch"
      local slice="--n 16384 --d 4096 --logits lm --ignored 0.5 --impls $peers"
      printf '110\t%s\n' "$PY benchmarks/bench_kernels.py $slice --v 32000 --out $r/bench_kernels_first_look_v32000.json"
      printf '150\t%s\n' "$PY benchmarks/bench_e2e.py --device cuda --shapes $FIRST_LOOK_SHAPE --layers $FIRST_LOOK_LAYERS --systems ours --out $r/e2e_cuda_first_look.json"
      printf '120\t%s\n' "$PY benchmarks/bench_kernels.py $slice --v 128256 --out $r/bench_kernels_first_look_v128256.json"
      ;;
    kernels)
      printf '240\t%s\n' "LOWMEM_SDPO_TEST_CUDA=1 $PY -m pytest -m gpu tests/gpu/test_gpu.py tests/gpu/test_gpu_kernels.py -k kernel --junitxml=$r/pytest_kernels.xml"
      # bench_kernels.py's full grid (N x V at D 4096), a slice per command so that a slow slice costs only itself:
      # N 4096 here, issue 13's N 16384 in kernels-grid (each part within one call).
      for v in 32000 128256; do
        printf '90\t%s\n' "$PY benchmarks/bench_kernels.py --n 4096 --v $v --out $r/bench_kernels_n4096_v${v}.json"
      done
      ;;
    kernels-grid-32000 | kernels-grid-128256)
      # 16 cases (logits, weight, ignored) x 7 peers at N 16384, one V per call.
      v=${part#kernels-grid-}
      printf '420\t%s\n' "$PY benchmarks/bench_kernels.py --n 16384 --v $v --out $r/bench_kernels_n16384_v${v}.json"
      ;;
    kernels-variants)
      # Quoted: the variant names hold brackets, which bash -c would otherwise try as globs.
      local variants="'ours-triton[group1]' 'ours-triton[no-filter]' 'ours-triton[element-filter]'"
      variants+=" 'ours-triton[input-atomics]' 'ours-triton[rows]' 'ours-torch[deterministic]'"
      for v in 32000 128256; do
        printf '200\t%s\n' "$PY benchmarks/bench_kernels.py --n 16384 --v $v --logits lm --ignored 0.5 --impls ours-triton apple-cce liger-flce liger-flce-sum --variants $variants --out $r/bench_kernels_variants_n16384_v${v}.json"
      done
      ;;
    engine)
      printf '180\t%s\n' "LOWMEM_SDPO_TEST_CUDA=1 $PY -m pytest -m gpu tests/gpu/test_gpu.py -k 'not kernel' --junitxml=$r/pytest_engine.xml"
      printf '60\t%s\n' "$PY -m lowmem_sdpo demo --output-dir $r/demo-cpu"
      printf '60\t%s\n' "$PY -m lowmem_sdpo run $DEMO_RUN_ARGS --output-dir $r/demo-cuda"
      ;;
    e2e-*-ours | e2e-*-trl)
      local rest=${part#e2e-} shape systems
      shape=${rest%-*}
      [[ -n ${PLAN_ARGS[$shape]+x} ]] || usage
      if [[ $part == *-ours ]]; then systems="ours ours-naive"; else systems="trl trl-precompute trl-liger"; fi
      # The 48-layer SOLAR shape: build and save 21 GB once per warm machine, then a load per step and system.
      printf '480\t%s\n' "$PY benchmarks/bench_e2e.py --device cuda --shapes $shape --systems $systems --out $r/e2e_cuda.json"
      if [[ $part == *-ours ]]; then
        printf '10\t%s\n' "$PY -m lowmem_sdpo plan ${PLAN_ARGS[$shape]} --json > $r/plan_$shape.json"
      fi
      ;;
    *) usage ;;
  esac
}

expand_parts() {  # the named parts -> the parts to run, in order
  local p s
  for p in "$@"; do
    case $p in
      all) expand_parts kernels kernels-grid kernels-variants engine e2e ;;
      kernels-grid) echo kernels-grid-32000; echo kernels-grid-128256 ;;
      e2e) for s in "${SHAPES[@]}"; do echo "e2e-$s-ours"; echo "e2e-$s-trl"; done ;;
      *) echo "$p" ;;
    esac
  done
}

# ------------------------------------------------------------------------------------------- bookkeeping

commit_of_this_tree() {  # LOWMEM_SDPO_COMMIT, else git's HEAD, else the commit --prepare recorded; may be empty
  if [[ -n ${LOWMEM_SDPO_COMMIT:-} ]]; then echo "$LOWMEM_SDPO_COMMIT"; return; fi
  if git rev-parse HEAD 2> /dev/null; then return; fi
  [[ -f $PREPARED ]] && "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["commit"] or "")' "$PREPARED"
}

write_summary() {  # PART TABLE OUT BUDGET STATE: the part's JSON from its table, rewritten atomically
  "$PY" - "$@" "${LOWMEM_SDPO_COMMIT:-}" <<'PY'
import csv, json, os, sys

part, table, out, budget, state, commit = sys.argv[1:]
with open(table) as f:
    rows = [
        {"command": c, "estimate_s": int(est), "exit": int(e) if e else None, "wall_s": int(w) if w else None,
         "log": log or None, "note": note or None}
        for est, c, e, w, log, note in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    ]
summary = {"part": part, "budget_s": int(budget), "commit": commit or None, "state": state,
           "passed": state == "finished" and all(r["exit"] == 0 for r in rows), "commands": rows}
tmp = f"{out}.tmp"
with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
os.replace(tmp, out)
PY
}

# ------------------------------------------------------------------------------------------------- running

run_part() {  # PART -> runs its commands within its budget, writes gpu_pass_PART.json after each; 0 if all passed
  local part=$1 start=$PART_START failed=0 i=0 est cmd left rc began log note stop=""
  local budget table="$RESULTS/logs/$part.tsv" summary="$RESULTS/gpu_pass_$part.json"
  budget=$(part_budget "$part")
  : > "$table"
  [[ $part == engine ]] && rm -rf "$RESULTS/demo-cpu" "$RESULTS/demo-cuda"  # run directories of an earlier pass
  [[ $part == first-look && -f $PREPARED ]] && cp "$PREPARED" "$RESULTS/" 2> /dev/null  # plan's prediction, beside
  write_summary "$part" "$table" "$summary" "$budget" running
  while IFS=$'\t' read -r est cmd; do
    i=$((i + 1))
    log="$RESULTS/logs/$part-$i.log"
    left=$((budget - (SECONDS - start)))
    if [[ -n $stop ]]; then
      printf '%s\t%s\t\t\t\tnot run: %s\n' "$est" "$cmd" "$stop" >> "$table"
    elif ((est > left)); then
      printf '%s\t%s\t\t\t\tskipped: needs ~%ss, %ss left of the part'"'"'s %ss\n' "$est" "$cmd" "$est" "$left" "$budget" >> "$table"
      echo "[$part $i] skipped (needs ~${est}s, ${left}s left): $cmd"
      failed=1
    else
      echo "[$part $i] $cmd (~${est}s, at most ${left}s)"
      began=$SECONDS
      # stdin from /dev/null: the loop's own stdin is the list of commands.
      if [[ -n ${GPU_PASS_RUNNER:-} ]]; then
        timeout --kill-after=20 "$left" $GPU_PASS_RUNNER "$cmd" < /dev/null > "$log" 2>&1
      else
        timeout --kill-after=20 "$left" bash -c "$cmd" < /dev/null > "$log" 2>&1
      fi
      rc=$?
      tail -n 5 "$log"
      note=""
      ((rc == 124 || rc == 137)) && note="timed out"
      if ((rc != 0)); then
        failed=1
        if ((i == 1)); then stop="the preflight failed (its log: $log)"; note="preflight failed: the part stops"; fi
      fi
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$est" "$cmd" "$rc" "$((SECONDS - began))" "$log" "$note" >> "$table"
    fi
    write_summary "$part" "$table" "$summary" "$budget" running
  done < <(preflight_command; part_commands "$part")
  write_summary "$part" "$table" "$summary" "$budget" finished
  echo "[$part] $( ((failed)) && echo FAILED || echo passed ): $summary"
  return $failed
}

dry_run() {  # the parts' commands, each with its estimate, and the totals
  local total=$INSTALL_SECONDS p est cmd part_total budget
  if [[ -n $INSTALL ]]; then
    printf '%s  # ~%ss\n' "$INSTALL" "$INSTALL_SECONDS"
  else  # counted all the same: the device call will carry .whl
    echo "# no .whl/ here: run ../shared/device/wheels.sh core first (and carry .whl); the device then runs"
    printf '# %s  # ~%ss\n' "${WHEELS_INSTALL//DIR/.whl}" "$INSTALL_SECONDS"
  fi
  for p in "${RUN[@]}"; do
    part_total=0
    budget=$(part_budget "$p")
    echo "# part $p (budget ${budget}s)"
    while IFS=$'\t' read -r est cmd; do
      printf '%s  # ~%ss\n' "$cmd" "$est"
      part_total=$((part_total + est))
    done < <(preflight_command; part_commands "$p")
    echo "# part $p: ~${part_total}s of ${budget}s"
    total=$((total + part_total))
  done
  echo "# total: ~${total}s"
}

prepare_first_look() {  # CPU: plan's prediction for first-look's shape and the commit, into $PREPARED
  local tmp commit dirty
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  # SOLAR's config at FIRST_LOOK_LAYERS layers: what bench_e2e.py --layers builds.
  "$PY" - tests/fixtures/solar-10.7b/config.json "$tmp/config.json" "$FIRST_LOOK_LAYERS" <<'PY' || return 1
import json, sys

config = json.load(open(sys.argv[1]))
config["num_hidden_layers"] = int(sys.argv[3])
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY
  local plan_args=${PLAN_ARGS[$FIRST_LOOK_SHAPE]/--model tests\/fixtures\/solar-10.7b/--model $tmp}
  # shellcheck disable=SC2086  # the flags are words
  "$PY" -m lowmem_sdpo plan $plan_args --json > "$tmp/plan.json" || { echo "error: plan failed" >&2; return 1; }
  commit=$(git rev-parse HEAD 2> /dev/null || true)
  dirty=$(git status --porcelain -- lowmem_sdpo kernels benchmarks 2> /dev/null | grep -v "$PREPARED" | head -1)
  "$PY" - "$tmp/plan.json" "$PREPARED" "$commit" "${dirty:+dirty}" "$FIRST_LOOK_SHAPE-l$FIRST_LOOK_LAYERS" "$plan_args" \
    "$tmp" "tests/fixtures/solar-10.7b at num_hidden_layers=$FIRST_LOOK_LAYERS" <<'PY' || return 1
import json, os, sys, time

plan_path, out, commit, dirty, shape, args, config_dir, model = sys.argv[1:]
plan = json.load(open(plan_path))
for key in ("model", "config_dir"):  # a temporary folder: name what it held instead
    plan[key] = model
payload = {
    "commit": commit or None, "uncommitted_changes": bool(dirty),
    "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "shape": shape, "plan_command": f"lowmem-sdpo plan {args.replace(config_dir, model)} --json", "plan": plan,
}
tmp = f"{out}.tmp"
with open(tmp, "w") as f:
    json.dump(payload, f, indent=2)
    f.write("\n")
os.replace(tmp, out)
PY
  echo "wrote $PREPARED (commit ${commit:-unknown}${dirty:+, uncommitted changes}): carry it with the device call"
}

# ------------------------------------------------------------------------------------------------- main

DRY=0
PREPARE=0
PARTS=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --prepare) PREPARE=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) usage ;;
    *) PARTS+=("$arg") ;;
  esac
done
((${#PARTS[@]})) || usage
mapfile -t RUN < <(expand_parts "${PARTS[@]}")
for p in "${RUN[@]}"; do part_commands "$p" > /dev/null || usage; done

if ((PREPARE)); then
  [[ ${RUN[*]} == first-look ]] || usage
  prepare_first_look
  exit
fi

INSTALL=""  # the install lines of the wheel sets carried into this call
for d in "${WHEEL_SETS[@]}"; do
  if compgen -G "$d/*.whl" > /dev/null; then INSTALL+="${INSTALL:+ && }${WHEELS_INSTALL//DIR/$d}"; fi
done

if ((DRY)); then
  dry_run
  exit 0
fi

mkdir -p "$RESULTS/logs"
unset TRITON_INTERPRET  # compiled Triton, not the interpreter the CPU tests use
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # the device has no network: fail at once instead of retrying
if [[ -n $INSTALL ]]; then
  echo "installing the carried wheels into /tmp/site: $INSTALL"
  bash -c "$INSTALL" || { echo "error: installing the wheels failed" >&2; exit 1; }
else
  echo "warning: no .whl/ here: bitsandbytes, liger-kernel and cut-cross-entropy come only from the image (it" \
    "lacks them, so the preflight will stop the pass); run ../shared/device/wheels.sh core and carry .whl" >&2
fi
export PYTHONPATH=/tmp/site:$REPO:$REPO/kernels${PYTHONPATH:+:$PYTHONPATH}
LOWMEM_SDPO_COMMIT=$(commit_of_this_tree)
export LOWMEM_SDPO_COMMIT

status=0
PART_START=0  # the first part's clock started with the script: the wheels' install counts against its budget
for p in "${RUN[@]}"; do
  run_part "$p" || status=1
  PART_START=$SECONDS
done
exit $status

#!/usr/bin/env bash
# Issue 13: real results on a real target (SmolLM2-135M-Instruct), every stage, on one H200 lent through the
# device tool in calls of at most 10 minutes. How to run it, stage by stage: bench/README.md, section
# "Real results on a real target". The document it ends with is docs/results.md (generated, never edited).
#
# Here (the development machine):       bash bench/real_target.sh prepare | unpack DIR | compare
# There (each device call, repo root):   bash bench/real_target.sh load K [&& bash bench/real_target.sh STAGE ...]
#   stages: regen | train ALGO | select ALGO | eval ALGO T | ngram T        (ALGO: eagle3 | dflash | dspark)
#   or the whole run in the background: start (then `collect S` in each later call, back to back)
#
# Artefacts come back in $OUT as .tgz files (split into .part-NN pieces above 15 MiB); `unpack` puts them back
# under .real/ here, and a later call carries .real/state/ so that a fresh machine resumes from them.
set -euo pipefail
cd "$(dirname "$0")/.."

REAL=.real                         # everything this script writes (ignored by git)
RUN=$REAL/run                      # storage.root of every stage: paths in the reports are relative to the repo
STATE=$REAL/state                  # archives brought back, carried into later calls
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
CHUNK_MIB=${CHUNK_MIB:-58}         # one carried chunk + the working tree (~2 MiB) stay under a call's 64 MiB

# --- the protocol (issue 13): change here, nowhere else -------------------------------------------------------
HOLDOUT=${HOLDOUT:-256}            # training prompts held out for checkpoint selection (never trained on)
KEEP=${KEEP:-5}                    # checkpoints kept for selection
SAVE_EVERY=${SAVE_EVERY:-150}      # 16,123 - 256 prompts x 3 epochs / 64 per step = ~740 steps -> 5 checkpoints
SELECT_PROMPTS=${SELECT_PROMPTS:-64}
SELECT_TOKENS=${SELECT_TOKENS:-256}
EVAL_CAP=${EVAL_CAP:-16}           # prompts per benchmark (shuffled with evaluation.shuffle_seed, first user turn)
EVAL_TOKENS=${EVAL_TOKENS:-512}    # new tokens per prompt
PROPOSALS=7
SWEEP=${SWEEP:-1,2,4,8,16,32}      # batch sizes of the T = 0 speedup curve
# Regeneration sampling: T = 0.7, top-p 1, max 512 new tokens, seed 0 (+ record index). Why: the draft must
# learn the target's own distribution; pure greedy (T = 0) makes a 135M model loop and would teach the draft
# to predict loops, T = 1 adds low-probability tails the target rarely takes at T = 0; 0.7 keeps the answers
# close to the target's typical output at both evaluation temperatures. 512 = the evaluation length.
REGEN_SAMPLING=(--set regeneration.sampling.temperature=0.7 --set regeneration.sampling.top_p=1.0
                --set regeneration.sampling.max_tokens=512 --set regeneration.sampling.seed=0)
REGEN_BUDGET_S=${REGEN_BUDGET_S:-480}   # per call; the journal resumes in the next one
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-500}   # per call; training resumes from `latest` on the same machine
REGEN_CONCURRENCY=${REGEN_CONCURRENCY:-256}  # requests in flight per server (each decodes half of them together)
REGEN_SERVERS=${REGEN_SERVERS:-3}       # embedded servers sharing the GPU (each one's loop is host-bound)
# `start` (the whole run in one background process): a time slot per phase, so that the run fits the
# session's device time; training re-plans its steps to the slot (training.time_budget_minutes)
PIPE_REGEN_S=${PIPE_REGEN_S:-240}     # resuming the journal: ~2,800 records left after the first session
PIPE_TRAIN_MIN=${PIPE_TRAIN_MIN:-9}
PIPE_NGRAM=${PIPE_NGRAM:-1}             # 0: keep an earlier session's n-gram floor (same prompts, same seeds)
PIPE_SPEED=${PIPE_SPEED:-1}             # 1: end with bench/decode_gpu.py speed alone on the GPU
SWEEP_CAP=${SWEEP_CAP:-4}               # prompts per benchmark of the speedup sweep (alone on the GPU)

# `smoke` (here, CPU, a minute) runs the device stages on a tiny random target to check this script itself.
TARGET=${TARGET:-$REAL/dev/$GGUF_NAME}
DEVICE=${DEVICE:-cuda}
DOCS=${DOCS:-docs}
PY=${PY:-python3}
EXTRA=()                           # smoke: a tiny budget

die() { echo "error: $*" >&2; exit 2; }
recipe() { echo "configs/$1/smollm2.yaml"; }

# Every recipe-driven command of every stage gets these: the carried target and data, the full data set.
common() {
  echo --set "target.model=$TARGET" --set target.served_model_name=smollm2 \
       --set "data.path=$REAL/dev/prompts.jsonl" --set data.max_samples=null \
       --set "data.holdout=$HOLDOUT" --set "evaluation.benchmarks_dir=$REAL/dev/eval" \
       --set "storage.root=$RUN" "${EXTRA[@]}"
}

# Record a command of this stage (the exact commands go into docs/results.md).
record() { mkdir -p "$RUN/commands"; printf '%s\n' "$*" >>"$RUN/commands/$STAGE_NAME.sh"; }

# ds BUDGET_S ARGS...: record and run `python3 -m deepspec ARGS`, stopped after BUDGET_S seconds (exit 124).
ds() { local budget=$1; shift; record python3 -m deepspec "$@"; timeout "$budget" $PY -m deepspec "$@"; }

# Archive PATHS (relative to the repo) into $OUT/NAME.tgz, split into <= 15 MiB pieces when larger.
bring_back() {
  local name=$1; shift
  local out=${OUT:?run this stage through the device tool (OUT unset)}
  tar czf "$out/$name.tgz" "$@"
  if [ "$(stat -c %s "$out/$name.tgz")" -gt $((15 * 1024 * 1024)) ]; then
    split -b 15M -d "$out/$name.tgz" "$out/$name.tgz.part-" && rm "$out/$name.tgz"
  fi
  ls -la "$out"
}

# Unpack .real/state/NAME.tgz (or its pieces) unless MARKER already exists; 1 when there is none.
restore() {
  local name=$1 marker=$2
  [ -e "$marker" ] && return 0
  if [ -f "$STATE/$name.tgz" ]; then tar xzf "$STATE/$name.tgz"; return 0; fi
  if ls "$STATE/$name.tgz.part-"* >/dev/null 2>&1; then cat "$STATE/$name.tgz.part-"* | tar xz; return 0; fi
  return 1
}
need() { restore "$1" "$2" || die "$2 missing and no $STATE/$1.tgz carried: run the stage that makes it first"; }

device_env() {
  [ -f "$REAL/ready" ] || die "the machine holds no SmolLM2/wheels yet: run 'load 0', 'load 1', ... first"
  export PYTHONPATH="$PWD/$REAL/site:$PWD" HF_HUB_OFFLINE=1 DEEPSPEC_CACHE="$PWD/$REAL/cache" PYTHONUNBUFFERED=1
  mkdir -p "$RUN/logs"
}

# ------------------------------------------------------------------------------------------- here: prepare
prepare() {
  local venv=.venv/bin/python pack=$REAL/pack
  grep -qx '/.real/' .git/info/exclude 2>/dev/null || echo '/.real/' >>.git/info/exclude
  rm -rf "$REAL/stage" "$pack" && mkdir -p "$REAL/stage/$REAL/dev/whl" "$pack"
  local gguf
  gguf=$($venv -c 'from deepspec.target_model.files import smollm2_gguf; print(smollm2_gguf())')
  cp "$gguf" "$REAL/stage/$REAL/dev/$GGUF_NAME"
  cp ../shared/datasets/train/prompts.jsonl "$REAL/stage/$REAL/dev/prompts.jsonl"
  cp -r ../shared/datasets/eval "$REAL/stage/$REAL/dev/eval"
  # What deepspec needs beyond the device image's packages (KINDS.md), at this venv's versions.
  local pkgs=() n
  for n in pydantic pydantic_core annotated-types typing-inspection typing_extensions openai httpx2 httpcore2 \
           truststore jiter sniffio anyio aiohttp fastapi starlette annotated-doc opentelemetry-api uvicorn gguf \
           transformers; do
    pkgs+=("$n==$($venv -c "import importlib.metadata as m; print(m.version('$n'))")")
  done
  $venv -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$REAL/stage/$REAL/dev/whl" "${pkgs[@]}"
  (cd "$REAL/stage" && tar czf - "$REAL/dev") >"$pack/all.tgz"
  split -b "${CHUNK_MIB}M" -d "$pack/all.tgz" "$pack/chunk-"
  local chunks=("$pack"/chunk-*)
  $venv - "$pack/all.tgz" "${#chunks[@]}" <<'EOF' >"$pack/manifest.json"
import hashlib, json, sys
h = hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()
print(json.dumps({"sha256": h, "chunks": int(sys.argv[2])}))
EOF
  rm -rf "$pack/all.tgz" "$REAL/stage"
  echo "prepared ${#chunks[@]} chunk(s) in $pack:"; ls -la "$pack"
  echo "device calls, back to back (the machine is given back ~30 s after a call returns):"
  for i in "${!chunks[@]}"; do
    echo "  run(carry=[\"$pack/chunk-0$i\", \"$pack/manifest.json\"], command=\"bash bench/real_target.sh load $i\")"
  done
  echo "then each stage: run(carry=[\"$STATE\"], command=\"bash bench/real_target.sh STAGE ...\")"
}

# ------------------------------------------------------------------------------------------- there: load
load() {
  local k=$1 recv=$REAL/recv
  mkdir -p "$recv"
  mv "$REAL/pack/chunk-0$k" "$recv/" 2>/dev/null || [ -f "$recv/chunk-0$k" ] || die "chunk $k was not carried"
  local want have
  want=$(python3 -c "import json; print(json.load(open('$REAL/pack/manifest.json'))['chunks'])")
  have=$(ls "$recv" | wc -l)
  echo "chunk $k received ($have of $want)"
  [ "$have" -lt "$want" ] && return 0
  cat "$recv"/chunk-* >"$REAL/all.tgz"
  python3 - "$REAL/all.tgz" "$REAL/pack/manifest.json" <<'EOF'
import hashlib, json, sys
got = hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()
want = json.load(open(sys.argv[2]))["sha256"]
sys.exit(0 if got == want else f"pack sha256 {got} != {want}: carry the chunks again")
EOF
  tar xzf "$REAL/all.tgz" && rm -rf "$REAL/all.tgz" "$recv"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$REAL/site" \
    "$REAL"/dev/whl/*.whl
  touch "$REAL/ready"
  device_env
  STAGE_NAME=setup
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RUN/gpu.txt"
  python3 - <<'EOF' | tee "$RUN/machine.txt"
import os, platform, torch, transformers
print(f"1 x {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, {platform.platform()}")
EOF
  # GGUF -> cached safetensors once per machine (every later stage loads the converted folder)
  python3 -c "from deepspec.target_model.files import resolve_model_path as r; print(r('$REAL/dev/$GGUF_NAME'))"
  echo "ready"
}

# ------------------------------------------------------------------------------------------- there: stages
regen() {
  STAGE_NAME=regen
  device_env
  local out=$RUN/runs/smollm2/regenerated
  [ -f "$out.jsonl" ] || restore regen "$out.journal.jsonl" || true  # resume a journal brought back earlier
  # --servers: that many `deepspec serve` processes share the GPU, each decoding up to half of its
  # REGEN_CONCURRENCY requests in flight (their logs: regenerated.jsonl.server-<i>.log)
  local t0=$SECONDS rc=0
  local args=(regenerate -c "$(recipe eagle3)" $(common) "${REGEN_SAMPLING[@]}"
              --set "regeneration.concurrency=$REGEN_CONCURRENCY" --quiet)
  ds "$REGEN_BUDGET_S" "${args[@]}" --servers "$REGEN_SERVERS" || rc=$?
  echo "regenerate: exit $rc after $((SECONDS - t0)) s"
  if [ "$rc" != 0 ]; then  # the slot ended first: train on what is finished; the journal resumes later
    ds 300 "${args[@]}" --partial || die "regenerate --partial failed"
  fi
  $PY - "$out" "$REAL/dev/prompts.jsonl" <<'EOF' | tee "$out.manifest.json"
import hashlib, json, sys
base, prompts = sys.argv[1], sys.argv[2]
summary = json.load(open(base + ".summary.json"))
sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
rows = [json.loads(x) for x in open(base + ".jsonl")]
status = {s: sum(r["status"] == s for r in rows) for s in ("ok", "truncated", "error", "skipped")}
print(json.dumps({"file": base + ".jsonl", "sha256": sha(base + ".jsonl"), "input_sha256": sha(prompts),
                  "records": len(rows), "input_records": summary.get("input_total"),
                  "partial": summary.get("partial", False), "status": status,
                  "truncation_rate": status["truncated"] / max(len(rows), 1),
                  "provenance": rows[0].get("provenance"), "summary": summary}, indent=2))
EOF
  bring_back regen "$out.jsonl" "$out".journal* "$out.summary.json" "$out.errors.jsonl" "$out.manifest.json" \
    "$RUN/commands/regen.sh" "$RUN/machine.txt" "$out".jsonl.server-*.log
}

train() {
  local algo=$1
  STAGE_NAME=train-$algo
  device_env
  need regen "$RUN/runs/smollm2/regenerated.jsonl"
  local t0=$SECONDS rc=0
  ds "$TRAIN_BUDGET_S" train -c "$(recipe "$algo")" $(common) --set "training.keep_last=$KEEP" \
    --set "training.save_every=$SAVE_EVERY" --no-progress || rc=$?
  echo "train $algo: exit $rc after $((SECONDS - t0)) s"
  local dir=$RUN/runs/smollm2/$algo
  bring_back "train-$algo" "$dir/metrics.jsonl" "$dir/latest" "$RUN/commands/train-$algo.sh"
  [ "$rc" = 0 ] || echo "not finished: call 'train $algo' again on this machine (checkpoints stay while it is warm)"
  return 0
}

select_ckpt() {
  local algo=$1
  STAGE_NAME=select-$algo
  device_env
  # T = 0 (deterministic, so checkpoints differ only by their weights), shorter answers, batched (tau does not
  # depend on the batch size).
  need regen "$RUN/runs/smollm2/regenerated.jsonl"
  ds 560 eval -c "$(recipe "$algo")" $(common) --select --max-prompts "$SELECT_PROMPTS" --batch-size 32 \
    --set evaluation.temperature=0 --set "evaluation.max_new_tokens=$SELECT_TOKENS" --set "evaluation.num_proposals=$PROPOSALS" \
    --set evaluation.thinking=false --no-progress --device "$DEVICE"
  local dir=$RUN/runs/smollm2/$algo
  bring_back "select-$algo" "$dir/selection.json" "$dir/selected" "$dir/metrics.jsonl" "$RUN/commands/select-$algo.sh"
}

# eval ALGO T: the selected checkpoint (ALGO = ngram: the model-free floor) on all nine benchmarks.
evaluate() {
  local algo=$1 t=$2
  STAGE_NAME=eval-$algo-t$t
  device_env
  local what=(--checkpoint "runs/smollm2/$algo/selected") recipe_algo=$algo
  if [ "$algo" = ngram ]; then what=(--drafter ngram); recipe_algo=eagle3; fi
  local sizes=32  # accepted length does not depend on the batch size; T = 0 also sweeps 1..32 for the speedup
  [ "$t" = 0 ] && sizes=$SWEEP
  ds 560 eval -c "$(recipe "$recipe_algo")" $(common) "${what[@]}" --output "eval/$algo-t$t" --batch-size "$sizes" \
    --max-prompts "$EVAL_CAP" --set "evaluation.temperature=$t" --set "evaluation.max_new_tokens=$EVAL_TOKENS" \
    --set "evaluation.num_proposals=$PROPOSALS" --set evaluation.thinking=false --no-progress --device "$DEVICE" \
    --set "evaluation.batched_drafter=${BATCHED_DRAFTER:-true}" || [ $? = 3 ]
  local keep=("$RUN/eval/$algo-t$t" "$RUN/commands/$STAGE_NAME.sh" "$RUN/machine.txt")
  [ "$algo" = ngram ] || keep+=("$RUN/runs/smollm2/$algo/metrics.jsonl" "$RUN/runs/smollm2/$algo/selection.json")
  bring_back "$STAGE_NAME" "${keep[@]}"
}

# ------------------------------------------------------------------------------------------- there: background
# The whole run as one background process (`start`), so that no GPU time is lost between device calls and
# no stage has to fit one call: each later call runs `collect S`, which waits up to S seconds and brings
# back, as one bundle, every archive finished since the last collect. Phases: regeneration (a slot; the
# rest of the set is left in the journal for a later session) -> the three drafts trained side by side
# (host-bound processes share the GPU; each re-plans its steps to the slot) with the CUDA-graph check
# beside them -> selection -> the nine benchmarks at T = 0 and T = 1 for every draft and the n-gram floor
# side by side -> the speedup sweep of the best draft, alone on the GPU (wall-clock figures).
PIPE=$REAL/pipeline
start() {
  device_env
  mkdir -p "$PIPE/done" "$PIPE/sent"
  snapshot
  (cd "$REAL/snap" && setsid nohup bash bench/real_target.sh pipeline >"$OLDPWD/$PIPE/pipeline.log" 2>&1 </dev/null &
   echo "pipeline started (pid $!): bash bench/real_target.sh collect SECONDS in the next calls")
}

# The pipeline runs from a private copy of the code ($REAL/snap): every later device call copies the working
# tree over the repo root, and a stage started after that must not run other code than the run began with.
# $REAL is linked into the copy, so every path of the run stays the same.
snapshot() {
  local snap=$REAL/snap top=${REAL%%/*}
  rm -rf "$snap" && mkdir -p "$snap"
  cp -r deepspec bench configs "$snap/"
  ln -s "$PWD/$top" "$snap/$top"
}

pipeline() {
  device_env
  OUT=$PWD/$PIPE/done
  trap 'touch "$PIPE/exited"' EXIT  # collect stops waiting (finished or not)
  phase() { echo "$(date -u +%T) $*" | tee -a "$PIPE/phases.log"; }
  phase "regen ($PIPE_REGEN_S s, $REGEN_SERVERS servers)"
  (REGEN_BUDGET_S=$PIPE_REGEN_S regen) >"$RUN/logs/regen.log" 2>&1 || {
    phase "regen failed"; bring_back logs "$RUN/logs"; exit 1; }
  phase "train eagle3 dflash dspark ($PIPE_TRAIN_MIN min each, side by side) + decode_gpu check"
  local algo pids=() batched=true
  for algo in eagle3 dflash dspark; do
    TRAIN_BUDGET_S=$((PIPE_TRAIN_MIN * 60 + 240)) train_in_slot "$algo" >"$RUN/logs/train-$algo.log" 2>&1 &
    pids+=($!)
  done
  if [ "$DEVICE" = cuda ]; then
    $PY bench/decode_gpu.py check >"$RUN/logs/decode_gpu_check.log" 2>&1 || batched=false
  else
    echo "no CUDA: the CUDA-graph check does not apply" >"$RUN/logs/decode_gpu_check.log"
  fi
  wait "${pids[@]}" || true
  phase "decode_gpu check: batched drafters usable=$batched"
  bring_back decode-gpu-check "$RUN/logs/decode_gpu_check.log" "$RUN"/logs/train-*.log
  phase "select (side by side)"
  pids=()
  for algo in eagle3 dflash dspark; do select_ckpt "$algo" >"$RUN/logs/select-$algo.log" 2>&1 & pids+=($!); done
  wait "${pids[@]}" || true
  local evaluated=(eagle3 dflash dspark)
  [ "$PIPE_NGRAM" = 1 ] && evaluated+=(ngram)
  phase "eval: ${evaluated[*]} at T = 0 and T = 1 (side by side, batch 32)"
  pids=()
  for algo in "${evaluated[@]}"; do
    for t in 0 1; do
      SWEEP=32 BATCHED_DRAFTER=$batched evaluate "$algo" "$t" >"$RUN/logs/eval-$algo-t$t.log" 2>&1 & pids+=($!)
    done
  done
  wait "${pids[@]}" || true
  local best
  best=$($PY - "$RUN/eval" <<'EOF'
import json, sys
from pathlib import Path
macro = {}
for algo in ("eagle3", "dflash", "dspark"):
    p = Path(sys.argv[1]) / f"{algo}-t0" / "report.json"
    if p.is_file():
        macro[algo] = json.loads(p.read_text())["macro"]["tau"]
print(max(macro, key=macro.get) if macro else "")
EOF
) || best=""
  if [ -n "$best" ]; then
    phase "sweep of the best draft ($best) alone: $SWEEP_CAP prompts per benchmark, batch $SWEEP"
    BATCHED_DRAFTER=$batched sweep "$best" >"$RUN/logs/sweep-$best.log" 2>&1 || true
  fi
  bring_back logs "$RUN/logs" "$PIPE/phases.log"
  if [ "$PIPE_SPEED" = 1 ] && [ "$DEVICE" = cuda ]; then
    phase "decode_gpu speed alone (random weights of the real shapes: round and step times)"
    local speed=$RUN/speed
    mkdir -p "$speed"
    STAGE_NAME=speed record $PY bench/decode_gpu.py speed --out "$speed/decode_speed.json"
    timeout 560 $PY bench/decode_gpu.py speed --out "$speed/decode_speed.json" >"$speed/decode_speed.log" 2>&1 || true
    bring_back speed "$speed" "$PIPE/phases.log"
  fi
  phase finished
  touch "$PIPE/finished"
}

# train ALGO within the pipeline's slot (training.time_budget_minutes re-plans the steps to it)
train_in_slot() {
  EXTRA+=(--set "training.time_budget_minutes=$PIPE_TRAIN_MIN")
  train "$1"
}

# sweep ALGO: the T = 0 speedup against batch size, alone on the GPU; its table joins the T = 0 report
sweep() {
  local algo=$1 report=$RUN/eval/$1-t0
  STAGE_NAME=sweep-$algo
  device_env
  ds 560 eval -c "$(recipe "$algo")" $(common) --checkpoint "runs/smollm2/$algo/selected" --output "eval/$algo-sweep" \
    --batch-size "$SWEEP" --max-prompts "$SWEEP_CAP" --set evaluation.temperature=0 \
    --set "evaluation.max_new_tokens=$EVAL_TOKENS" --set "evaluation.num_proposals=$PROPOSALS" \
    --set evaluation.thinking=false --set "evaluation.batched_drafter=${BATCHED_DRAFTER:-true}" --no-progress \
    --device "$DEVICE" || [ $? = 3 ]
  cp "$RUN/eval/$algo-sweep/batch_sweep.json" "$RUN/eval/$algo-sweep/speedup_vs_batch.png" "$report/"
  bring_back "$STAGE_NAME" "$RUN/eval/$algo-sweep" "$report" "$RUN/commands/$STAGE_NAME.sh"
}

# collect S: wait up to S seconds for the pipeline to finish, then bring back every archive made since the
# last collect as one bundle (and print the phase log); the next call collects the rest.
collect() {
  local budget=$1 t0=$SECONDS
  [ -d "$PIPE" ] || die "no pipeline on this machine (a fresh machine: start it again)"
  while [ $((SECONDS - t0)) -lt "$budget" ] && [ ! -e "$PIPE/exited" ]; do sleep 5; done
  local out=${OUT:?run this stage through the device tool (OUT unset)} new name
  new=$(ls "$PIPE/done")
  cat "$PIPE/phases.log" 2>/dev/null || true
  if [ -n "$new" ]; then
    name=bundle-$(date -u +%H%M%S)
    (cd "$PIPE/done" && tar cf "$out/$name.tar" $new && mv $new ../sent/)
    if [ "$(stat -c %s "$out/$name.tar")" -gt $((15 * 1024 * 1024)) ]; then
      split -b 15M -d "$out/$name.tar" "$out/$name.tar.part-" && rm "$out/$name.tar"
    fi
  fi
  ls -la "$out"
  if [ -e "$PIPE/finished" ]; then echo "pipeline finished"
  elif [ -e "$PIPE/exited" ]; then echo "pipeline FAILED:"; tail -20 "$PIPE/pipeline.log"
  else echo "pipeline still running:"; tail -5 "$PIPE/pipeline.log"; fi
}

# ------------------------------------------------------------------------------------------- here: smoke
# The device stages on a tiny random target and nine tiny benchmarks, on this CPU, with a tiny budget; then the
# archives are unpacked into a fresh run folder and compared, as after real device calls. Checks this script.
smoke() {
  REAL=.real/smoke RUN=.real/smoke/run STATE=.real/smoke/state DOCS=.real/smoke/docs OUT=$PWD/.real/smoke/out
  PIPE=$REAL/pipeline REGEN_SERVERS=2 PIPE_TRAIN_MIN=2 SWEEP_CAP=1
  TARGET=$REAL/dev/tiny DEVICE=cpu PY=$PWD/.venv/bin/python
  HOLDOUT=4 KEEP=4 SAVE_EVERY=1 SELECT_PROMPTS=4 SELECT_TOKENS=12 EVAL_CAP=1 EVAL_TOKENS=12 SWEEP=1,2 REGEN_CONCURRENCY=4
  REGEN_SAMPLING=(--set regeneration.sampling.temperature=0.7 --set regeneration.sampling.max_tokens=16
                  --set regeneration.sampling.seed=0)
  EXTRA=(--set data.max_length=128 --set training.max_steps=4 --set training.global_batch_size=4
         --set training.micro_batch_size=4 --set training.precision=fp32 --set training.log_every=1)
  rm -rf "$REAL" && mkdir -p "$REAL/dev/eval" "$OUT"
  $PY - "$REAL/dev" <<'EOF'
import json, sys
from deepspec.config import DEFAULT_BENCHMARK_CAPS
from deepspec.testing.tiny import save_tiny_target
dev = sys.argv[1]
save_tiny_target(f"{dev}/tiny")
words = ["add", "two", "and", "three", "name", "a", "colour", "count", "to", "four", "say", "the", "cat", "sat"]
with open(f"{dev}/prompts.jsonl", "w") as f:
    for i in range(24):
        q = " ".join(words[(i * 3 + j) % len(words)] for j in range(3 + i % 4))
        f.write(json.dumps({"id": f"smoke-{i}", "conversations": [{"role": "user", "content": q}]}) + "\n")
for name in DEFAULT_BENCHMARK_CAPS:  # the nine benchmark names, two short prompts each
    with open(f"{dev}/eval/{name}.jsonl", "w") as f:
        f.write(json.dumps({"turns": [f"{name}: add two and two"]}) + "\n" + json.dumps({"turns": ["say the cat"]}) + "\n")
EOF
  touch "$REAL/ready" && mkdir -p "$RUN" "$PIPE/done" "$PIPE/sent" && echo "smoke: $(uname -m) CPU" >"$RUN/machine.txt"
  snapshot                         # `start` runs the pipeline detached (setsid); here in the foreground
  (cd "$REAL/snap" && pipeline) || true
  collect 0
  rm -rf "$RUN"                    # as on a fresh machine: only what came back in the archives
  unpack "$OUT"
  compare
}

# ------------------------------------------------------------------------------------------- here: unpack, compare
unpack() {
  local dir=$1 f
  mkdir -p "$STATE"
  for f in "$dir"/bundle-*.tar "$dir"/bundle-*.tar.part-00; do  # collect's bundles hold the stages' archives
    [ -e "$f" ] || continue
    if [[ $f == *.part-00 ]]; then cat "${f%00}"* | tar x -C "$dir"; else tar xf "$f" -C "$dir"; fi
  done
  for f in "$dir"/*.tgz "$dir"/*.tgz.part-00; do
    [ -e "$f" ] || continue
    local name; name=$(basename "${f%.part-00}")
    if [[ $f == *.part-00 ]]; then cat "${f%00}"* >"$STATE/$name"; else cp "$f" "$STATE/$name"; fi
    tar xzf "$STATE/$name"
    echo "unpacked $name"
  done
  # the pipeline ran from its code copy (snapshot): reports name the run folder, not the copy's link to it
  find "$RUN" \( -name report.json -o -name summary.json -o -name report.md -o -name selection.json -o -name "*.manifest.json" -o -name "*.summary.json" \) \
    -exec sed -i "s#/$REAL/snap/$REAL/#/$REAL/#g" {} +
}

compare() {
  local reports=() r
  for r in eagle3 dflash dspark ngram; do
    for t in 0 1; do [ -f "$RUN/eval/$r-t$t/report.json" ] && reports+=("$RUN/eval/$r-t$t"); done
  done
  [ ${#reports[@]} -gt 0 ] || die "no report under $RUN/eval: unpack the eval stages' archives first"
  local cmds=$RUN/commands.all.sh
  : >"$cmds"
  for s in setup regen train-eagle3 train-dflash train-dspark select-eagle3 select-dflash select-dspark \
           eval-eagle3-t0 eval-eagle3-t1 eval-dflash-t0 eval-dflash-t1 eval-dspark-t0 eval-dspark-t1 eval-ngram-t0 eval-ngram-t1 sweep-eagle3 sweep-dflash sweep-dspark; do
    [ -f "$RUN/commands/$s.sh" ] && { echo "# $s"; awk '!seen[$0]++' "$RUN/commands/$s.sh"; } >>"$cmds"
  done
  local py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
  local notes=()  # the hand-written interpretation, when there is one (docs/results_notes.md)
  [ -f "$DOCS/results_notes.md" ] && notes=(--notes "$DOCS/results_notes.md")
  $py -m deepspec eval --compare "${reports[@]}" --output "$DOCS" --commands "$cmds" \
    --machine "$(cat "$RUN/machine.txt" 2>/dev/null || echo unknown)" "${notes[@]}"
  if [ -f "$RUN/runs/smollm2/regenerated.manifest.json" ]; then
    cp "$RUN/runs/smollm2/regenerated.manifest.json" "$DOCS/results_data_manifest.json"
  fi
  echo "$DOCS/results.md written from ${#reports[@]} report(s)"
}

case "${1:-}" in
  prepare) prepare ;;
  load) load "${2:?chunk number}" ;;
  regen) regen ;;
  start) start ;;
  pipeline) pipeline ;;
  collect) collect "${2:?seconds to wait}" ;;
  sweep) sweep "${2:?eagle3|dflash|dspark}" ;;
  train) train "${2:?eagle3|dflash|dspark}" ;;
  select) select_ckpt "${2:?eagle3|dflash|dspark}" ;;
  eval) evaluate "${2:?eagle3|dflash|dspark|ngram}" "${3:?temperature 0 or 1}" ;;
  ngram) evaluate ngram "${2:?temperature 0 or 1}" ;;
  unpack) unpack "${2:?folder of files brought back}" ;;
  compare) compare ;;
  smoke) smoke ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac

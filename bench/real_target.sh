#!/usr/bin/env bash
# Issue 13: real results on a real target (SmolLM2-135M-Instruct), every stage, on one H200 lent through the
# device tool in calls of at most 10 minutes. How to run it, stage by stage: bench/README.md, section
# "Real results on a real target". The document it ends with is docs/results.md (generated, never edited).
#
# Here (the development machine):       bash bench/real_target.sh prepare | unpack DIR | compare
# There (each device call, repo root):   bash bench/real_target.sh load K [&& bash bench/real_target.sh STAGE ...]
#   stages: regen | train ALGO | select ALGO | eval ALGO T | ngram T        (ALGO: eagle3 | dflash | dspark)
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
SAVE_EVERY=${SAVE_EVERY:-300}      # 16,123 - 256 prompts x 3 epochs / 32 per step = ~1,490 steps -> 5 checkpoints
SELECT_PROMPTS=${SELECT_PROMPTS:-64}
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
REGEN_BATCH=${REGEN_BATCH:-128}         # rows the embedded server decodes together
REGEN_CONCURRENCY=${REGEN_CONCURRENCY:-256}

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
  local port=${PORT:-30000}
  $PY -m deepspec serve --model "$TARGET" --served-model-name smollm2 --port $port \
    --device "$DEVICE" --max-batch-size "$REGEN_BATCH" >"$RUN/logs/serve.log" 2>&1 &
  REGEN_SERVER=$!
  trap 'kill "${REGEN_SERVER:-}" 2>/dev/null || true' EXIT
  local health="import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)"
  for _ in $(seq 300); do $PY -c "$health" 2>/dev/null && break; sleep 1; done
  $PY -c "$health" 2>/dev/null || { tail -50 "$RUN/logs/serve.log"; die "the server did not start"; }
  record python3 -m deepspec serve --model "$TARGET" --served-model-name smollm2 --port $port \
    --device "$DEVICE" --max-batch-size "$REGEN_BATCH" "&"
  local t0=$SECONDS rc=0
  ds "$REGEN_BUDGET_S" regenerate -c "$(recipe eagle3)" $(common) "${REGEN_SAMPLING[@]}" \
    --set "regeneration.concurrency=$REGEN_CONCURRENCY" --endpoint "http://127.0.0.1:$port/v1" --quiet || rc=$?
  kill "$REGEN_SERVER" 2>/dev/null || true
  echo "regenerate: exit $rc after $((SECONDS - t0)) s"
  if [ "$rc" = 0 ]; then
    $PY - "$out" "$REAL/dev/prompts.jsonl" <<'EOF' | tee "$out.manifest.json"
import hashlib, json, sys
base, prompts = sys.argv[1], sys.argv[2]
summary = json.load(open(base + ".summary.json"))
sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
rows = [json.loads(x) for x in open(base + ".jsonl")]
status = {s: sum(r["status"] == s for r in rows) for s in ("ok", "truncated", "error", "skipped")}
print(json.dumps({"file": base + ".jsonl", "sha256": sha(base + ".jsonl"), "input_sha256": sha(prompts),
                  "records": len(rows), "status": status, "truncation_rate": status["truncated"] / max(len(rows), 1),
                  "provenance": rows[0].get("provenance"), "summary": summary}, indent=2))
EOF
    bring_back regen "$out.jsonl" "$out.summary.json" "$out.errors.jsonl" "$out.manifest.json" "$RUN/commands/regen.sh" "$RUN/machine.txt"
  else
    echo "not finished: call 'regen' again (carry $STATE); the journal resumes where this call stopped"
    bring_back regen "$out".journal* "$RUN/commands/regen.sh"
  fi
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
    --set evaluation.temperature=0 --set evaluation.max_new_tokens=256 --set "evaluation.num_proposals=$PROPOSALS" \
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
    || [ $? = 3 ]
  local keep=("$RUN/eval/$algo-t$t" "$RUN/commands/$STAGE_NAME.sh" "$RUN/machine.txt")
  [ "$algo" = ngram ] || keep+=("$RUN/runs/smollm2/$algo/metrics.jsonl" "$RUN/runs/smollm2/$algo/selection.json")
  bring_back "$STAGE_NAME" "${keep[@]}"
}

# ------------------------------------------------------------------------------------------- here: smoke
# The device stages on a tiny random target and nine tiny benchmarks, on this CPU, with a tiny budget; then the
# archives are unpacked into a fresh run folder and compared, as after real device calls. Checks this script.
smoke() {
  REAL=.real/smoke RUN=.real/smoke/run STATE=.real/smoke/state DOCS=.real/smoke/docs OUT=$PWD/.real/smoke/out
  TARGET=$REAL/dev/tiny DEVICE=cpu PY=.venv/bin/python PORT=$((30000 + RANDOM % 20000))
  HOLDOUT=4 KEEP=4 SAVE_EVERY=1 SELECT_PROMPTS=4 EVAL_CAP=1 EVAL_TOKENS=12 SWEEP=1,2 REGEN_BATCH=4 REGEN_CONCURRENCY=4
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
  touch "$REAL/ready" && mkdir -p "$RUN" && echo "smoke: $(uname -m) CPU" >"$RUN/machine.txt"
  regen
  train eagle3
  select_ckpt eagle3
  evaluate eagle3 0
  evaluate ngram 0
  evaluate ngram 1
  rm -rf "$RUN"                    # as on a fresh machine: only what came back in the archives
  unpack "$OUT"
  compare
}

# ------------------------------------------------------------------------------------------- here: unpack, compare
unpack() {
  local dir=$1 f
  mkdir -p "$STATE"
  for f in "$dir"/*.tgz "$dir"/*.tgz.part-00; do
    [ -e "$f" ] || continue
    local name; name=$(basename "${f%.part-00}")
    if [[ $f == *.part-00 ]]; then cat "${f%00}"* >"$STATE/$name"; else cp "$f" "$STATE/$name"; fi
    tar xzf "$STATE/$name"
    echo "unpacked $name"
  done
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
           eval-eagle3-t0 eval-eagle3-t1 eval-dflash-t0 eval-dflash-t1 eval-dspark-t0 eval-dspark-t1 eval-ngram-t0 eval-ngram-t1; do
    [ -f "$RUN/commands/$s.sh" ] && { echo "# $s"; awk '!seen[$0]++' "$RUN/commands/$s.sh"; } >>"$cmds"
  done
  local py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
  $py -m deepspec eval --compare "${reports[@]}" --output "$DOCS" --commands "$cmds" \
    --machine "$(cat "$RUN/machine.txt" 2>/dev/null || echo unknown)"
  if [ -f "$RUN/runs/smollm2/regenerated.manifest.json" ]; then
    cp "$RUN/runs/smollm2/regenerated.manifest.json" "$DOCS/results_data_manifest.json"
  fi
  echo "$DOCS/results.md written from ${#reports[@]} report(s)"
}

case "${1:-}" in
  prepare) prepare ;;
  load) load "${2:?chunk number}" ;;
  regen) regen ;;
  train) train "${2:?eagle3|dflash|dspark}" ;;
  select) select_ckpt "${2:?eagle3|dflash|dspark}" ;;
  eval) evaluate "${2:?eagle3|dflash|dspark|ngram}" "${3:?temperature 0 or 1}" ;;
  ngram) evaluate ngram "${2:?temperature 0 or 1}" ;;
  unpack) unpack "${2:?folder of files brought back}" ;;
  compare) compare ;;
  smoke) smoke ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac

#!/usr/bin/env bash
# GPU-machine scaffolding, not a benchmark: the stages of one lease on a rented GPU machine (the device tool runs one
# stage per call; the machine stays warm between back-to-back calls, so /tmp/rs, /tmp/runs and /tmp/exp carry
# over). Every stage sources bench/gpu_machine_env.sh, which installs the carried packages and, once all four parts
# have arrived, onnxruntime-gpu. The benchmarks it drives are bench/*.py (and, for the finished probes, experiments/);
# docs/benchmarks.md records each session's commands as they ran (under this file's old name, bench/gpu_session.sh).
#
#   bash bench/gpu_machine_session.sh train      real-shape model + recipe (stock TRL) vs default.yaml and lowmem.yaml, same run
#   bash bench/gpu_machine_session.sh train2     default with peft's DoRA forward, and lowmem.yaml
#   bash bench/gpu_machine_session.sh e2e-train  verify + a few QDoRA DPO steps through `smolbox train`; transformers serving
#   bash bench/gpu_machine_session.sh e2e-serve  `smolbox export` of that run, one HTTP request, experiments/vision_bench.py
#   bash bench/gpu_machine_session.sh export     the same with export.source=base (when no run exists)
#   bash bench/gpu_machine_session.sh serve-bench  bench/serve_bench.py on that export: ORT variants, HTTP at 8 and 32 clients
#   bash bench/gpu_machine_session.sh batching     base export (q4f16), HTTP static vs continuous batching
#   bash bench/gpu_machine_session.sh train3       recipe, default.yaml and default.yaml with precomputed reference log-probs
#   bash bench/gpu_machine_session.sh export-bench bench/export_bench.py at full size: merge, fp32/fp16 graphs, q4, q4f16, int8
#   bash bench/gpu_machine_session.sh probe        its parity; ORT q4f16 with and without the fpA_intB kernels (session
#                                          config, and weights prepacked in the file), GPU kernel profiles
#   bash bench/gpu_machine_session.sh train4       default.yaml and lowmem.yaml (reference log-probs precomputed) and default without
#   bash bench/gpu_machine_session.sh export-base  smolbox export of the base model: EXPORT_VARIANTS (fp32 + q4f16; the
#                                          serving stages read q4f16 only: EXPORT_VARIANTS="[q4f16]" saves ~1 minute), parity on 1 prompt
#   bash bench/gpu_machine_session.sh serve4       ORT q4f16 TTFT / decode / kernel profile, then HTTP at 8 and 32 clients, 256 tokens
#   bash bench/gpu_machine_session.sh scale        default.yaml on 1 GPU and on every GPU of the host, global batch 32, side by side
#   bash bench/gpu_machine_session.sh serve5       engine v2 on the base export (q4f16): the KV-slot decoder with and without its
#                                          CUDA graph (bench/kv_slots_bench.py), TTFT and decode against transformers,
#                                          then HTTP at 32 clients x 256 tokens, the published decoder and the slot one
#   bash bench/gpu_machine_session.sh train5       issue #16, compiled blocks with the checkpoint outside: default against
#                                          default:compile, STEPS (50) steps of GLOBAL_BATCH (16) pairs: loss curves
#                                          side by side (max |dloss|), speed and peak memory; ~8 min when /tmp/rs exists
#                                          (run `prepare` first on a fresh machine; cut STEPS if the call runs short)
#   bash bench/gpu_machine_session.sh train6       lowmem, lowmem:compile and default:norm-cache (or TRAIN_VARIANTS), STEPS (5) steps each
#   bash bench/gpu_machine_session.sh train7a      issue #16: default, STEPS (50) steps of GLOBAL_BATCH (16) pairs, the curve kept in
#                                          /tmp/keep for train7b, after bench/train_profile.py of default with train.compile
#   bash bench/gpu_machine_session.sh train7b      (the next call) default:compile (or TRAIN_VARIANTS) against train7a's curve
#   bash bench/gpu_machine_session.sh train8a      issue #16: bench/attention_bench.py, then default:compile against
#                                          default:compile:cudnn, STEPS (15) steps each (train7b with TRAIN_VARIANTS and
#                                          BASELINE=docs/results/2026-12-01-h200-d/lease14_train7a.json for the 50-step curve)
#   bash bench/gpu_machine_session.sh train9       issue #16: default:compile against default:compile:cudnn-vision and
#                                          default:compile:cudnn (rows padded to 64) (or TRAIN_VARIANTS), STEPS (20) steps each
#   bash bench/gpu_machine_session.sh train10      issue #16: bench/train_profile.py of default.yaml with cuDNN attention (or
#                                          PROFILE_SETS): GPU time by kernel kind, the GPU's idle gaps and what the CPU
#                                          did meanwhile, and the Chrome trace (gzipped)
#   bash bench/gpu_machine_session.sh train11      issue #16: a change against the code before it, side by side: TRAIN_VARIANTS
#                                          (default:compile:cudnn), STEPS (16) steps each, first from BEFORE (a folder
#                                          holding the earlier commit's smolbox/, bench/ and configs/, made with `git
#                                          archive <commit> smolbox bench configs | tar -x -C _old`, carried), then from
#                                          this tree with that run's loss curve as --baseline
#   bash bench/gpu_machine_session.sh levers       issue #16: each lever of a change measured on its own, leave one out: TRAIN_VARIANTS
#                                          (default), STEPS (16) steps, from each tree in LEVERS (this one, `.`, and
#                                          _levers/<name>/: a copy of smolbox/, bench/ and configs/ with that lever taken
#                                          back, carried), one JSON each (levers_<name>.json)
#   bash bench/gpu_machine_session.sh e2e-multi    verify, then `smolbox train` on every GPU through the image's entrypoint
#                                          (torchrun) and through accelerate launch, a few steps each
#   bash bench/gpu_machine_session.sh serve6       (after export-base) engine v2 with its graphs captured at load and batched
#                                          prefill: bench/kv_slots_bench.py, then HTTP 32 clients x 256 tokens, 20 s
#                                          each: the published decoder without image cache, the default server, and the
#                                          default with a prefill budget of 8192 tokens a step (several newcomers a call)
#   bash bench/gpu_machine_session.sh serve7       (after export-base) the default server (preprocessing in threads) against
#                                          serve.preprocess_workers=4 and 8, HTTP 32 clients x 256 tokens, 20 s each, the
#                                          engine thread's time by phase; py-spy of the default server (a carried wheel)
#   bash bench/gpu_machine_session.sh serve8       (after export-base) the decoder's ArgMax and the prompt cache: kv_slots_bench,
#                                          then HTTP 32 clients x 256 tokens, prompt_cache_mb=0 and default, each with the
#                                          same prompt for every request and a numbered question each (SERVE_SETS)
#   bash bench/gpu_machine_session.sh serve9       (after export-base) the tile cache and serve.prefill_dequantized: kv_slots_bench
#                                          with the dequantized-prefill runtime, HTTP default / prefill_dequantized=true,
#                                          same and distinct prompts
#   bash bench/gpu_machine_session.sh ttft         (after export-base) where a new image prompt's time to first token goes:
#                                          kv_slots_bench --profile (GPU kernels of the one-row prefill), with the
#                                          dequantized prefill and the decoder's attention kernels (serve.attention_kernel)
#   bash bench/gpu_machine_session.sh vision       (after export-base) experiments/vision_variants.py: the vision encoder's
#                                          graph and attention-kernel variants
#   bash bench/gpu_machine_session.sh serve11      (after export-base) TTFT and batch-1 decode of ORT q4f16 and transformers bf16
#                                          side by side, then HTTP 32 clients x 256 tokens, 20 s each: default,
#                                          overlap_rows, prefill_dequantized and preprocess_workers=8 combined (SERVE_SETS),
#                                          same and distinct prompts
#   bash bench/gpu_machine_session.sh serve-soak   (after export-base) the default server (or SERVE_SETS) under 32 clients x
#                                          256 tokens for SOAK_SECONDS (300), the same prompt (or PROMPTS), its GPU
#                                          memory and RSS read 10 times (first, last, max)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_machine_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/card.txt"
[ -d /tmp/rs/model ] || [ "${1:-}" = parts ] || python -m bench.real_shapes --out /tmp/rs --device cuda 2>&1 | tail -1
REAL=(--config default --model.id /tmp/rs/model --data.id /tmp/rs/data --data.train_split train --data.eval_split null
      --run.output_dir /tmp/runs --run.name e2e --run.min_free_disk_gb 0 --env-file "")
VARIANTS="[fp32, fp16, q4f16, q4]"
EB=(--model /tmp/rs/model --out /tmp/exp --variants fp32 fp16 q4 q4f16 int8)  # bench/export_bench.py at full size

request() {  # one image question to a running server; prints the answer
  python - "$1" <<'EOF'
import base64, io, json, sys, urllib.request
from bench.serve_bench import image
buf = io.BytesIO(); image().save(buf, format="PNG")
body = {"max_tokens": 24, "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}},
    {"type": "text", "text": "Describe this image in detail."}]}]}
req = urllib.request.Request(sys.argv[1] + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    answer = json.loads(r.read())
print("HTTP answer:", json.dumps({"usage": answer["usage"], "finish_reason": answer["choices"][0]["finish_reason"],
                                  "text": answer["choices"][0]["message"]["content"][:120]}))
EOF
}

case "${1:?stage}" in
  parts|prepare) ;;  # carry an onnxruntime-gpu part (gpu_machine_env.sh above); prepare also builds /tmp/rs
  train)  # default.yaml and lowmem.yaml compile their blocks in step 1: STEPS (16) steps each, the recipe 8
    python -m bench.train_bench --root /tmp/rs --steps 8 --variants recipe --json "$OUT/train_recipe.json" 2>&1 | tail -4
    python -m bench.train_bench --root /tmp/rs --steps "${STEPS:-16}" --variants default lowmem --baseline "$OUT/train_recipe.json" \
      --json "$OUT/train_default.json" 2>&1 | grep -vE "Warn|warn" | tail -9
    ;;
  train2)
    python -m bench.train_bench --root /tmp/rs --steps 5 --variants default:peft-dora lowmem --json "$OUT/train2.json" 2>&1 | tail -5
    ;;
  e2e-train)
    python -m smolbox verify "${REAL[@]}" 2>&1 | tail -20
    python -m smolbox train "${REAL[@]}" --train.max_steps 2 --train.save_steps 2 --train.logging_steps 1 2>&1 | tail -6
    cp /tmp/runs/e2e/manifest.json "$OUT/e2e_run_manifest.json"; cp /tmp/runs/e2e/metrics.jsonl "$OUT/e2e_metrics.jsonl"
    python -m bench.serve_bench --export /tmp/rs/model --hf-model /tmp/rs/model --ort-variants --hf bf16 nf4 --clients \
      --json "$OUT/serve_hf.json" 2>&1 | tail -4
    ;;
  e2e-serve|export)
    if [ "$1" = e2e-serve ]; then
      python -m smolbox export "${REAL[@]}" --export.output_dir /tmp/exp --export.variants "$VARIANTS" 2>&1 | grep -E "export:|Error|error" | tail -20
      folder=/tmp/exp/e2e
    else
      python -m smolbox export "${REAL[@]}" --export.source base --export.name base --export.output_dir /tmp/exp \
        --export.variants "$VARIANTS" 2>&1 | grep -E "export:|Error|error" | tail -20
      folder=/tmp/exp/base
    fi
    cp "$folder/parity.json" "$OUT/parity.json"; python -c "import json,sys; m=json.load(open('$folder/manifest.json')); json.dump({k: m[k] for k in ('timings_s','variants','decoder','source')}, open('$OUT/export_manifest.json','w'), indent=1)"
    port=8123
    python -m smolbox serve --config default --env-file '' --serve.model "$folder" --serve.port $port >"$OUT/serve_one.log" 2>&1 &
    server=$!
    for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
    curl -s "http://127.0.0.1:$port/health"; echo
    request "http://127.0.0.1:$port"
    kill -TERM $server; wait $server
    python -m experiments.vision_bench --model "$folder" --dtypes fp16 fp32 --q4 --json "$OUT/vision.json" 2>&1 | grep -v Warn | tail -8
    ;;
  batching)  # fresh machine: base export (q4f16), then HTTP with static against continuous batching, side by side
    python -m smolbox export "${REAL[@]}" --export.source base --export.name base --export.output_dir /tmp/exp \
      --export.variants "${EXPORT_VARIANTS:-[fp32, q4f16]}" --export.parity_prompts 1 --export.parity_new_tokens 4 2>&1 | grep -E "export:|Error" | tail -12
    python -m bench.serve_bench --export /tmp/exp/base --ort-variants --hf --http-variant q4f16 --clients 8 32 --seconds 15 \
      --max-tokens 256 --batching static continuous --json "$OUT/serve_batching.json" 2>&1 | grep -E "^HTTP|Error"
    ;;
  train3)
    python -m bench.train_bench --root /tmp/rs --steps 8 --variants recipe --json "$OUT/train_recipe.json" 2>&1 | tail -4
    python -m bench.train_bench --root /tmp/rs --steps 5 --variants default default:precompute --json "$OUT/train_default.json" 2>&1 | tail -5
    ;;
  export-bench)
    python -m bench.export_bench "${EB[@]}" --phase graphs 2>&1 | grep -E "export_bench:|Error|error" | tail -12
    python -m bench.export_bench "${EB[@]}" --phase variants 2>&1 | grep -E "export_bench:|Error|error|sizes" | tail -12
    cp /tmp/exp/bench.json "$OUT/export_bench.json"
    ;;
  probe)
    python -m bench.export_bench "${EB[@]}" --phase parity 2>&1 | grep -vE "Warn|warn" | tail -16
    cp /tmp/exp/bench.json "$OUT/export_bench.json"
    python -m experiments.prepack_probe --export /tmp/exp/real.work --out /tmp/exp/prepacked 2>&1 | grep -v Warn | tail -3
    python -m bench.serve_bench --export /tmp/exp/real.work --ort-variants q4f16 --hf --clients --batch 32 --profile-kernels \
      --session-configs default ep.cuda.fpa_intb_gemm=1 --json "$OUT/serve_probe.json" 2>&1 | grep -vE "Warn|warn" | tail -70
    python -m bench.serve_bench --export /tmp/exp/prepacked --ort-variants q4f16 --hf --clients --batch 32 --profile-kernels \
      --json "$OUT/serve_prepacked.json" 2>&1 | grep -vE "Warn|warn" | tail -36
    ;;
  train4)
    python -m bench.train_bench --root /tmp/rs --steps 5 --variants default default:no-precompute lowmem --json "$OUT/train4.json" 2>&1 | tail -6
    ;;
  export-base)
    python -m smolbox export "${REAL[@]}" --export.source base --export.name base --export.output_dir /tmp/exp \
      --export.variants "${EXPORT_VARIANTS:-[fp32, q4f16]}" --export.parity_prompts 1 --export.parity_new_tokens 4 2>&1 | grep -E "export:|Error" | tail -12
    ;;
  serve4)
    python -m bench.serve_bench --export /tmp/exp/base --ort-variants q4f16 --hf --batch 32 --profile-kernels --http-variant q4f16 \
      --clients 8 32 --seconds 15 --max-tokens 256 --json "$OUT/serve4.json" 2>&1 | grep -vE "Warn|warn" | tail -40
    ;;
  scale)
    n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
    python -m bench.train_bench --root /tmp/rs --steps "${STEPS:-4}" --global-batch 32 --variants default@1 "default@$n" \
      --json "$OUT/train_scale.json" 2>&1 | grep -vE "Warn|warn" | tail -8
    ;;
  train5)
    python -m bench.train_bench --root /tmp/rs --steps "${STEPS:-50}" --global-batch "${GLOBAL_BATCH:-16}" \
      --variants default default:compile --json "$OUT/train5.json" 2>&1 | grep -vE "Warn|warn" | tail -9
    ;;
  train6)
    # shellcheck disable=SC2086  # TRAIN_VARIANTS: a space-separated list (VARIANTS above is the export's)
    python -m bench.train_bench --root /tmp/rs --steps "${STEPS:-5}" --variants ${TRAIN_VARIANTS:-lowmem lowmem:compile default:norm-cache} \
      --json "$OUT/${JSON:-train6}.json" 2>&1 | grep -vE "Warn|warn" | tail -10
    ;;
  train7a)
    # issue #16, eager rounding in the compiled blocks, first call: the eager curve (kept on the machine for train7b),
    # then where a compiled step's GPU time goes
    python -m bench.train_profile --root /tmp/rs --micro-batch 16 --set train.compile=true \
      --out "$OUT/profile_compile.txt" --json "$OUT/profile_compile.json" 2>&1 | tail -16
    mkdir -p /tmp/keep
    python -m bench.train_bench --root /tmp/rs --steps "${STEPS:-50}" --global-batch "${GLOBAL_BATCH:-16}" \
      --variants default --json /tmp/keep/train7a.json 2>&1 | grep -vE "Warn|warn" | tail -5
    cp /tmp/keep/train7a.json "$OUT/"
    ;;
  train7b)
    # second call: the compiled blocks (eager rounding, the default of train.compile) against train7a's eager curve
    # shellcheck disable=SC2086
    python -m bench.train_bench --root /tmp/rs --steps "${STEPS:-50}" --global-batch "${GLOBAL_BATCH:-16}" \
      --baseline "${BASELINE:-/tmp/keep/train7a.json}" --variants ${TRAIN_VARIANTS:-default:compile} \
      --json "$OUT/${JSON:-train7b}.json" 2>&1 | grep -vE "Warn|warn" | tail -9
    ;;
  train8a)
    # issue #16, cuDNN attention: the kernels alone (bench/attention_bench.py), then default:compile with and
    # without train.cudnn_attention, STEPS (15) steps each, side by side
    python -m bench.attention_bench --json "$OUT/attention.json" 2>&1 | grep -v "^{" | tail -12
    python -m bench.train_bench --root /tmp/rs --steps "${STEPS:-15}" --global-batch "${GLOBAL_BATCH:-16}" \
      --variants default:compile default:compile:cudnn --json "$OUT/train8a.json" 2>&1 | grep -vE "Warn|warn" | tail -8
    ;;
  train9)
    # issue #16, cuDNN attention: default:compile against cuDNN in the vision tower only and everywhere (packed
    # rows padded to 64 tokens) (or TRAIN_VARIANTS), STEPS (20) steps each, side by side
    # shellcheck disable=SC2086
    python -m bench.train_bench --root /tmp/rs --steps "${STEPS:-20}" --global-batch "${GLOBAL_BATCH:-16}" \
      --variants ${TRAIN_VARIANTS:-default:compile default:compile:cudnn-vision default:compile:cudnn} --json "$OUT/${JSON:-train9}.json" \
      2>&1 | grep -vE "Warn|warn" | tail -8
    ;;
  train10)
    # shellcheck disable=SC2086
    python -m bench.train_profile --root /tmp/rs --micro-batch 16 --set ${PROFILE_SETS:-train.compile=true train.cudnn_attention=all} \
      --out "$OUT/${JSON:-train10}.txt" --json "$OUT/${JSON:-train10}.json" --trace /tmp/trace.json 2>&1 | tail -42
    gzip -c /tmp/trace.json > "$OUT/${JSON:-train10}_trace.json.gz"
    ;;
  train11)
    before=$(realpath "${BEFORE:-_old}")
    # shellcheck disable=SC2086
    (cd "$before" && PYTHONPATH=/tmp/site python -m bench.train_bench --root /tmp/rs --steps "${STEPS:-16}" \
      --global-batch "${GLOBAL_BATCH:-16}" --variants ${TRAIN_VARIANTS:-default:compile:cudnn} \
      --json "$OUT/${JSON:-train11}_before.json" 2>&1 | grep -vE "Warn|warn" | tail -4)
    # shellcheck disable=SC2086
    python -m bench.train_bench --root /tmp/rs --steps "${STEPS:-16}" --global-batch "${GLOBAL_BATCH:-16}" \
      --variants ${TRAIN_VARIANTS:-default:compile:cudnn} --baseline "$OUT/${JSON:-train11}_before.json" \
      --json "$OUT/${JSON:-train11}.json" 2>&1 | grep -vE "Warn|warn" | tail -7
    ;;
  levers)
    # shellcheck disable=SC2086
    for tree in ${LEVERS:-. _levers/*}; do
      name=$(basename "$(realpath "$tree")")
      (cd "$tree" && PYTHONPATH=/tmp/site python -m bench.train_bench --root /tmp/rs --steps "${STEPS:-16}" \
        --variants ${TRAIN_VARIANTS:-default} --json "$OUT/levers_$name.json" 2>&1 | grep -vE "Warn|warn" | tail -4)
    done
    ;;
  e2e-multi)
    n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
    SMOLBOX_GPU_COUNT=$n python -m smolbox verify "${REAL[@]}" 2>&1 | grep -vE "Warn|warn" | tail -20
    steps=(--train.max_steps 2 --train.save_steps 2 --train.logging_steps 1 --train.global_batch_size 32)
    entrypoints/train "${REAL[@]}" --run.name multi "${steps[@]}" >"$OUT/multi.log" 2>&1; echo "entrypoint exit $?"
    accelerate launch --multi_gpu --num_processes "$n" -m smolbox train "${REAL[@]}" --run.name accel "${steps[@]}" \
      >"$OUT/accel.log" 2>&1; echo "accelerate launch exit $?"
    for r in multi accel; do
      python3 -c "import json; m=json.load(open('/tmp/runs/$r/manifest.json')); print('$r', m['status'], m['global_step'], m['distributed'], m['batch'], m.get('peak_memory_gb'))"
      cp "/tmp/runs/$r/metrics.jsonl" "$OUT/${r}_metrics.jsonl"
    done
    tail -n 3 "$OUT/multi.log" "$OUT/accel.log"
    ;;
  serve5)
    python -m bench.kv_slots_bench --export /tmp/exp/base --variant q4f16 --slots 8 --steps 64 --json "$OUT/kv_slots.json" \
      2>&1 | grep -vE "Warn|warn" | tail -6
    python -m bench.serve_bench --export /tmp/exp/base --hf-model /tmp/rs/model --ort-variants q4f16 --hf bf16 --batch 32 \
      --http-variant q4f16 --clients 32 --seconds "${SECONDS_PER_RUN:-20}" --max-tokens 256 --memory-samples 2 \
      --serve-sets kv_slots=false,image_cache_mb=0 image_cache_mb=0 default --json "$OUT/serve5.json" 2>&1 | grep -vE "Warn|warn" | tail -12
    ;;
  serve6)
    python -m bench.kv_slots_bench --export /tmp/exp/base --variant q4f16 --slots 8 --steps 64 --json "$OUT/kv_slots6.json" \
      2>&1 | grep -vE "Warn|warn" | tail -6
    python -m bench.serve_bench --export /tmp/exp/base --ort-variants --hf --http-variant q4f16 --clients 32 \
      --seconds "${SECONDS_PER_RUN:-20}" --max-tokens 256 --memory-samples 2 --serve-sets kv_slots=false,image_cache_mb=0 default \
      max_prefill_tokens_per_step=8192 \
      --json "$OUT/serve6.json" 2>&1 | grep -vE "Warn|warn" | tail -5
    grep -hE "CUDA graphs of the decode step captured" "$OUT"/serve_q4f16.log
    ;;
  serve7)  # (after export-base) issue #13: request preprocessing in worker processes (serve.preprocess_workers) against
           # threads, HTTP 32 clients x 256 tokens, 20 s each, with the engine thread's time by phase; a py-spy profile
           # of the first (default) server's threads, when .devcarry holds a py-spy wheel: who holds the GIL, then all
    spy=$(ls .devcarry/py_spy-*.whl 2>/dev/null | head -1)
    if [ -n "$spy" ] && python3 -m pip install -q --no-deps --no-index --target /tmp/spy "$spy"; then
      (for _ in $(seq 90); do pid=$(pgrep -f "smolbox serve" | head -1); [ -n "$pid" ] && break; sleep 1; done
       sleep 16
       /tmp/spy/bin/py-spy record -p "$pid" -d 6 -r 200 --threads --gil -f raw -o "$OUT/spy_gil.txt" >"$OUT/spy.log" 2>&1
       /tmp/spy/bin/py-spy record -p "$pid" -d 6 -r 200 --threads --idle -f raw -o "$OUT/spy_all.txt" >>"$OUT/spy.log" 2>&1) &
    fi
    python -m bench.serve_bench --export /tmp/exp/base --ort-variants --hf --http-variant q4f16 --clients 32 \
      --seconds "${SECONDS_PER_RUN:-20}" --max-tokens 256 --memory-samples 2 \
      --serve-sets ${SERVE_SETS:-default preprocess_workers=4 preprocess_workers=8} \
      --json "$OUT/serve7.json" 2>&1 | grep -vE "Warn|warn" | tail -9
    wait
    ;;
  serve8)  # (after export-base) issue #13, third round: the decoder's ArgMax and the prompt cache. kv_slots_bench (the
           # device's ArgMax against the host's, decode with and without logits to the host, a prompt-cache reuse
           # against the prefill it replaces), then HTTP 32 clients x 256 tokens, 20 s each: prompt_cache_mb=0 and
           # default, each with the same prompt for every request and with a numbered question each
    [ -n "${SKIP_KV_BENCH:-}" ] || python -m bench.kv_slots_bench --export /tmp/exp/base --variant q4f16 --slots 8 --steps 64 \
      --json "$OUT/kv_slots8.json" 2>&1 | grep -vE "Warn|warn" | tail -6
    python -m bench.serve_bench --export /tmp/exp/base --ort-variants --hf --http-variant q4f16 --clients 32 \
      --seconds "${SECONDS_PER_RUN:-20}" --max-tokens 256 --memory-samples 2 --serve-sets ${SERVE_SETS:-prompt_cache_mb=0 default} \
      --prompts same distinct --json "$OUT/serve8.json" 2>&1 | grep -vE "Warn|warn" | tail -5
    ;;
  serve9)  # (after export-base) issue #13, fourth round: the tile cache (on by default since lease 8) and
           # serve.prefill_dequantized. kv_slots_bench with the dequantized-prefill runtime, then HTTP 32 clients x 256
           # tokens, 20 s each: default and prefill_dequantized=true (or SERVE_SETS), same and distinct prompts
    python -m bench.kv_slots_bench --export /tmp/exp/base --variant q4f16 --slots 8 --steps 64 --prefill-dequantized \
      --json "$OUT/kv_slots9.json" 2>&1 | grep -vE "Warn|warn" | tail -7
    python -m bench.serve_bench --export /tmp/exp/base --ort-variants --hf --http-variant q4f16 --clients 32 \
      --seconds "${SECONDS_PER_RUN:-20}" --max-tokens 256 --memory-samples 2 --serve-sets ${SERVE_SETS:-default prefill_dequantized=true} \
      --prompts same distinct --json "$OUT/serve9.json" 2>&1 | grep -vE "Warn|warn" | tail -9
    ;;
  ttft)  # (after export-base) issue #13: the new-image time to first token, by kernel: kv_slots_bench with --profile,
         # the dequantized-prefill runtime and the decoder's other attention kernels (ATTENTION_KERNELS), 8 slots
    python -m bench.kv_slots_bench --export /tmp/exp/base --variant q4f16 --slots "${SLOTS:-8}" --steps 64 --prefill-dequantized \
      --profile --attention-kernels ${ATTENTION_KERNELS:-2} --json "$OUT/kv_slots_ttft.json" 2>&1 | grep -vE "Warn|warn" \
      | python3 -c 'import json,sys
for line in sys.stdin:
    if not line.startswith("{"): print(line, end=""); continue
    r = json.loads(line); print({k: v for k, v in r.items() if k not in ("kernels", "batched_prefill")})'
    ;;
  vision)  # (after export-base) the vision encoder's graph and attention-kernel variants (experiments/vision_variants.py)
    python -m experiments.vision_variants --export /tmp/exp/base --variants ${VISION_VARIANTS:-q4f16} \
      --json "$OUT/vision_variants.json" 2>&1 | grep -vE "Warn|warn" | tail -45
    ;;
  serve11)  # (after export-base) issue #13, fifth round: transformers beside ORT, then serve.overlap_rows and its
            # combinations over HTTP
    python -m bench.serve_bench --export /tmp/exp/base --hf-model /tmp/rs/model --ort-variants q4f16 --hf bf16 --batch 8 \
      --http-variant q4f16 --clients 32 --seconds "${SECONDS_PER_RUN:-20}" --max-tokens 256 --memory-samples 2 \
      --serve-sets ${SERVE_SETS:-default overlap_rows=true overlap_rows=true,prefill_dequantized=true overlap_rows=true,prefill_dequantized=true,preprocess_workers=8} \
      --prompts same distinct --json "$OUT/serve11.json" 2>&1 | grep -vE "Warn|warn" | tail -24
    ;;
  serve-soak)  # SERVE_SETS: the server's settings (default: its defaults); PROMPTS: same (default) and/or distinct
    python -m bench.serve_bench --export /tmp/exp/base --ort-variants --hf --http-variant q4f16 --clients 32 \
      --seconds "${SOAK_SECONDS:-300}" --max-tokens 256 --memory-samples 10 --serve-sets ${SERVE_SETS:-default} \
      --prompts ${PROMPTS:-same} --json "$OUT/${JSON:-serve_soak}.json" 2>&1 | grep -vE "Warn|warn" | tail -6
    ;;
  serve-bench)
    folder=$(ls -d /tmp/exp/e2e /tmp/exp/base 2>/dev/null | head -1)
    python -m bench.serve_bench --export "$folder" --ort-variants q4f16 q4 fp16 --hf --http-variant q4f16 --clients 8 32 \
      --seconds 12 --profile-vision q4f16 --json "$OUT/serve_ort.json" 2>&1 | grep -v Warning | tail -45
    ;;
esac

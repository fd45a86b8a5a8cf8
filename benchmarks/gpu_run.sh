#!/usr/bin/env bash
# Everything we run on the lent GPU, by name, in one device-tool call (carry [".whl"] after
# `bash scripts/gpu_wheel.sh` here):  bash benchmarks/gpu_run.sh tests runtime-1b kernels ...
# Logs and tables go to $OUT (the device tool brings them back); each step has its own time limit,
# so one that hangs or crashes does not take the others with it.
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/card.txt
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? at ${SECONDS}s"; tail -n "${TAIL:-15}" "$OUT/$name.log"
}
for what in "$@"; do case $what in
  kernel-tests) step kernel_tests ${KTESTS_LIMIT:-280} python3 -P -m pytest -q -p no:cacheprovider -m gpu tests/test_kernel_*.py -rfE \
      ${KERNEL_K:+-k "$KERNEL_K"} ;;
  runtime-tests)  # one process per test: a crash names its test and hides no other result
    for t in $(python3 -P -m pytest -q -p no:cacheprovider -m gpu tests/test_runtime_gpu.py --collect-only 2>/dev/null | grep ::); do
      timeout 120 python3 -P -m pytest -q -x -s -p no:cacheprovider "$t" --tb=short >> $OUT/runtime_tests.log 2>&1
      echo "$t rc=$?" | tee -a $OUT/runtime_tests.log
    done ;;
  diag)  # where the CUDA offload path first differs from the reference, under variants that isolate causes
    for v in "--mode zero_copy" "--mode zero_copy --sync" "--mode zero_copy --no-prefetch" "--mode copy_engine" \
             "--mode zero_copy --victim lru" "--mode zero_copy --slots 16"; do
      echo "### $v" >> $OUT/diag.log
      timeout 60 python3 -P scripts/diag_cuda_equivalence.py $v --steps 500 ${DIAG_ARGS:-} >> $OUT/diag.log 2>&1
      echo "diag $v rc=$? at ${SECONDS}s"
    done ;;
  runtime-1b) step runtime_1b ${LIMIT:-300} python3 benchmarks/decode_throughput.py --model 1b --contexts ${CONTEXTS:-64k,128k} --views ${VIEWS:-common,max} \
      ${GRAPH_MODE:---step-graphs} --steps 16 --warmup 4 --host-gib 64 ${MICRO:+--micro-batches $MICRO} --out $OUT/runtime_1b.md ;;
  runtime-args*)  # runtime-argsN: decode_throughput.py with the arguments in $RUNTIME_ARGSN
    n=${what#runtime-args}; v=RUNTIME_ARGS$n
    step runtime_args$n ${LIMIT:-300} python3 benchmarks/decode_throughput.py ${!v} --out $OUT/runtime_args$n.md ;;
  runtime-8b) step runtime_8b ${LIMIT8:-330} python3 benchmarks/decode_throughput.py --model 8b --contexts ${CONTEXTS8:-16k,32k} \
      ${GRAPH_MODE:---step-graphs} --steps 12 --warmup 3 --host-gib 64 ${MICRO:+--micro-batches $MICRO} --out $OUT/runtime_8b.md ;;
  profile) step profile 240 python3 scripts/profile_runtime.py --tokens ${PROFILE_TOKENS:-16384} --batch ${PROFILE_BATCH:-64} \
      --configs 'a*,c,a' ;
    step profile_inline 200 python3 scripts/profile_runtime.py --tokens ${PROFILE_TOKENS:-16384} \
      --batch ${PROFILE_BATCH:-64} --configs 'a*,a' --inline-gather ;;
  transfer) step kernels_transfer ${TLIMIT:-300} python3 benchmarks/kernels_transfer.py --only ${TRANSFER_ONLY:-a,b,c,e} \
      --host-gib 8 --out $OUT/kernels_transfer.md ;;
  kernels) step kernels 330 python3 benchmarks/kernels.py --budget-s 280 --out $OUT/kernels.md ;;
  sweep-stage1) step sweep_stage1 ${SWEEP_LIMIT:-200} python3 scripts/sweep_chunk_logits.py ;;
  sweep-decode) step sweep_decode ${SWEEP_LIMIT:-200} python3 scripts/sweep_decode_variants.py ;;
  sweep-decode-pdl) step sweep_decode_pdl ${SWEEP_LIMIT:-200} python3 scripts/sweep_decode_variants.py --pdl ;;
  sweep-topk) step sweep_topk ${SWEEP_LIMIT:-200} python3 scripts/sweep_topk_rows.py ;;
  sweep-topk-search) step sweep_topk_search ${SWEEP_LIMIT:-200} python3 scripts/sweep_topk_rows.py --search ;;
  profile-step)  # whole steps as one graph against segment graphs (PROFILE_STEP_ONLY=1: graphs only), one process each
    flags=(--step-graphs); [ -z "${PROFILE_STEP_ONLY:-}" ] && flags+=("")
    for flag in "${flags[@]}"; do step profile_step${flag:+_graphs} ${PROFILE_LIMIT:-150} python3 scripts/profile_runtime.py \
      --tokens ${PROFILE_TOKENS:-131072} --batch ${PROFILE_BATCH:-16} --configs "${PROFILE_CONFIGS:-c,a}" $flag ${PROFILE_ARGS:-}; done ;;
  profile-host)  # each configuration twice, in two processes: the host's speed varied ~2x between processes
    for run in 1 2; do step profile_host$run ${PROFILE_LIMIT:-150} python3 scripts/profile_runtime.py \
      --tokens ${PROFILE_TOKENS:-131072} --batch ${PROFILE_BATCH:-16} --configs 'c,a,c,a' --no-tables; done ;;
  grpc) step grpc_load ${GRPC_LIMIT:-200} python3 benchmarks/grpc_load.py --model 1b --prompt-tokens ${GRPC_PROMPT:-16384} --phase-seconds ${GRPC_PHASE:-8} \
      --out $OUT/grpc_load.md ;;
  grpc-batched) step grpc_batched ${GRPC_LIMIT:-200} python3 benchmarks/grpc_load.py --provider batched --model 1b \
      --prompt-tokens ${GRPC_PROMPT:-16384} --batch ${GRPC_BATCH:-64} --restart-every 4096 --phase-seconds ${GRPC_PHASE:-8} \
      --out $OUT/grpc_batched.md ;;
  runtime-gpu-tests) step runtime_gpu_tests ${TESTS_LIMIT:-420} python3 -P -m pytest -q -p no:cacheprovider -m gpu \
      tests/test_runtime_gpu.py tests/test_runtime_graph_capture.py tests/test_kernel_block_copy.py --tb=short -rfE ${PYTEST_K:+-k "$PYTEST_K"} ;;
  device-tests)  # the kernel tests that run on whichever device they find (not marked gpu), here on CUDA: the
    # prefill kernels (batched extends included), selection (fp32 K~ products, chunk completion), table runs, page tokens
    step device_tests ${TESTS_LIMIT:-300} python3 -P -m pytest -q -p no:cacheprovider -rfE --tb=short \
      tests/test_kernel_sparse_prefill.py tests/test_kernel_selection.py tests/test_kernel_table_runs.py \
      tests/test_kernel_page_tokens.py ;;
  sglang-e2e)  # the real SGLang server with --enable-nosa (needs `build_wheels.sh .whl-sglang` here, carried too)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl-sglang/*.whl 2>&1 \
      | grep -v -i warning
    PYTHONSAFEPATH=1 step sglang_e2e ${E2E_LIMIT:-500} python3 benchmarks/sglang_e2e.py ${E2E_ARGS:-} --logs $OUT/e2e_logs --out $OUT/sglang_e2e.md ;;
  sglang-gpu-tests)  # the marked GPU tests of the page pool, padded steps, the token store, the one-store gather, the backend
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl-sglang/*.whl 2>&1 \
      | grep -v -i warning
    step sglang_gpu_tests ${TESTS_LIMIT:-300} python3 -P -m pytest -q -p no:cacheprovider -m gpu -rfE --tb=short \
      tests/test_runtime_page_pool.py tests/test_runtime_padded_steps.py tests/test_kernel_token_store.py \
      tests/test_sglang_backend.py tests/test_kernel_block_copy.py ${PYTEST_K:+-k "$PYTEST_K"} ;;
  serve)  # serving throughput, NOSA server vs stock SGLang on the same weights (needs .whl-sglang, as sglang-e2e)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl-sglang/*.whl 2>&1 \
      | grep -v -i warning
    PYTHONSAFEPATH=1 step serve ${SERVE_LIMIT:-560} python3 benchmarks/serve_throughput.py ${SERVE_ARGS:-} --logs $OUT/serve_logs ${SERVE_PROFILE:+--profile-dir /tmp/profiles} \
      --out $OUT/serve_throughput.md
    # SERVE_PROFILE=1: the traces stay on the GPU machine (hundreds of MiB), their summaries come back
    if [ -n "${SERVE_PROFILE:-}" ]; then for d in /tmp/profiles/*/; do
      python3 scripts/trace_summary.py "$d" --top 40 --out "$OUT/trace_$(basename "$d").md" > /dev/null; done; fi ;;
  *) echo "unknown step $what"; exit 2 ;;
esac; done

#!/usr/bin/env bash
# Serve a NOSA checkpoint with SGLang: offloaded KV (pinned host memory), the control API on :50051.
#   MODEL=/path/to/NOSA-8B bash examples/launch_server.sh [more sglang or --nosa-* flags]
# Without MODEL it generates a small random NOSA checkpoint (byte tokenizer) to try the whole path.
set -euo pipefail
MODEL=${MODEL:-/tmp/nosa-tiny}
if [[ ! -f "$MODEL/config.json" ]]; then
  python -c "import sys; from nosa_sglang.reference.checkpoint import make_tiny_checkpoint as m; m(sys.argv[1])" "$MODEL"
fi
exec python -m nosa_sglang.launch_server --enable-nosa \
  --nosa-max-slots 96 --nosa-grpc-port 50051 \
  --model-path "$MODEL" --port "${PORT:-30000}" \
  --mem-fraction-static "${MEM_FRACTION:-0.3}" --max-total-tokens "${MAX_TOTAL_TOKENS:-262144}" "$@"

"""NOSA in-process, without an HTTP server: `nosa_sglang.Engine` (SGLang's offline engine + NOSA).

    python examples/offline_engine.py                      # a generated small NOSA checkpoint
    python examples/offline_engine.py --model-path /path/to/NOSA-8B --prompt-chars 30000

Generates greedily for a few long prompts and prints the outputs and the offload counters that
`/server_info` reports (`internal_states[0]["nosa"]`).
"""

from __future__ import annotations

import argparse
import json
import tempfile

from nosa_sglang import Engine, NosaServerFlags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path")
    ap.add_argument("--prompt-chars", type=int, default=6000)
    ap.add_argument("--offload", choices=["on", "off"], default="on")
    args = ap.parse_args()
    path = args.model_path
    if path is None:
        from nosa_sglang.reference.checkpoint import make_tiny_checkpoint

        path = str(make_tiny_checkpoint(tempfile.mkdtemp(prefix="nosa_tiny_")))
    engine = Engine(NosaServerFlags(offload=args.offload == "on"), model_path=path, mem_fraction_static=0.3,
                    max_total_tokens=262144)
    try:
        base = "NOSA keeps the KV cache in host memory and the selected blocks on the GPU. " * 200
        prompts = [f"{i}: " + base[: args.prompt_chars] for i in range(4)]
        outs = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 16})
        for i, o in enumerate(outs):
            print(f"[{i}] {o['text']!r}")
        print(json.dumps(engine.get_server_info()["internal_states"][0]["nosa"], indent=1))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()

"""An unchanged SGLang frontend program (multi-turn + fork) against a NOSA server.

    bash examples/launch_server.sh &        # wait for "The server is fired up"
    python examples/frontend_program.py --url http://127.0.0.1:30000
    python examples/frontend_program.py --model /path/to/nosa-checkpoint   # or start one: nosa_sglang.Runtime

It reads a long document (--doc FILE, or --doc-chars of generated text so that selection is sparse:
more than 64 blocks of 64 tokens), asks two questions in turn (the second reuses the first turn's KV
through the radix cache), then forks into parallel branches that share the whole conversation.
"""

from __future__ import annotations

import argparse
import random

import sglang as sgl


@sgl.function
def read_and_answer(s, document: str, questions: list[str], branches: list[str], max_tokens: int):
    s += "Document:\n" + document + "\n\n"
    for i, q in enumerate(questions):  # multi-turn: each turn extends the same state
        s += f"Q: {q}\nA:" + sgl.gen(f"answer_{i}", max_tokens=max_tokens, temperature=0) + "\n"
    forks = s.fork(len(branches))  # every branch shares the conversation's KV
    for f, b in zip(forks, branches):
        f += f"{b}:" + sgl.gen("note", max_tokens=max_tokens, temperature=0)
    s["notes"] = [f["note"] for f in forks]


def generated_document(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ["offload", "block", "eviction", "query", "host", "slot", "cache", "token", "layer", "head"]
    out, n = [], 0
    while n < n_chars:
        w = rng.choice(words)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:n_chars]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--model", help="start a NOSA server for this checkpoint (nosa_sglang.Runtime) instead of --url")
    ap.add_argument("--doc", help="a text file (default: generated text)")
    ap.add_argument("--doc-chars", type=int, default=6000)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    document = open(args.doc).read() if args.doc else generated_document(args.doc_chars, seed=0)
    runtime = None
    if args.model:
        import nosa_sglang

        runtime = nosa_sglang.Runtime(model_path=args.model)
        sgl.set_default_backend(runtime)
    else:
        sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    try:
        state = read_and_answer.run(document=document, questions=["What is stored on the host?", "And on the GPU?"],
                                    branches=["Summary", "Keywords"], max_tokens=args.max_tokens)
    finally:
        if runtime is not None:
            runtime.shutdown()
    for i in range(2):
        print(f"answer_{i}: {state[f'answer_{i}']!r}")
    for b, note in zip(["Summary", "Keywords"], state["notes"]):
        print(f"{b}: {note!r}")


if __name__ == "__main__":
    main()

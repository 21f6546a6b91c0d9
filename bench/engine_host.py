"""Host-side work of the serving engine per decode step, without the model: picking each row's token from the
logits and turning it into streamed text (detokenization, stop strings, events), for N rows of T tokens.

On a GPU this work sits between decode steps (nothing overlaps it), so it adds to every step of every row.

    python -m bench.engine_host --export exports/tiny [--rows 32] [--tokens 256] [--vocab 49155]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import numpy as np


def measure(folder: Path, rows: int, tokens: int, vocab: int, seed: int = 0) -> dict:
    from smolbox.preprocess import Preprocessor
    from smolbox.serve.engine import GenRequest, Row

    pre = Preprocessor(folder)
    loop = asyncio.new_event_loop()
    decodable = pre.tokenizer.get_vocab_size()
    rng = np.random.default_rng(seed)
    requests = [GenRequest(encoded=None, prompt_tokens=0, max_tokens=tokens, temperature=0.0, top_p=1.0, seed=None,
                           stop=[], events=asyncio.Queue(), loop=loop) for _ in range(rows)]
    batch = [Row(r, pre) for r in requests]
    # Logits whose greedy pick is a decodable, non-special token: the model's head rows beyond the tokenizer and
    # end-of-utterance never win (as with bench/real_shapes.py's model), so every row runs to max_tokens.
    specials = set(pre.tokenizer.get_added_tokens_decoder()) | set(pre.eos_token_ids)
    choices = np.array([i for i in range(decodable) if i not in specials])
    steps = []
    for _ in range(tokens):
        logits = rng.standard_normal((rows, vocab), dtype=np.float32)
        logits[np.arange(rows), rng.choice(choices, rows)] = 10.0
        started = time.perf_counter()
        picked = logits.argmax(-1).astype(np.int64)  # as Engine._step: one argmax for the greedy rows
        for i, row in enumerate(batch):
            row.add(int(picked[i]))
        steps.append(time.perf_counter() - started)
    loop.close()
    assert all(row.finished for row in batch), "every row runs to max_tokens"
    return {"rows": rows, "tokens": tokens, "vocab": vocab, "host_ms_per_step": round(1000 * float(np.mean(steps)), 3),
            "host_ms_per_step_last_10pct": round(1000 * float(np.mean(steps[-max(1, tokens // 10):])), 3),
            "cpu": platform.processor() or platform.machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49155, help="logits width (SmolVLM-Instruct: 49,155)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = [measure(args.export, n, args.tokens, args.vocab) for n in args.rows]
    print(f"{'rows':>5} {'tokens':>7} {'host ms/step':>13} {'last 10%':>9}")
    for r in results:
        print(f"{r['rows']:>5} {r['tokens']:>7} {r['host_ms_per_step']:>13.3f} {r['host_ms_per_step_last_10pct']:>9.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

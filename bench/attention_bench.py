"""The attention of one training micro-batch at default.yaml's shapes, forward and backward, by kernel: what the
vision tower's and the packed text's attention cost with each of PyTorch's backends (and FlexAttention for the
packed pairs' mask). A training profile puts more of a compiled step's GPU time in attention than in anything but
the matrix products (docs/benchmarks.md, 2026-12-01 lease 14, "Where a compiled step's GPU time goes").

    python -m bench.attention_bench [--tiles 208] [--pairs 16] [--prompt 1100] [--completion 50] [--json out.json]

Vision: [tiles, 16 heads, 729 patches, head dim 72], no mask (SigLIP of SmolVLM-Instruct; 16 pairs x 13 tiles).
Text: one packed row per pair, [pairs, 32 heads, prompt + 2 completions, 64], each row masked as
smolbox.train.dpo.pack_pairs masks it (dpo.segment_mask: causal; the rejected completion does not see the chosen one).
Every kernel's output is checked against the math backend's (fp32) before it is timed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from smolbox.train.dpo import segment_mask

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def timed(fn, repeats: int = 10) -> float:
    """Median seconds of fn() over `repeats` calls, after two warm-ups."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def fwd_bwd(attend, q, k, v):
    """(forward seconds, forward + backward seconds) of attend(q, k, v)."""
    grad = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            attend(q, k, v)

    def both():
        out = attend(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)

    return timed(forward), timed(both)


def segments(pairs: int, prompt: int, completion: int, gen: torch.Generator) -> torch.Tensor:
    """[pairs, length] segment ids as pack_pairs lays a row out: 0 prompt, 1 chosen, 2 rejected, 3 padding."""
    lengths = [(prompt + int(torch.randint(-40, 40, (1,), generator=gen)),
                completion + int(torch.randint(-20, 20, (1,), generator=gen)),
                completion + int(torch.randint(-20, 20, (1,), generator=gen))) for _ in range(pairs)]
    total = max(sum(x) for x in lengths)
    seg = torch.full((pairs, total), 3, dtype=torch.long)
    for i, (p, c, r) in enumerate(lengths):
        seg[i, :p], seg[i, p:p + c], seg[i, p + c:p + c + r] = 0, 1, 2
    return seg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=208)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=1100)
    parser.add_argument("--completion", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    rows = []

    def record(part, kernel, shape, fn, q, k, v, reference):
        try:
            with torch.no_grad():
                err = (fn(q, k, v).float() - reference).abs().max().item()
            fwd, both = fwd_bwd(fn, q, k, v)
            rows.append({"part": part, "kernel": kernel, "shape": shape, "fwd_ms": 1e3 * fwd, "fwd_bwd_ms": 1e3 * both,
                         "max_abs_err_vs_math_fp32": err})
        except Exception as exc:  # noqa: BLE001 - a backend that refuses the shape is a row of the table
            rows.append({"part": part, "kernel": kernel, "shape": shape, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        print(json.dumps(rows[-1]), flush=True)

    # Vision: no mask
    shape = [args.tiles, 16, 729, 72]
    q, k, v = (torch.randn(shape, generator=gen).to(dev, bf16).requires_grad_() for _ in range(3))
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    for name, backend in BACKENDS.items():
        def attend(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        record("vision", name, shape, attend, q, k, v, reference)
    del q, k, v, reference

    # Text: packed pairs with pack_pairs' mask
    seg = segments(args.pairs, args.prompt, args.completion, gen).to(dev)
    shape = [args.pairs, 32, seg.shape[1], 64]
    q, k, v = (torch.randn(shape, generator=gen).to(dev, bf16).requires_grad_() for _ in range(3))
    mask = segment_mask(seg)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    for name, backend in BACKENDS.items():
        if name == "flash":
            continue  # no masks
        def attend(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        record("text", name, shape, attend, q, k, v, reference)
    # A new length every call, as packed batches of real data have: cuDNN builds an execution plan per shape
    for name in ("cudnn", "efficient"):
        seconds = []
        for extra in range(1, 13):
            qn, kn, vn = (torch.randn([args.pairs, 32, seg.shape[1] + extra, 64], generator=gen).to(dev, bf16).requires_grad_()
                          for _ in range(3))
            mask_n = torch.ones(args.pairs, 1, qn.shape[2], qn.shape[2], dtype=torch.bool, device=dev).tril()
            torch.cuda.synchronize()
            start = time.perf_counter()
            with sdpa_kernel([BACKENDS[name]]):
                out = F.scaled_dot_product_attention(qn, kn, vn, attn_mask=mask_n)
                torch.autograd.grad(out, (qn, kn, vn), torch.ones_like(out))
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        rows.append({"part": "text, a new length each call", "kernel": name, "shape": [args.pairs, 32, "L+1..L+12", 64],
                     "fwd_ms": None, "fwd_bwd_ms": 1e3 * sorted(seconds)[len(seconds) // 2], "first_call_ms": 1e3 * seconds[0],
                     "max_abs_err_vs_math_fp32": None})
        print(json.dumps(rows[-1]), flush=True)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, qi, ki):
        sq, sk = seg[b, qi], seg[b, ki]
        return ((qi >= ki) & ((sk == 0) | (sk == sq)) & (sq != 3) & (sk != 3)) | (qi == ki)

    started = time.perf_counter()
    block = create_block_mask(mask_mod, args.pairs, None, seg.shape[1], seg.shape[1], device=dev)
    torch.cuda.synchronize()
    mask_s = time.perf_counter() - started
    flex = torch.compile(flex_attention, dynamic=False)
    record("text", "flex", shape, lambda q, k, v: flex(q, k, v, block_mask=block), q, k, v, reference)
    rows[-1]["block_mask_s"] = mask_s
    print("\n| part | kernel | shape | fwd ms | fwd+bwd ms | max err vs fp32 |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['part']} | {r['kernel']} | {r['shape']} | error: {r['error'][:60]} | | |")
        else:
            fwd = f"{r['fwd_ms']:.2f}" if r["fwd_ms"] is not None else "-"
            err = f"{r['max_abs_err_vs_math_fp32']:.1e}" if r["max_abs_err_vs_math_fp32"] is not None else "-"
            print(f"| {r['part']} | {r['kernel']} | {r['shape']} | {fwd} | {r['fwd_bwd_ms']:.2f} | {err} |")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "card": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

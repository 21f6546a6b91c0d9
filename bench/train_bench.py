"""Training throughput (pairs/s) and peak GPU memory: the reference recipe with stock TRL against smolbox configs,
side by side in one run, on the real-shape model and 512x384 image pairs of bench/real_shapes.py.

    python -m bench.real_shapes --out /tmp/rs
    python -m bench.train_bench --root /tmp/rs --json train_bench.json [--variants recipe default lowmem ...]

Each variant runs in its own process (clean peak-memory numbers; nothing patched leaks into the next) for
`--steps` optimizer steps with the global batch of the variant's table row (smaller than the real configs' for
time: the micro-batch, which decides speed and memory, is the real one), or `--global-batch`. Step 1 is warm-up;
pairs/s = pairs of steps 2..N / their wall time. Peak memory is torch.cuda.max_memory_allocated (and _reserved),
the largest over the processes. Every smolbox variant logs its per-step losses (`losses` in the JSON); after the
table, each one's curve is compared with the first variant's (max and mean |Δloss| over the steps both ran, also
`loss_vs_first` in the JSON): `--variants default default:compile --steps 50` is issue #16's loss-curve check.

World size: `<variant>@N` runs the variant on N GPUs of this host through torchrun (one process per GPU), with the
same global batch, so `default@1 default@2 --global-batch 32` measures how training scales (pairs/s, peak memory
per GPU, the precompute pass, first losses) side by side.

Variants:
  recipe            the cookbook recipe exactly (configs/seed.yaml values) through stock TRL DPOTrainer + peft_config
  <name>            smolbox.train with configs/<name>.yaml (or a variant below), model/data pointed at --root
  <name>:unpacked   the same with smolbox.dpo's pair packing switched off (one row per completion, as TRL does)
  <name>:peft-dora  the same with peft's DoRA forward instead of smolbox.dora's fused one
  <name>:precompute / <name>:no-precompute   train.precompute_ref_logps on / off (on in default and lowmem):
                    steps without the reference forward; the one-off pass over the data is reported as
                    ref_logps_precompute_s, and pairs_per_s_with_precompute spreads it over the config's epochs
  <name>:compile    train.compile on: torch.compile (inductor, dynamic shapes) of each SigLIP encoder / Llama
                    decoder layer; the compilation falls in the warm-up step 1 (the reference pass runs eagerly);
                    pairs_per_s_from_step3 also leaves out step 2, should anything recompile there
  <name>:norm-cache adapter.dora_norm_cache on: DoRA's weight norm once per optimizer step, not per forward
  <name>:dora-bias  adapter.fused_dora_bias on: the fused DoRA forward on the vision tower's q/k/v (they have a
                    bias, so they take peft's ~7-pass forward otherwise)
  <name>:fp32-fused with :compile, train.compile_eager_rounding off: inductor keeps a fused kernel's intermediates
                    in fp32 instead of rounding them to bf16 where eager does
  <name>:cudnn      train.cudnn_attention=all: PyTorch's cuDNN attention kernels first (vision and packed text;
                    the packed rows padded to a multiple of 64 tokens)
  <name>:cudnn-vision  train.cudnn_attention=vision: cuDNN first in the vision tower's blocks only
Modifiers combine: default:compile:dora-bias:norm-cache is all three on.

`--baseline earlier.json` puts the rows of an earlier run (another call on the same machine) first: the loss curves
are compared with its first variant, as if it had run in this one, and the written JSON holds them too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name -> (base config, overrides, global batch used here: pairs a step, reduced for time).
W = "train.dataloader_num_workers"
BS, CKPT = "train.per_device_train_batch_size", "train.gradient_checkpointing"
VARIANTS = {
    "seed": ("seed", {}, 4),
    "default": ("default", {}, 16),
    "lowmem": ("lowmem", {}, 8),
    "default-bs4-w4": ("default", {BS: 4, CKPT: True, W: 4}, 8),
    "default-bs8-w4": ("default", {BS: 8, CKPT: True, W: 4}, 8),
    "default-bs2-nockpt-w4": ("default", {BS: 2, CKPT: False, W: 4}, 8),
    "default-bs4-nockpt-w4": ("default", {BS: 4, CKPT: False, W: 4}, 8),
    "default-bs1-nockpt-w4": ("default", {BS: 1, CKPT: False, W: 4}, 8),
    "default-bs16-w8": ("default", {BS: 16, CKPT: True, W: 8}, 16),
    "default-bs8-w8": ("default", {BS: 8, CKPT: True, W: 8}, 8),
    "lowmem-bs1": ("default", {BS: 1, CKPT: True}, 4),
    "lowmem-bs1-w4": ("default", {BS: 1, CKPT: True, W: 4}, 8),
    "lowmem-bs2-w4": ("default", {BS: 2, CKPT: True, W: 4}, 8),
    "lowmem-bs1-w2": ("default", {BS: 1, CKPT: True, W: 2}, 4),
    "lowmem-bs2-w2": ("default", {BS: 2, CKPT: True, W: 2}, 8),
}
# ":modifier" after a variant name -> (config key, value); several combine (default:compile:norm-cache).
SWITCHES = {"peft-dora": ("adapter.fused_dora", False), "precompute": ("train.precompute_ref_logps", True),
            "no-precompute": ("train.precompute_ref_logps", False), "unpacked": ("train.pack_pairs", False),
            "compile": ("train.compile", True), "norm-cache": ("adapter.dora_norm_cache", True),
            "dora-bias": ("adapter.fused_dora_bias", True),
            "fp32-fused": ("train.compile_eager_rounding", False), "cudnn": ("train.cudnn_attention", "all"),
            "cudnn-vision": ("train.cudnn_attention", "vision")}
RECIPE_ACCUMULATION = 4  # the recipe's 32, reduced for time; micro-batch 1 as in the recipe
RECIPE_PAIRS = 4738  # train[:6%] of rlaif-v_formatted (../shared/RECIPE.md)


class StepTimer:
    """A TrainerCallback (built lazily: transformers is imported in the child only) timing optimizer steps."""

    def __new__(cls):
        import torch
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.ends: list[float] = []

            def on_train_begin(self, args, state, control, **kw):
                self.ends = [time.perf_counter()]
                # loading and the precompute pass, apart from the steps
                self.peak_before_train = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0

            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.ends.append(time.perf_counter())

        return _Timer()


def _result(timer, pairs_per_step: int, extra: dict) -> dict:
    import torch

    steps = [round(b - a, 3) for a, b in zip(timer.ends, timer.ends[1:])]
    measured = steps[1:] or steps
    out = {
        **extra, "pairs_per_step": pairs_per_step, "step_s": steps,
        "pairs_per_s": round(pairs_per_step * len(measured) / sum(measured), 3) if measured else None,
        # without step 2 as well: should a compiled variant recompile there, it shows as a gap between the two rates
        "pairs_per_s_from_step3": round(pairs_per_step * len(steps[2:]) / sum(steps[2:]), 3) if steps[2:] else None,
        # over the median step: a step that pays a one-off (a loader's workers starting, an epoch's first batch)
        # does not move it; with a small data set and many steps those come often (docs/benchmarks.md, lease 3)
        "pairs_per_s_median_step": round(pairs_per_step / statistics.median(measured), 3) if measured else None,
    }
    if torch.cuda.is_available():
        out.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
    return out


def run_recipe(root: Path, steps: int, workdir: Path, cpu: bool) -> dict:
    """The cookbook, line for line where it matters, with TRL's defaults for everything it leaves out."""
    import importlib.util

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoProcessor, BitsAndBytesConfig, Idefics3ForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    model_id, data_id = str(root / "model"), str(root / "data")
    attn = "flash_attention_2"
    if cpu or importlib.util.find_spec("flash_attn") is None:
        print("recipe: flash-attn is not installed; falling back to sdpa", flush=True)
        attn = "sdpa"
    compute = torch.float32 if cpu else torch.bfloat16
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=compute)
    model = Idefics3ForConditionalGeneration.from_pretrained(
        model_id, device_map={"": "cpu" if cpu else 0}, dtype=compute, quantization_config=bnb_config,
        _attn_implementation=attn,
    )
    processor = AutoProcessor.from_pretrained(model_id)
    train_dataset = load_dataset(data_id, split="train")

    def ensure_rgb_and_resize(example):
        images = []
        for image in example["images"]:
            image = image.convert("RGB") if image.mode != "RGB" else image
            image.thumbnail((512, 512))
            images.append(image)
        example["images"] = images
        return example

    train_dataset = train_dataset.map(ensure_rgb_and_resize, num_proc=min(8, os.cpu_count() or 1))
    peft_config = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1, use_dora=True, init_lora_weights="gaussian",
                             target_modules=["down_proj", "o_proj", "k_proj", "q_proj", "gate_proj", "up_proj", "v_proj"])
    args = DPOConfig(
        output_dir=str(workdir / "recipe"), bf16=not cpu, use_cpu=cpu, gradient_checkpointing=True,
        per_device_train_batch_size=1, per_device_eval_batch_size=1, gradient_accumulation_steps=RECIPE_ACCUMULATION,
        num_train_epochs=5, max_steps=steps, logging_steps=1, save_strategy="no", eval_strategy="no",
        max_length=None, report_to=[], disable_tqdm=True,
    )
    trainer = DPOTrainer(model, ref_model=None, args=args, train_dataset=train_dataset, processing_class=processor, peft_config=peft_config)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return _result(timer, RECIPE_ACCUMULATION, {
        "variant": "recipe", "micro_batch": 1, "accumulation": RECIPE_ACCUMULATION, "real_accumulation": 32,
        "gradient_checkpointing": True, "attention": attn, "packed": False, "path": "stock TRL DPOTrainer",
    })


def run_smolbox(name: str, root: Path, steps: int, workdir: Path, cpu: bool, global_batch: int | None) -> dict:
    import torch

    from smolbox.config import load_config
    from smolbox.train import distributed, train

    # Modifiers after the name (SWITCHES): ":unpacked" (TRL's two rows per pair), ":peft-dora" (peft's DoRA forward), ...
    base, *modifiers = name.split("@")[0].split(":")
    packed = "unpacked" not in modifiers
    config_name, overrides, pairs = VARIANTS[base]
    unknown = [m for m in modifiers if m not in SWITCHES]
    if unknown:
        raise ValueError(f"unknown variant modifier(s) {unknown}; known: {sorted(SWITCHES)}")
    overrides = {**overrides, **dict(SWITCHES[m] for m in modifiers)}
    overrides = {
        **overrides, "model.id": str(root / "model"), "data.id": str(root / "data"), "data.train_split": "train",
        "data.eval_split": None, "data.num_proc": 1, "train.max_steps": steps, "train.logging_steps": 1,
        "train.save_steps": 100000, "train.global_batch_size": global_batch or pairs,
        "run.output_dir": str(workdir), "run.name": name.replace(":", "-").replace("@", "-x"), "run.min_free_disk_gb": 0,
    }
    if cpu:
        overrides.update({"train.bf16": False, "run.device": "cpu", "model.dtype": "float32", "quant.compute_dtype": "float32",
                          "model.attn_implementation": "sdpa"})
    cfg = load_config(config_name, overrides=overrides, env={}, dotenv=None)
    real = load_config(config_name, overrides={}, env={}, dotenv=None).train
    timer = StepTimer()
    result = train(cfg, callbacks=[timer])
    batch = result.manifest.get("batch", {})
    peaks = distributed.gather((torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)
                               if torch.cuda.is_available() else (0.0, 0.0))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    row = _result(timer, cfg.train.global_batch_size, {
        "variant": name, "world_size": distributed.world().size, "micro_batch": batch.get("micro_batch"),
        "accumulation": batch.get("accumulation"), "real_global_batch": real.global_batch_size,
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "attention": result.manifest.get("attention", {}).get("implementation"), "packed": packed,
        "dropout": cfg.adapter.dropout, "fused_dora": cfg.adapter.fused_dora, "compile": cfg.train.compile,
        "dora_norm_cache": cfg.adapter.dora_norm_cache, "fused_dora_bias": cfg.adapter.fused_dora_bias,
        "ref_logps_precompute_s": result.manifest.get("ref_logps_precompute_s"), "workers": cfg.train.dataloader_num_workers,
        "path": f"smolbox.train, configs/{config_name}.yaml", "losses": [r["loss"] for r in records if "loss" in r],
        "peak_allocated_before_train_gib": round(timer.peak_before_train, 2),
        "gpus": result.manifest.get("distributed", {}).get("gpus"),
        "peak_allocated_gib_per_gpu": [round(a, 2) for a, _ in peaks],
    })
    # What DDP all-reduces each optimizer step: the trainable (adapter) tensors, in the dtype they train in.
    from safetensors.torch import load_file

    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    row.update(trainable_params=sum(t.numel() for t in adapter.values()),
               gradient_bytes=sum(t.numel() * t.element_size() for t in adapter.values()))
    if peaks and torch.cuda.is_available():
        row.update(peak_allocated_gib=round(max(a for a, _ in peaks), 2), peak_reserved_gib=round(max(r for _, r in peaks), 2))
    m = result.manifest
    if m.get("ref_logps_precompute_s") and m.get("ref_logps_pairs") and row["pairs_per_s"]:
        # A whole run pays the one-off pass once for all its epochs. Here it covers the bench's few pairs, so its
        # first batch (loader start, warm-up) weighs more than in a real run: spread over the config's epochs,
        # pairs/s of this data set as measured, and projected to the recipe's 4,738 pairs at the steady rate.
        epochs, pairs, first = real.num_train_epochs, m["ref_logps_pairs"], m["ref_logps_first_batch_s"]
        batch = cfg.train.per_device_eval_batch_size
        steady = (pairs - batch) / max(m["ref_logps_precompute_s"] - first, 1e-9) if pairs > batch else None
        row.update(epochs=epochs, ref_logps_pairs=pairs, ref_logps_first_batch_s=first,
                   ref_logps_steady_pairs_per_s=round(steady, 2) if steady else None)
        row["pairs_per_s_with_precompute"] = round(epochs / (epochs / row["pairs_per_s"] + m["ref_logps_precompute_s"] / pairs), 3)
        if steady:
            full = first + (RECIPE_PAIRS - batch) / steady
            row["pairs_per_s_with_precompute_recipe_data"] = round(epochs / (epochs / row["pairs_per_s"] + full / RECIPE_PAIRS), 3)
    return row


def child(name: str, root: Path, steps: int, workdir: Path, cpu: bool, global_batch: int | None) -> None:
    started = time.perf_counter()
    try:
        result = (run_recipe(root, steps, workdir, cpu) if name == "recipe"
                  else run_smolbox(name, root, steps, workdir, cpu, global_batch))
    except Exception as exc:  # noqa: BLE001 - reported in the table, the next variant still runs
        import traceback

        traceback.print_exc()
        result = {"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        try:
            import torch

            if torch.cuda.is_available():
                result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception:  # noqa: BLE001
            pass
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if int(os.environ.get("RANK", 0)) == 0:
        print("RESULT " + json.dumps(result), flush=True)


def table(rows: list[dict]) -> str:
    head = (f"{'variant':<28} {'gpus':>4} {'mb':>3} {'acc':>4} {'ckpt':>5} {'packed':>6} {'pairs/s':>8} {'from s3':>8} {'median':>8} {'alloc GiB':>9} "
            f"{'resv GiB':>8} {'x recipe':>8} {'x 1 GPU':>7} {'run pairs/s':>11} {'4738 pairs':>11}")
    base = next((r.get("pairs_per_s") for r in rows if r["variant"] == "recipe" and r.get("pairs_per_s")), None)
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<28} ERROR {r['error'][:90]}")
            continue
        ratio = f"{r['pairs_per_s'] / base:.2f}" if base and r.get("pairs_per_s") else "-"
        # scaling: against the same variant on one GPU with the same global batch, measured in this run
        single = next((o.get("pairs_per_s") for o in rows if o.get("world_size") == 1 and "error" not in o
                       and o["variant"].split("@")[0] == r["variant"].split("@")[0]
                       and o.get("pairs_per_step") == r.get("pairs_per_step")), None)
        scaling = f"{r['pairs_per_s'] / single:.2f}" if single and r.get("pairs_per_s") and r.get("world_size", 1) > 1 else "-"
        lines.append(f"{r['variant']:<28} {r.get('world_size', 1):>4} {r['micro_batch']:>3} {r['accumulation']:>4} "
                     f"{str(r['gradient_checkpointing'])[0]:>5} {str(r['packed'])[0]:>6} {r['pairs_per_s'] or 0:>8.3f} "
                     f"{r.get('pairs_per_s_from_step3') or 0:>8.3f} {r.get('pairs_per_s_median_step') or 0:>8.3f} "
                     f"{r.get('peak_allocated_gib', 0):>9.2f} {r.get('peak_reserved_gib', 0):>8.2f} {ratio:>8} {scaling:>7} "
                     f"{r.get('pairs_per_s_with_precompute') or '':>11} {r.get('pairs_per_s_with_precompute_recipe_data') or '':>11}")
    lines.append("pairs/s: steps 2..N; from s3: steps 3..N (a compiled variant's recompile at step 2, if any, left out); "
                 "median: over the median of steps 2..N")
    lines.append("global batch reduced for time unless --global-batch (real: 32 pairs a step); micro-batch as configured; "
                 "memory: the largest GPU")
    lines.append("run pairs/s: with precomputed reference log-probs, the one-off pass spread over the config's epochs "
                 "(this data set; 4738 pairs: projected to the recipe's data at the pass's steady rate)")
    return "\n".join(lines)


def loss_comparison(rows: list[dict]) -> list[str]:
    """Each variant's per-step losses against the first variant's (the reference curve; same pairs a step only): max
    and mean |Δloss| over the steps both logged. Also stored in each row as `loss_vs_first`; the curves themselves are the rows' `losses`."""
    first = next((r for r in rows if r.get("losses")), None)
    if first is None:
        return []
    lines = [f"loss curves against {first['variant']} ({len(first['losses'])} steps): max |dloss|, mean |dloss| over the common steps"]
    for r in rows:
        if r is first or not r.get("losses"):
            continue
        if r.get("pairs_per_step") != first.get("pairs_per_step"):
            lines.append(f"  {r['variant']:<28} not compared: {r.get('pairs_per_step')} pairs a step, not {first.get('pairs_per_step')}")
            continue
        diffs = [abs(a - b) for a, b in zip(r["losses"], first["losses"])]
        r["loss_vs_first"] = {"against": first["variant"], "steps": len(diffs), "max_abs_diff": max(diffs),
                              "mean_abs_diff": sum(diffs) / len(diffs),
                              "max_abs_diff_step": 1 + diffs.index(max(diffs))}
        c = r["loss_vs_first"]
        lines.append(f"  {r['variant']:<28} max {c['max_abs_diff']:.2e} (step {c['max_abs_diff_step']}), "
                     f"mean {c['mean_abs_diff']:.2e} over {c['steps']} steps; last losses "
                     f"{r['losses'][len(diffs) - 1]:.5f} vs {first['losses'][len(diffs) - 1]:.5f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="folder written by bench.real_shapes")
    parser.add_argument("--variants", nargs="+", default=["recipe", "default:unpacked", "default", "lowmem"],
                        help=f"recipe, or a name ({', '.join(VARIANTS)}) with optional :modifiers "
                             f"({', '.join(SWITCHES)}) and @N for N GPUs")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (the first is warm-up)")
    parser.add_argument("--global-batch", type=int, default=None, help="pairs a step for every smolbox variant")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--baseline", type=Path, default=None, help="an earlier run's JSON: its rows go first")
    parser.add_argument("--cpu", action="store_true", help="smoke test on CPU (fp32, no bf16)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root, args.steps, args.workdir, args.cpu, args.global_batch)
        return
    rows = json.loads(args.baseline.read_text()) if args.baseline else []
    for row in rows:
        row.setdefault("from", str(args.baseline))
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        for name in args.variants:
            world = int(name.split("@")[1]) if "@" in name else 1
            launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                            "--nproc_per_node", str(world)]
            cmd = [*launcher, "-m", "bench.train_bench", "--child", name, "--root", str(args.root), "--steps",
                   str(args.steps), "--workdir", tmp] + (["--cpu"] if args.cpu else [])
            cmd += ["--global-batch", str(args.global_batch)] if args.global_batch else []
            print(f"=== {name}", flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"variant": name, "error": f"exit {proc.returncode}: {proc.stderr[-600:]}"}
            if "error" in row:
                print(proc.stderr[-3000:], flush=True)
            print(json.dumps(row), flush=True)
            rows.append(row)
            comparison = loss_comparison(rows)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    print("\n".join(comparison))


if __name__ == "__main__":
    main()

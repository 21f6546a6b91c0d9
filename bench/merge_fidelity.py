"""Which base weights should DoRA adapters be merged into? Prints max/mean logit error of each merge against the
trained model itself (the 4-bit base with the adapter applied, unmerged), on the export parity prompts.

    python -m bench.merge_fidelity [--config tiny] [--run.name tiny]   # needs a completed training run
"""

from __future__ import annotations

import sys

import torch
from peft import PeftModel

from smolbox import tiny
from smolbox.config import Config
from smolbox.env import resolve_device
from smolbox.export import _parity_inputs, merge, resolve_source
from smolbox.train import load_model


def merge_errors(cfg: Config) -> dict[str, float]:
    source = resolve_source(cfg)
    device = resolve_device(cfg)
    trained = load_model(cfg, device, "sdpa", tiny.resolve(source.model_id, "model"))
    trained = PeftModel.from_pretrained(trained, str(source.adapter_dir)).eval()
    errors = {}
    for merge_into in ("dequantized_nf4", "full_precision"):
        model, processor = merge(source, merge_into, device, cfg)
        worst = 0.0
        with torch.no_grad():
            for inputs in _parity_inputs(processor, cfg.export.parity_prompts):
                inputs = inputs.to(model.device)
                reference = trained(**inputs).logits.float()
                worst = max(worst, float((model(**inputs).logits.float() - reference).abs().max()))
        errors[merge_into] = worst
    return errors


def main(argv: list[str]) -> None:
    from smolbox.cli import _overrides, build_parser
    from smolbox.config import load_config

    ns = build_parser().parse_args(["config", *argv])
    cfg = load_config(ns.config or "tiny", overrides=_overrides(ns), dotenv=ns.env_file)
    errors = merge_errors(cfg)
    print(f"{'merged into':<18} {'max |logit - trained logit|':>28}")
    for name, value in errors.items():
        print(f"{name:<18} {value:>28.3e}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Merging the trained adapter: into the weights it trained against (export.merge_into's default), and refused for a
base it does not fit."""

import pytest
import torch

from smolbox.export import ExportError, export
from smolbox.export.merge import merge
from smolbox.export.parity import parity_inputs
from smolbox.models import load_trained_base
from smolbox.sources import resolve_source


def test_merge_into_dequantized_nf4_reproduces_the_trained_adapter_best(tiny_run, tiny_config):
    """The measurement behind export.merge_into's default (docs/export.md): the largest logit difference of each merge
    from the trained model itself (the 4-bit base with the adapter applied, unmerged) on the parity prompts."""
    from peft import PeftModel

    cfg = tiny_config()
    source = resolve_source(cfg)
    trained = PeftModel.from_pretrained(load_trained_base(source, cfg, "cpu", "sdpa"), str(source.adapter_dir)).eval()
    errors = {}
    for merge_into in ("dequantized_nf4", "full_precision"):
        model, processor = merge(source, merge_into, "cpu", cfg)
        with torch.no_grad():
            errors[merge_into] = max(float((model(**inputs).logits.float() - trained(**inputs).logits.float()).abs().max())
                                     for inputs in parity_inputs(processor, cfg.export.parity_prompts))
    assert errors["dequantized_nf4"] < errors["full_precision"], errors


def test_adapter_for_another_base_is_refused(tiny_run, tiny_root, tiny_config, tmp_path):
    from smolbox import tiny

    other = tiny.build_model()
    other.config.text_config.hidden_size = 128
    other.config.text_config.intermediate_size = 256
    bigger = type(other)(other.config)
    bigger.save_pretrained(tmp_path / "other-base")
    tiny.build_processor().save_pretrained(tmp_path / "other-base")
    cfg = tiny_config(**{"model.id": str(tmp_path / "other-base"), "export.source": str(tiny_run.adapter_dir),
                           "export.name": "wrong", "export.merge_into": "full_precision"})
    with pytest.raises(ExportError, match="does not fit base model"):
        export(cfg)
    assert not (tiny_root / "exports" / "wrong").exists()

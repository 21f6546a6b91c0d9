"""smolbox.train.dora's fused DoRA forward computes peft's function: outputs and every gradient, plain and NF4 layers."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.variants import DoraLinearVariant

from smolbox.train.dora import FusedDoraLinearVariant, use_fused_dora


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = torch.nn.Linear(64, 128, bias=False)
        self.down_proj = torch.nn.Linear(128, 64, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.up_proj(x)))


def _peft_model(quantized: bool):
    torch.manual_seed(0)
    model = TwoLayers()
    if quantized:
        import bitsandbytes as bnb

        for name in ("up_proj", "down_proj"):
            dense = getattr(model, name)
            layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32,
                                      quant_type="nf4", compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
            layer.weight = layer.weight._quantize("cpu") if hasattr(layer.weight, "_quantize") else layer.weight
            layer.support_avx512bf16_for_cpu = False
            setattr(model, name, layer)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True, target_modules=["up_proj", "down_proj"],
                        init_lora_weights="gaussian")
    model = get_peft_model(model, config)
    with torch.no_grad():  # move away from the identity start: B != 0, magnitudes off the norms
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.train()
    return model


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_fused_dora_equals_peft(quantized):
    reference = _peft_model(quantized)
    if quantized:
        assert reference.base_model.model.up_proj.base_layer.weight.dtype == torch.uint8  # really 4-bit
    fused = copy.deepcopy(reference)
    assert use_fused_dora(fused) == 2
    assert all(type(v) is FusedDoraLinearVariant for m in fused.modules() for v in getattr(m, "lora_variant", {}).values())
    assert all(type(v) is DoraLinearVariant for m in reference.modules() for v in getattr(m, "lora_variant", {}).values())
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    outputs, grads = [], []
    for model in (reference, fused):
        model.zero_grad()
        out = model(x)
        (out.square().mean()).backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and any("magnitude" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_falls_back_to_peft():
    model = _peft_model(False)
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = torch.nn.Dropout(0.5)
    fused = copy.deepcopy(model)
    use_fused_dora(fused)
    x = torch.randn(2, 64)
    torch.manual_seed(3)
    expected = model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(fused(x), expected)

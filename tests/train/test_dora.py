"""smolbox.train.dora's fused DoRA forward computes peft's function: outputs and every gradient, plain and NF4 layers."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.variants import DoraLinearVariant

from smolbox.train.dora import FusedDoraLinearVariant, use_fused_dora


class TwoLayers(torch.nn.Module):
    def __init__(self, bias: bool = False):
        super().__init__()
        self.up_proj = torch.nn.Linear(64, 128, bias=bias)
        self.down_proj = torch.nn.Linear(128, 64, bias=bias)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.up_proj(x)))


def _peft_model(quantized: bool, bias: bool = False):
    torch.manual_seed(0)
    model = TwoLayers(bias)
    if quantized:
        import bitsandbytes as bnb

        for name in ("up_proj", "down_proj"):
            dense = getattr(model, name)
            layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=bias, compute_dtype=torch.float32,
                                      quant_type="nf4", compress_statistics=True)
            if bias:
                layer.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
            layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
            layer.weight = layer.weight._quantize("cpu") if hasattr(layer.weight, "_quantize") else layer.weight
            layer.support_avx512bf16_for_cpu = False
            setattr(model, name, layer)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True, target_modules=["up_proj", "down_proj"],
                        init_lora_weights="gaussian")
    model = get_peft_model(model, config)
    with torch.no_grad():  # move away from the identity start: B != 0, magnitudes off the norms
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name or name.endswith("base_layer.bias"):
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


@pytest.mark.parametrize("fused_adamw", [False, True], ids=["adamw-foreach", "adamw-fused"])
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_norm_cache_gives_the_uncached_values_across_optimizer_steps(quantized, fused_adamw):
    """adapter.dora_norm_cache: two micro-batches per optimizer step, a checkpointed layer, AdamW steps in between.
    Losses and every adapter gradient are bit for bit those of the uncached fused forward, and the norms are
    recomputed once per change of the adapters, not once per forward or recompute."""
    from torch.utils.checkpoint import checkpoint

    from smolbox.train.dora import NORM_CACHE, DoraNormCache

    plain = _peft_model(quantized)
    use_fused_dora(plain)
    cached = copy.deepcopy(plain)
    cache = DoraNormCache(cached)
    assert len(cache.layers) == 2
    # fused AdamW (transformers' default with torch >= 2.8) leaves the parameters' version counters as they were
    kind = {"fused": True} if fused_adamw else {"foreach": True}
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, **kind) for m in (plain, cached)]
    gen = torch.Generator().manual_seed(2)
    refreshed_after_step = []
    for step in range(3):
        for _ in range(2):  # gradient accumulation: the adapters do not change between these forwards
            x = torch.randn(3, 5, 64, generator=gen)
            losses = []
            for model in (plain, cached):
                out = model(x)  # the whole model's forward refreshes the cache (its pre-hook), as in training
                # a checkpointed layer runs its forward again in backward: the recompute reads the same cache
                hidden = checkpoint(model.base_model.model.up_proj, x, use_reentrant=False)
                out = out + model.base_model.model.down_proj(torch.nn.functional.silu(hidden))
                loss = out.square().mean()
                loss.backward()
                losses.append(loss.detach())
            assert torch.equal(losses[0], losses[1]), step
        for (name, p), q in zip(plain.named_parameters(), cached.parameters()):
            if p.requires_grad:
                assert torch.equal(p.grad, q.grad), f"step {step}: {name}"
        refreshed_after_step.append(cache.refreshed)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    assert refreshed_after_step == [2, 4, 6], "one norm per layer per optimizer step"
    for (name, p), q in zip(plain.named_parameters(), cached.parameters()):
        assert torch.equal(p, q), name
    layer = cached.base_model.model.up_proj
    cached(torch.randn(1, 64))  # after the last step: the cache holds the norm of the current weights
    from smolbox.train.dora import weight_row_norm

    assert torch.equal(getattr(layer, NORM_CACHE)["default"], weight_row_norm(layer, "default", torch.float32))
    cache.remove()
    assert not hasattr(layer, NORM_CACHE)


def test_norm_cache_refreshes_when_adapters_are_replaced():
    """`p.data = ...` (how smolbox restores dtypes on resume) gives a new storage: the cache notices."""
    from smolbox.train.dora import NORM_CACHE, DoraNormCache, weight_row_norm

    model = _peft_model(False)
    use_fused_dora(model)
    cache = DoraNormCache(model)
    model(torch.randn(2, 64))
    layer = model.base_model.model.down_proj
    lora_B = layer.lora_B["default"].weight
    lora_B.data = lora_B.data * 3.0
    model(torch.randn(2, 64))
    assert cache.refreshed == 3
    assert torch.equal(getattr(layer, NORM_CACHE)["default"], weight_row_norm(layer, "default", torch.float32))


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_fused_dora_with_bias_equals_peft(quantized):
    """adapter.fused_dora_bias: layers with a bias (SigLIP's q/k/v) through the fused forward, against peft's."""
    from smolbox.train.dora import FusedBiasDoraLinearVariant

    reference = _peft_model(quantized, bias=True)
    assert reference.base_model.model.up_proj.base_layer.bias is not None
    plain_fused, fused = copy.deepcopy(reference), copy.deepcopy(reference)
    assert use_fused_dora(plain_fused) == 2 and use_fused_dora(fused, with_bias=True) == 2
    assert all(type(v) is FusedBiasDoraLinearVariant for m in fused.modules() for v in getattr(m, "lora_variant", {}).values())
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    outputs, grads = [], []
    for model in (reference, plain_fused, fused):
        model.zero_grad()
        out = model(x)
        (out.square().mean()).backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert torch.equal(outputs[1], outputs[0]), "without with_bias a biased layer must take peft's forward as it is"
    torch.testing.assert_close(outputs[2], outputs[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[2].keys() and any("magnitude" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[2][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_fused_forward_reads_the_cached_norm():
    """The cache is what the forward divides by: doubling a cached norm in place halves that layer's DoRA scale,
    exactly as halving its magnitude does."""
    from smolbox.train.dora import NORM_CACHE, DoraNormCache

    model = _peft_model(False)
    use_fused_dora(model)
    halved = copy.deepcopy(model)
    DoraNormCache(model)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    model(x)
    getattr(model.base_model.model.up_proj, NORM_CACHE)["default"].mul_(2)
    with torch.no_grad():
        halved.base_model.model.up_proj.lora_magnitude_vector["default"].weight.mul_(0.5)
    torch.testing.assert_close(model(x), halved(x), rtol=1e-6, atol=1e-7)

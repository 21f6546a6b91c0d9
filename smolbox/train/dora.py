"""DoRA's forward with fewer passes over the activations: the same function as peft's, computed differently.

peft (0.21) turns a DoRA layer's base output `base = W x` into

    out = base + (m / ||W + s BA|| - 1) * base + (m / ||W + s BA||) * s * B(A x)

with the magnitude `m` kept in fp32 by TRL: about seven elementwise passes over a [tokens, out_features]
tensor per layer, most of them in fp32, plus the casts back to bf16 (the `mul`/`add`/`copy_` kernels that
dominate a profile of QDoRA DPO at micro-batch 16). Algebraically that is

    out = (m / ||W + s BA||) * (base + s * B(A x))

so here `base + s * B(A x)` is one matrix product with the add in its epilogue (`addmm`) and the scale one more
pass, in the activation dtype. The norm is still detached (DoRA paper, section 4.3, as peft does) and computed as
peft computes it; B A is formed directly instead of through an identity matrix.

Only the path peft calls its fast path is replaced (no dropout or eval mode, where `base` is reused); anything
else falls through to peft's code.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.integrations import dequantize_module_weight
from torch.optim.optimizer import register_optimizer_step_post_hook


class FusedDoraLinearVariant(DoraLinearVariant):
    with_bias = False  # layers with a bias take peft's path (adapter.fused_dora_bias: FusedBiasDoraLinearVariant)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        return _fused_forward(module, active_adapter, x, result, with_bias=False, **kwargs)


class FusedBiasDoraLinearVariant(FusedDoraLinearVariant):
    """The fused forward for layers with a bias too (SigLIP's q/k/v projections: the vision tower's adapted layers).

    peft subtracts the bias from the base output and adds `(m/n - 1) * (base - bias) + (m/n) * s * B(A x)` to it:
    `bias + (m/n) * (base - bias + s * B(A x))`. Computed here as `(m/n) * (base + s * B(A x)) + (1 - m/n) * bias`,
    which is the same, without the pass over the activations that `base - bias` took (a kernel of its own in a
    compiled step's profile, docs/benchmarks.md, lease 14): the add goes into the `addmm` and the rest into the
    scaling pass. In bf16 `1 - m/n` is exact (m/n is near 1), and the sum `base + s * B(A x)` rounds once, at the
    magnitude of the base output, as `base - bias` did in peft's path and in this one before."""

    with_bias = True

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        return _fused_forward(module, active_adapter, x, result, with_bias=True, **kwargs)


def _fused_forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, with_bias: bool, **kwargs):
    dropout = module.lora_dropout[active_adapter]
    dora = module.lora_magnitude_vector[active_adapter]
    bias = getattr(module.get_base_layer(), "bias", None)
    if not (isinstance(dropout, torch.nn.Identity) or not module.training) or dora.fan_in_fan_out \
            or (bias is not None and not with_bias):
        return DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
    lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
    scaling = module.scaling[active_adapter]
    cached = getattr(module, NORM_CACHE, {}).get(active_adapter)
    if cached is not None and cached.dtype == x.dtype:
        weight_norm = cached  # this optimizer step's norm (DoraNormCache), computed exactly as below
    else:
        weight_norm = weight_row_norm(module, active_adapter, x.dtype)
    scale = (dora.weight / weight_norm).to(result.dtype)  # gradient flows to the magnitude only
    hidden = lora_A(x.to(lora_A.weight.dtype)).to(result.dtype)
    base = result.reshape(-1, result.shape[-1])
    flat = torch.addmm(base, hidden.reshape(-1, hidden.shape[-1]), lora_B.weight.to(result.dtype).t(), alpha=scaling)
    out = flat.view(result.shape) * scale
    return out if bias is None else out + (1 - scale) * bias.to(result.dtype)


def weight_row_norm(module, adapter: str, dtype: torch.dtype) -> torch.Tensor:
    """||W + s B A|| per output row, detached, in `dtype`: the norm DoRA divides the magnitude by."""
    lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
    with torch.no_grad():
        weight = _dequantized(module.get_base_layer()).to(dtype)
        weight = weight.addmm(lora_B.weight.to(dtype), lora_A.weight.to(dtype), alpha=module.scaling[adapter])
        return torch.linalg.norm(weight, dim=1).to(dtype)


def _dequantized(base_layer) -> torch.Tensor:
    """The base weight, dequantized as peft's `dequantize_module_weight` does. A bitsandbytes 4-bit weight is
    recognised by its quant_state rather than by peft's `weight.__class__.__name__` test, which torch.compile cannot
    trace on bitsandbytes' Params4bit (a graph break inside every compiled block)."""
    weight = base_layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None and weight.dtype == torch.uint8:
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, quant_state)
    return dequantize_module_weight(base_layer)


NORM_CACHE = "_smolbox_dora_norms"  # on a DoRA layer: adapter name -> norm; filled by DoraNormCache


def _reads_cache(module, variant) -> bool:
    """Whether `variant`'s forward on `module` is the fused one (a biased layer without with_bias takes peft's)."""
    return isinstance(variant, FusedDoraLinearVariant) and (
        variant.with_bias or getattr(module.get_base_layer(), "bias", None) is None)


class DoraNormCache:
    """The detached DoRA norm ||W + s B A|| once per change of the adapter weights instead of in every forward.

    The norm depends on the frozen base weight and on A and B only, which change when the optimizer steps: with
    gradient accumulation and gradient checkpointing every micro-batch's forward and every checkpointed recompute
    of one optimizer step would compute (dequantize W, form W + s B A, reduce) the same norm again. A forward
    pre-hook on the whole model compares each layer's A and B (storage and in-place version counter: in-place
    updates such as loading a checkpoint bump the counter, `p.data = ...` changes the storage) with the key of its
    cached norm and recomputes what changed; every optimizer step (a global post-step hook of torch.optim, since
    fused AdamW does not bump version counters) forgets all keys, with the same function (`weight_row_norm`), so the values are bit for
    bit those of the uncached forward. The hook runs outside any compiled region (train.compile compiles layers);
    the fused forward only reads the cache, and computes the norm itself when the cache is missing or in another
    dtype than its input (the norm is cached in the A matrix's dtype, which peft casts the input to unless autocast
    is on). Only layers with the fused forward (smolbox.train.dora) read it. A refreshed norm is
    written into the same tensor (`copy_`), so a compiled layer sees one tensor object and does not recompile.
    """

    def __init__(self, model):
        # Any optimizer step empties the keys: fused AdamW (`torch._fused_adamw_`, transformers' default optimizer
        # with torch >= 2.8) updates parameters without bumping their version counters.
        self.step_handle = register_optimizer_step_post_hook(lambda *args: self.keys.clear())
        self.layers = [m for m in model.modules() if isinstance(getattr(m, "lora_variant", None), dict)
                       and any(_reads_cache(m, v) for v in m.lora_variant.values())]
        self.keys: dict[tuple[int, str], tuple] = {}  # (layer index, adapter) -> what the cached norm was computed from
        self.refreshed = 0  # norms recomputed so far (tests and logs)
        self.handle = model.register_forward_pre_hook(lambda module, args: self.refresh())

    def refresh(self) -> None:
        for i, module in enumerate(self.layers):
            cache = module.__dict__.setdefault(NORM_CACHE, {})
            for adapter, variant in module.lora_variant.items():
                if not _reads_cache(module, variant):
                    continue
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                base = module.get_base_layer().weight
                key = (a.data_ptr(), a._version, b.data_ptr(), b._version, base.data_ptr(), base._version, a.device)
                if self.keys.get((i, adapter)) == key and adapter in cache:
                    continue
                # peft casts a layer's input to its A matrix's dtype (without autocast) before the variant's forward
                norm = weight_row_norm(module, adapter, a.dtype)
                old = cache.get(adapter)
                if old is not None and old.shape == norm.shape and old.device == norm.device:
                    old.copy_(norm)
                else:
                    cache[adapter] = norm
                self.keys[(i, adapter)] = key
                self.refreshed += 1

    def remove(self) -> None:
        self.handle.remove()
        self.step_handle.remove()
        self.keys.clear()
        for module in self.layers:
            module.__dict__.pop(NORM_CACHE, None)


def use_fused_dora(model, with_bias: bool = False) -> int:
    """Swap peft's DoRA variant for the fused one on every adapted linear layer; returns how many. Layers with a
    bias keep peft's forward unless `with_bias` (adapter.fused_dora_bias)."""
    swapped = 0
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if not isinstance(variants, dict):
            continue
        for name, variant in list(variants.items()):
            if type(variant) is DoraLinearVariant:
                variants[name] = FusedBiasDoraLinearVariant() if with_bias else FusedDoraLinearVariant()
                swapped += 1
    return swapped

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


class FusedDoraLinearVariant(DoraLinearVariant):
    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        dropout = module.lora_dropout[active_adapter]
        dora = module.lora_magnitude_vector[active_adapter]
        if not (isinstance(dropout, torch.nn.Identity) or not module.training) or dora.fan_in_fan_out \
                or getattr(module.get_base_layer(), "bias", None) is not None:
            return DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        scaling = module.scaling[active_adapter]
        with torch.no_grad():
            weight = dequantize_module_weight(module.get_base_layer()).to(x.dtype)
            weight = weight.addmm(lora_B.weight.to(x.dtype), lora_A.weight.to(x.dtype), alpha=scaling)
            weight_norm = torch.linalg.norm(weight, dim=1).to(x.dtype)
            del weight
        scale = (dora.weight / weight_norm).to(result.dtype)  # gradient flows to the magnitude only
        hidden = lora_A(x.to(lora_A.weight.dtype)).to(result.dtype)
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]),
                           lora_B.weight.to(result.dtype).t(), alpha=scaling)
        return flat.view(result.shape) * scale


def use_fused_dora(model) -> int:
    """Swap peft's DoRA variant for the fused one on every adapted linear layer; returns how many."""
    swapped = 0
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if not isinstance(variants, dict):
            continue
        for name, variant in list(variants.items()):
            if type(variant) is DoraLinearVariant:
                variants[name] = FusedDoraLinearVariant()
                swapped += 1
    return swapped

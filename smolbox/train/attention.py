"""Which of PyTorch's scaled-dot-product attention kernels a CUDA training run uses (train.cudnn_attention).

The backends are process-wide settings (torch.nn.attention.sdpa_kernel), read when an attention call dispatches
(eager) or when dynamo traces it (train.compile: the kernel is then part of the compiled graph).

- "off" (the schema's default): cuDNN is left out. It builds an execution plan on the CPU for every new shape, which
  makes a new shape's forward and backward far slower than memory-efficient attention's on an H200; unpadded packed
  batches of real data change length nearly every step, and at micro-batch 4 that once made training CPU-bound
  (docs/benchmarks.md, "cuDNN attention off" and lease 16, "Attention kernels alone").
- "all" (default.yaml): cuDNN first, for the vision tower and the packed text, with the packed rows padded to a
  multiple of CUDNN_PAD_MULTIPLE, so that the text meets a few lengths; the vision tower's shape changes only with
  the micro-batch's tile count. Its kernels beat flash attention on SigLIP's head dim 72 (which flash runs as 96)
  and memory-efficient attention on the packed pairs' masked text, and a compiled default.yaml step is faster with
  them, side by side, padded, without a stall (docs/benchmarks.md, leases 15, 16 and 18; unpadded, one step
  of lease 16 stalled).
- "vision": cuDNN first in the vision tower only; the text keeps memory-efficient attention. The vision config's
  attention implementation becomes CUDNN_SDPA, transformers' sdpa function called inside `sdpa_kernel` (registered
  with AttentionInterface): the choice is made inside every attention call, so the checkpointed recompute in
  backward (which reruns the block's forward, not its module call) and dynamo's traced graphs (which trace the
  context) get it too. Side by side it gained less than "all" did (docs/benchmarks.md, lease 18).
"""

from __future__ import annotations

import contextlib

from torch.nn.attention import SDPBackend, sdpa_kernel

WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, *WITHOUT_CUDNN]


def run_backends(mode: str, device: str):
    """The context a run trains in: cuDNN first for "all", left out otherwise (CUDA only)."""
    if device != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(CUDNN_FIRST, set_priority=True) if mode == "all" else sdpa_kernel(WITHOUT_CUDNN)


# With "all", the packed rows' length is rounded up to a multiple of this (smolbox.train.dpo.pack_pairs), so that
# cuDNN builds plans for a few lengths instead of one nearly every batch: up to 63 padding tokens on ~1,200-token
# rows (~5% more text tokens at most) cost far less than building a plan on the CPU for each new shape
# (docs/benchmarks.md, 2026-12-01 lease 16, "Attention kernels alone").
CUDNN_PAD_MULTIPLE = 64

CUDNN_SDPA = "smolbox_cudnn_sdpa"  # an attention implementation name, registered with transformers below


def _cudnn_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with sdpa_kernel(CUDNN_FIRST, set_priority=True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def cudnn_in_vision(model) -> bool:
    """Run the vision tower of `model` (under the DDP and peft wrappers) on CUDNN_SDPA; False if it has none or its
    attention is not sdpa (flash_attention_2 and eager choose no backend)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .dpo import base_model

    vision = getattr(base_model(model).config, "vision_config", None)
    if vision is None or vision._attn_implementation not in ("sdpa", CUDNN_SDPA):
        return False
    AttentionInterface.register(CUDNN_SDPA, _cudnn_sdpa)
    AttentionMaskInterface.register(CUDNN_SDPA, sdpa_mask)  # the masks sdpa takes
    vision._attn_implementation = CUDNN_SDPA
    return True

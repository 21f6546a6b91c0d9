"""Which of PyTorch's scaled-dot-product attention kernels a CUDA training run uses (train.cudnn_attention).

The backends are process-wide settings (torch.nn.attention.sdpa_kernel), read when an attention call dispatches
(eager) or when dynamo traces it (train.compile: the kernel is then part of the compiled graph).

- "off" (default): cuDNN is left out. It builds an execution plan on the CPU for every new shape: ~100 ms a forward
  and backward on an H200, and packed batches of real data change length nearly every step; at micro-batch 4 that
  once made training CPU-bound (docs/benchmarks.md, "cuDNN attention off" and lease 16).
- "all": cuDNN first, for the vision tower and the packed text. Its kernels alone took 0.6 of flash attention's
  time on SigLIP's [tiles, 16, 729, 72] (flash runs head dim 72 as 96) and 0.4 of memory-efficient attention's on
  the packed pairs' masked text; a compiled step's median went from 2.23 to 2.02 s, but one step of 15 took 27 s
  (docs/benchmarks.md, lease 16). Since then the packed rows are padded to a multiple of CUDNN_PAD_MULTIPLE in
  this mode (not measured on a GPU yet).
- "vision": cuDNN first in the vision tower only, whose shape changes only with the number of tiles in a
  micro-batch; the text keeps memory-efficient attention. The vision config's attention implementation becomes
  CUDNN_SDPA, transformers' sdpa function called inside `sdpa_kernel` (registered with AttentionInterface): the
  choice is made inside every attention call, so the checkpointed recompute in backward (which reruns the block's
  forward, not its module call) and dynamo's traced graphs (which trace the context) get it too. On an H200 under
  train.compile it ran 8 steps without a stall at 7.54 pairs/s over the median step, not yet beside
  default:compile (docs/benchmarks.md, lease 17).
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
# rows (~2.6% more text tokens at most), against ~100 ms of plan building per new shape (docs/benchmarks.md).
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

"""train.compile: torch.compile applied to each repeated block of the model (regional compilation).

SmolVLM is two stacks of identical blocks: the SigLIP encoder layers of the vision tower and the Llama decoder
layers of the text model. Both are transformers' `GradientCheckpointingLayer`s, so "each repeated block" is each
module of that class. `nn.Module.compile` compiles a module's call in place (the module object, its parameters and
the peft adapters inside it stay where they are), and since dynamo inlines nn.Modules and treats their parameters
as inputs, the blocks of one stack share one compiled graph: compile time is that of two blocks, not 51.

What it buys: the elementwise work between the matrix products (norms, residual adds, the MLP's activation and
gate, rotary embeddings, DoRA's scale after its `addmm`) fused into fewer kernels; a profile of the eager step at
micro-batch 16 spends more GPU time in `mul`/`add`/`copy_` kernels than in matrix products (docs/benchmarks.md).
The function computed is the same; inductor's fused kernels may round intermediate bf16 values differently
(it keeps them in fp32 inside a fused kernel), which is the only difference (tests/train/test_compile.py).

How it fits with the rest:
- Gradient checkpointing: transformers 5.23 checkpoints a layer's `forward` (not `__call__`), so the checkpoint
  sits inside the compiled call; dynamo captures the non-reentrant checkpoint (`use_reentrant=False`, what TRL
  sets) as a higher-order op and AOT autograd recomputes the region in backward, as eager checkpointing does.
- bitsandbytes 0.50: its 4-bit kernels are `torch.library` custom ops with fake implementations
  (`bitsandbytes::dequantize_4bit`, `gemm_4bit`, ...), so a compiled graph calls them as opaque nodes.
- Shapes: packed sequence lengths and the number of image tiles change every batch, so the blocks are compiled
  with `dynamic=True`: sizes symbolic from the first call, one graph per mode (training; evaluation) instead of
  dynamo's default of a static graph first and a dynamic one at the first new shape, a compilation that every
  batch would make useless anyway. Parameters keep static shapes (dynamo's default), so the weights' sizes
  stay constants in the kernels. No bucketing: padding to buckets would cost compute for nothing.
  `recompile_limit` is raised so the few variants a run needs (train / eval, adapters on / off) never fall back to
  eager. The reference pass before training (train.precompute_ref_logps) runs eagerly (trainer.py).
- DDP: only the blocks are compiled, not the DDP-wrapped model, so DDP's gradient hooks are the eager ones.
"""

from __future__ import annotations

import torch

RECOMPILE_LIMIT = 32  # per code object: each block class sees train / eval x adapters on / off


def compile_blocks(model, backend: str = "inductor") -> int:
    """Compile every repeated transformer block of `model` in place; returns how many blocks."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # With dynamic=True dynamo also turns Python floats read in a block (peft's `scaling`, an addmm `alpha`) into
    # 0-d float64 graph inputs, and inductor (torch 2.13, CPU) then fails to lower their `.item()`
    # ("KeyError: 'unbacked_bindings'"). They are constants of the run: keep them specialized.
    torch._dynamo.config.specialize_float = True
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for block in blocks:
        block.compile(backend=backend, dynamic=True)
    return len(blocks)

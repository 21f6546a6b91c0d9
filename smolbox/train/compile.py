"""train.compile: torch.compile applied to each repeated block of the model (regional compilation), with the
gradient checkpoint outside the compiled region.

SmolVLM is two stacks of identical blocks: the SigLIP encoder layers of the vision tower and the Llama decoder
layers of the text model. Both are transformers' `GradientCheckpointingLayer`s, so "each repeated block" is each
module of that class. For each block class, `compiled_class` makes (once) a subclass whose `forward` calls
`torch.compile` of the class's own forward, and `compile_blocks` swaps each block's `__class__` to it: the module
objects, their parameters and the peft adapters inside them stay where they are (state_dict keys, `save_pretrained`
and DDP's parameter order unchanged). Every block of a class calls the one compiled function, and dynamo inlines
nn.Modules and lifts their parameters as graph inputs, so the blocks of one stack share its graphs: one per mode
(training; no-grad reference or evaluation passes; tests/train/test_compile.py counts them), not one per block,
and compile time is that of two blocks, not 51.

Why the checkpoint stays outside: transformers 5.23 checkpoints a layer's `forward`, wrapped per class in
`GradientCheckpointingLayer.__init_subclass__`, and only the outermost wrapper checkpoints (so that FSDP2's
subclasses keep their hooks outside the checkpoint). `nn.Module.compile` compiles the module's call, so the
checkpoint ran inside the compiled region, as a higher-order op whose recomputation is left to AOT autograd's
partitioner: on an H200 (torch 2.11, inductor) the blocks' activations were kept instead of recomputed, several
times eager's peak memory at default.yaml's micro-batch (docs/benchmarks.md, "Training speed, second round"); on
CPU (torch 2.13) the same graphs recompute, so a CPU test cannot show that size (docs/notes.md). The subclass's
forward is wrapped by transformers like any subclass's and is the outermost, so the eager checkpoint calls the
compiled function: in forward its saved tensors go to the checkpoint's hooks and are dropped, in backward the
checkpoint reruns the compiled forward and then its compiled backward, as eager checkpointing does with the eager
block (the same graph serves with checkpointing off).

What it buys: the elementwise work between the matrix products (norms, residual adds, the MLP's activation and
gate, rotary embeddings, DoRA's scale after its `addmm`) fused into fewer kernels; a profile of the eager step at
micro-batch 16 spends more GPU time in `mul`/`add`/`copy_` kernels than in matrix products (docs/benchmarks.md).
The function computed is the same. Left alone, inductor keeps a fused kernel's intermediates in fp32 where eager
rounds each op's output to bf16; on the real-shape model that moved a 50-step loss curve several times further
from eager than two eager runs are from each other (docs/benchmarks.md, lease 3). `train.compile_eager_rounding`
(on) sets inductor's `emulate_precision_casts`, which rounds at the same places eager does, so the remaining
difference is the kernels' own (summation order), as between two eager runs (docs/benchmarks.md, lease 14). The
CPU tests (tests/train/test_compile.py) capture with aot_eager, which generates no kernels, so this option is
measured on a GPU only (a toy block compiled by inductor on CPU: docs/notes.md).

How it fits with the rest:
- bitsandbytes 0.50: its 4-bit kernels are `torch.library` custom ops with fake implementations
  (`bitsandbytes::dequantize_4bit`, `gemm_4bit`, ...), so a compiled graph calls them as opaque nodes.
- Graph breaks (peft's DoRA forward on the vision tower's biased q/k/v without `adapter.fused_dora_bias` reads the
  4-bit weight's `__class__` and sets a `.data`) split a block into several graphs around eager parts; the
  checkpoint, being outside, still recomputes all of it. (With the checkpoint inside, such a break made dynamo run
  the whole checkpointed block eagerly.)
- Shapes: packed sequence lengths and the number of image tiles change every batch, so the blocks are compiled
  with `dynamic=True`: sizes symbolic from the first call, one graph per mode instead of dynamo's default of a
  static graph first and a dynamic one at the first new shape, a compilation that every batch would make useless
  anyway. Parameters keep static shapes (dynamo's default), so the weights' sizes stay constants in the kernels.
  No bucketing: padding to buckets would cost compute for nothing. `recompile_limit` is raised so the few variants
  a run needs (train / eval, adapters on / off) never fall back to eager. The reference pass before training
  (train.precompute_ref_logps) runs the compiled blocks as well (trainer.py), but under no_grad they run the
  inference graphs, which round otherwise than the training graphs the policy runs (docs/benchmarks.md, lease 4).
- DDP: only the blocks are compiled, not the DDP-wrapped model, so DDP's gradient hooks are the eager ones.
- Pickling a whole model (not done by smolbox: checkpoints are state dicts) would need the subclass by name; it is
  made at run time, so only the process that compiled could load such a pickle.
"""

from __future__ import annotations

import torch

RECOMPILE_LIMIT = 32  # per code object: each block class sees train / eval x adapters on / off
_COMPILED_CLASSES: dict[tuple[type, str, bool], type] = {}  # (block class, backend, eager rounding) -> compiled subclass


def compiled_class(cls: type, backend: str, eager_rounding: bool = True) -> type:
    """The subclass of block class `cls` whose forward is `torch.compile` of `cls`'s own forward, made once per
    (class, backend, rounding): every block of the class calls the one compiled function, so they share its graphs.
    transformers wraps this forward in its checkpoint as it wraps any subclass's, and only the outermost wrapper
    checkpoints: the checkpoint calls the compiled function from outside. `eager_rounding` (inductor only) makes
    the fused kernels round each intermediate to bf16 where eager's separate kernels do."""
    key = (cls, backend, eager_rounding)
    if key not in _COMPILED_CLASSES:
        options = {"emulate_precision_casts": eager_rounding} if backend == "inductor" else None
        # `cls.forward` is transformers' checkpoint wrapper (functools.wraps): the layer's own forward is under it
        compiled = torch.compile(cls.forward.__wrapped__, backend=backend, dynamic=True, options=options)

        def forward(self, *args, **kwargs):
            return compiled(self, *args, **kwargs)

        _COMPILED_CLASSES[key] = type(f"Compiled{cls.__name__}", (cls,), {"forward": forward, "_eager_class": cls})
    return _COMPILED_CLASSES[key]


def compile_blocks(model, backend: str = "inductor", eager_rounding: bool = True) -> int:
    """Compile every repeated transformer block of `model` in place; returns how many blocks."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # With dynamic=True dynamo also turns Python floats read in a block (peft's `scaling`, an addmm `alpha`) into
    # 0-d float64 graph inputs, and inductor (torch 2.13, CPU) then fails to lower their `.item()`
    # ("KeyError: 'unbacked_bindings'"). They are constants of the run: keep them specialized.
    torch._dynamo.config.specialize_float = True
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for block in blocks:
        eager = getattr(type(block), "_eager_class", type(block))  # compiling twice keeps one level
        block.__class__ = compiled_class(eager, backend, eager_rounding)
    return len(blocks)


def compile_counts() -> dict:
    """What dynamo has compiled in this process so far (its own counters): graphs, and graph breaks by reason."""
    counters = torch._dynamo.utils.counters
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": dict(counters["graph_break"])}


def compiled_since(before: dict) -> dict:
    """compile_counts() now, less `before`: what a run compiled. A graph break means eager code inside a block (and
    a slower step); its reason says where (the run's manifest keeps them, train.log counts them)."""
    now = compile_counts()
    breaks = {reason: n - before["graph_breaks"].get(reason, 0) for reason, n in now["graph_breaks"].items()}
    return {"graphs": now["graphs"] - before["graphs"], "graph_breaks": {r: n for r, n in breaks.items() if n > 0}}

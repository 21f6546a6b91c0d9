"""train.compile (smolbox.train.compile) computes the eager function with the gradient checkpoint outside the
compiled region: the DPO loss and every adapter gradient of the tiny SmolVLM, NF4 and DoRA (fused forward, norm
cache on and off), with non-reentrant gradient checkpointing on and off, compiled block by block against the same
model run eagerly; the blocks' own activations are not kept under checkpointing; one stack shares its graphs.

On CPU the capture runs with backend "aot_eager": dynamo's graph capture and AOT autograd's forward/backward
split exactly as with inductor, without generating code, which on the shared 2-core machine would take minutes;
inductor's code generation is what the GPU benchmark measures (bench/train_bench.py `default:compile`). aot_eager
runs the same aten operators, so the values agree to fp32 rounding; through bitsandbytes' 4-bit CPU kernels that
rounding surfaces at bf16 size (tests/train/test_dpo.py).
"""

import datasets
import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from smolbox import tiny
from smolbox.config import load_config
from smolbox.models import load_base
from smolbox.train import build_trainer, dpo
from smolbox.train.compile import compile_blocks, compile_counts, compiled_since

GRAD_TOLERANCE = 2e-2  # relative, per tensor: the NF4 CPU kernels' rounding (see test_dpo.py); a wrong gradient is off by far more


class RecordingBackend:
    """aot_eager, keeping every graph dynamo hands it."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)


def _trainer(tmp_path, norm_cache: bool, dora_bias: bool):
    cfg = load_config("tiny", overrides={"train.gradient_checkpointing": True, "adapter.dora_norm_cache": norm_cache,
                                         "adapter.fused_dora_bias": dora_bias}, env={}, dotenv=None)
    model_path = tiny.resolve(cfg.model.id, "model")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    rows = datasets.load_dataset(tiny.resolve(cfg.data.id, "data"), split="train[:4]")
    torch.manual_seed(0)
    trainer = build_trainer(cfg, tmp_path, "cpu", load_base(cfg, "cpu", "sdpa", model_path), processor, rows, None)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters away from their start, so that every tensor has a gradient
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trainer.model.train()
    batch = trainer._prepare_inputs(trainer.data_collator([rows[i] for i in range(4)]))
    other = trainer._prepare_inputs(trainer.data_collator([rows[i] for i in (2, 1)]))  # other pairs, other sizes
    return trainer, batch, other


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _loss_and_grads(model, batch, beta):
    model.zero_grad(set_to_none=True)
    loss = dpo.dpo_step(model, dict(batch), beta).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(loss, grads, eager_loss, eager_grads):
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, expected in eager_grads.items():
        assert torch.count_nonzero(expected) > 0, name
        relative = (grads[name] - expected).norm() / expected.norm()
        assert relative < GRAD_TOLERANCE, f"{name}: relative gradient difference {relative:.2e}"


def _saved_bytes(model, batch, beta) -> int:
    """Bytes autograd holds for backward after a DPO step's forward, outside any checkpoint: what the step keeps
    until backward (the model's own parameters and buffers, which it holds anyway, left out). A non-reentrant
    checkpoint installs its own saved-tensor hooks inside its region, so what is saved there reaches it, not this
    hook; tensors are counted once per storage."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    held = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = dpo.dpo_step(model, dict(batch), beta).loss
    loss.backward()
    return sum(held.values())


def _block_modes(model):
    """Records (block class, grad mode, whether the input requires grad) of every block call: what dynamo's guards
    tell apart. Returns the set and the hook handles."""
    modes = set()

    def record(block, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        modes.add((type(block).__name__, torch.is_grad_enabled(), hidden.requires_grad))

    return modes, [b.register_forward_pre_hook(record, with_kwargs=True) for b in _blocks(model)]


@pytest.mark.slow  # an aot_eager compilation of the tiny model's blocks takes tens of seconds on a CPU core
@pytest.mark.parametrize("norm_cache, dora_bias", [(False, False), (True, True)],
                         ids=["compile-alone", "with-norm-cache-and-dora-bias"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(tiny_bundle, tmp_path, norm_cache, dora_bias):
    """Checkpointed, the compiled blocks give eager's loss and gradients and hold for backward exactly what the eager
    checkpointed step holds: the blocks' own activations are recomputed, not kept, far below a step without
    checkpointing; what would have caught the activations kept inside the compiled region (docs/benchmarks.md,
    "Training speed, second round"). With checkpointing off the same graphs serve and still compute the eager
    function (the checkpoint is not part of them)."""
    trainer, batch, other = _trainer(tmp_path, norm_cache, dora_bias)
    model, beta = trainer.model, trainer.beta
    blocks = _blocks(model)
    assert blocks and all(m.gradient_checkpointing for m in blocks), "checkpointing must be on in the compiled blocks"
    eager_checkpointed = _saved_bytes(model, batch, beta)
    eager_loss, eager_grads = _loss_and_grads(model, batch, beta)
    model.activation_checkpointing_disable()
    assert not any(b.gradient_checkpointing for b in _blocks(model))
    eager_kept = _saved_bytes(model, batch, beta)
    assert eager_kept > 5 * eager_checkpointed, (eager_kept, eager_checkpointed)
    uncheckpointed_loss, uncheckpointed_grads = _loss_and_grads(model, batch, beta)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    torch._dynamo.reset()
    before = compile_counts()  # what the run's manifest records: the graphs and graph breaks of what follows
    backend = RecordingBackend()
    assert compile_blocks(model, backend=backend) == len(blocks)
    assert all(type(b).__name__.startswith("Compiled") for b in _blocks(model))
    modes, hooks = _block_modes(model)
    compiled_loss, compiled_grads = _loss_and_grads(model, batch, beta)
    for hook in hooks:
        hook.remove()
    compiled = compiled_since(before)
    graphs = compiled["graphs"]
    assert graphs > 0 and len(backend.graphs) == graphs, "nothing was compiled"
    # The checkpoint is outside the compiled region: no graph holds it (the activations kept in docs/benchmarks.md,
    # "Training speed, second round", came from transformers' checkpoint inside `nn.Module.compile`'s graph, as a
    # tag_activation_checkpoint higher-order op).
    targets = {str(n.target) for gm in backend.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "checkpoint" in t], targets
    breaks = compiled["graph_breaks"]
    if dora_bias:
        # every adapted layer on smolbox's fused forward: each block is one graph, and the blocks of a stack share
        # it: one graph per (block class, grad mode, input requiring grad), not one per block. The tiny model has
        # 2 blocks per stack; in the reference pass (no grad) the first vision block's input requires grad (peft's
        # input hook) and the second's does not, hence 5 = vision (train; no-grad x 2) + text (train; no-grad).
        assert not breaks, breaks
        assert graphs == len(modes), (graphs, sorted(modes))
        assert len(modes) < len(blocks) + 2, sorted(modes)
    else:
        # the vision tower's q/k/v (they have a bias) take peft's DoRA forward, which reads the 4-bit weight's
        # `__class__` (bitsandbytes' Params4bit, a tensor subclass) and sets a tensor's `.data`: dynamo breaks the
        # block's graph there and runs those parts eagerly (docs/notes.md); the checkpoint around them is eager
        assert any("Params4bit" in reason for reason in breaks), breaks

    assert eager_loss.item() != pytest.approx(0.6931, abs=1e-4), "adapters were not perturbed: the check would be vacuous"
    assert any("lora_magnitude_vector" in n for n in eager_grads) and any("vision" in n for n in eager_grads)
    _assert_same(compiled_loss, compiled_grads, eager_loss, eager_grads)
    assert _saved_bytes(model, batch, beta) == eager_checkpointed, eager_kept

    # Without checkpointing: the same graphs, the eager function
    model.activation_checkpointing_disable()
    _assert_same(*_loss_and_grads(model, batch, beta), uncheckpointed_loss, uncheckpointed_grads)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert compiled_since(before)["graphs"] == graphs, "checkpointing off recompiled"

    # Another batch: other sequence lengths, tile count and batch size reuse the dynamic-shape graphs
    first, second = batch[dpo.PACKED], other[dpo.PACKED]  # the trainer's collator packs the pairs
    assert second["input_ids"].shape != first["input_ids"].shape and second["pixel_values"].shape != first["pixel_values"].shape
    _loss_and_grads(model, other, beta)
    assert compiled_since(before)["graphs"] == graphs, "a new batch shape recompiled"


def test_compiled_blocks_save_the_same_adapter(tiny_bundle, tmp_path):
    """Swapping the blocks' class leaves the module tree alone: the same state_dict keys and the same saved
    adapter (names and values); compiling twice does not stack subclasses."""
    trainer, _, _ = _trainer(tmp_path, norm_cache=False, dora_bias=True)
    model = trainer.model
    keys = list(model.state_dict())
    model.save_pretrained(tmp_path / "eager")
    compile_blocks(model, backend="aot_eager")
    compile_blocks(model, backend="aot_eager")
    assert all(type(b).__mro__[1].__name__ == type(b).__name__.removeprefix("Compiled") for b in _blocks(model))
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "compiled")
    from safetensors.torch import load_file

    eager, compiled = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("eager", "compiled"))
    assert compiled.keys() == eager.keys() and eager
    for name, tensor in eager.items():
        assert torch.equal(compiled[name], tensor), name

"""train.compile (smolbox.train.compile) computes the eager function: the DPO loss and every adapter gradient of
the tiny SmolVLM, NF4 and DoRA (fused forward, norm cache on and off), with non-reentrant gradient checkpointing,
compiled block by block against the same model run eagerly.

On CPU the capture runs with backend "aot_eager": dynamo's graph capture and AOT autograd's forward/backward
split (with the checkpointed region recomputed) exactly as with inductor, without generating code, which on the
shared 2-core machine would take minutes; inductor's code generation is what the GPU benchmark measures
(bench/train_bench.py `default:compile`). aot_eager runs the same aten operators, so the values agree to fp32
rounding; through bitsandbytes' 4-bit CPU kernels that rounding surfaces at bf16 size (tests/train/test_dpo.py).
"""

import datasets
import pytest
import torch

from smolbox import tiny
from smolbox.config import load_config
from smolbox.models import load_base
from smolbox.train import build_trainer, dpo
from smolbox.train.compile import compile_blocks

GRAD_TOLERANCE = 2e-2  # relative, per tensor: the NF4 CPU kernels' rounding (see test_dpo.py); a wrong gradient is off by far more


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


def _loss_and_grads(model, batch, beta):
    model.zero_grad(set_to_none=True)
    loss = dpo.dpo_step(model, dict(batch), beta).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("norm_cache, dora_bias", [(False, False), (True, True)],
                         ids=["compile-alone", "with-norm-cache-and-dora-bias"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(tiny_bundle, tmp_path, norm_cache, dora_bias):
    trainer, batch, other = _trainer(tmp_path, norm_cache, dora_bias)
    model = trainer.model
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert blocks and all(m.gradient_checkpointing for m in blocks), "checkpointing must be on in the compiled blocks"
    eager_loss, eager_grads = _loss_and_grads(model, batch, trainer.beta)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_blocks(model, backend="aot_eager") == len(blocks)
    compiled_loss, compiled_grads = _loss_and_grads(model, batch, trainer.beta)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    if dora_bias:
        # every adapted layer on smolbox's fused forward: each block, its checkpoint included, is one graph
        assert not breaks, breaks
    else:
        # the vision tower's q/k/v (they have a bias) take peft's DoRA forward, which clears a dict inside the
        # checkpointed region: dynamo runs that checkpoint eagerly (docs/notes.md)
        assert any("side effect" in reason for reason in breaks), breaks

    assert eager_loss.item() != pytest.approx(0.6931, abs=1e-4), "adapters were not perturbed: the check would be vacuous"
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    assert any("lora_magnitude_vector" in n for n in eager_grads) and any("vision" in n for n in eager_grads)
    for name, expected in eager_grads.items():
        assert torch.count_nonzero(expected) > 0, name
        relative = (compiled_grads[name] - expected).norm() / expected.norm()
        assert relative < GRAD_TOLERANCE, f"{name}: relative gradient difference {relative:.2e}"

    # Another batch: other sequence lengths, tile count and batch size reuse the dynamic-shape graphs
    assert other["input_ids"].shape != batch["input_ids"].shape and other["pixel_values"].shape != batch["pixel_values"].shape
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _loss_and_grads(model, other, trainer.beta)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a new batch shape recompiled"

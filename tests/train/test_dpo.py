"""Our DPO forward + loss (smolbox.train.dpo) against stock TRL's DPOTrainer on the same batch and the same 4-bit model."""

import datasets
import pytest
import torch
from trl import DPOConfig, DPOTrainer

from smolbox import tiny
from smolbox.config import load_config
from smolbox.models import load_base
from smolbox.train import build_trainer, dpo
from smolbox.train.trainer import PromptsOnce


# Un-quantized, the two paths agree to fp32 rounding: relative to each tensor's gradient, which for the pretrained
# tiny model's first vision attention layer is small enough (its attention is peaked) that summation order shows.
# Through bitsandbytes' 4-bit CPU kernels, fp32-rounding differences in the upstream gradient surface as bf16-sized
# differences, a few bf16 steps at most (the sizes: docs/notes.md, "Learned building smolbox"). A wrong gradient is
# off by far more.
GRAD_TOLERANCE = {False: 3e-4, True: 2e-2}


@pytest.fixture(scope="module", params=[False, True], ids=["fp32", "nf4"])
def trainer_and_batch(request, tiny_bundle, tmp_path_factory):
    cfg = load_config("tiny", overrides={"quant.load_in_4bit": request.param}, env={}, dotenv=None)
    model_path = tiny.resolve(cfg.model.id, "model")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    rows = datasets.load_dataset(tiny.resolve(cfg.data.id, "data"), split="train[:4]")
    model = load_base(cfg, "cpu", "sdpa", model_path)
    trainer = build_trainer(cfg, tmp_path_factory.mktemp("run"), "cpu", model, processor, rows, None)
    # Move the adapters away from their zero-B start, so policy != reference and every LoRA/DoRA tensor gets a gradient
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    # TRL's batch, as stock TRL computes on it (the trainer's own collator packs it: test_batches_are_packed_in_the_loader)
    batch = trainer._prepare_inputs(trainer.data_collator.collator([rows[i] for i in range(4)]))
    trainer.model.train()
    trainer.rows = rows
    return trainer, batch, GRAD_TOLERANCE[request.param]


def _loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_loss_and_gradients_equal_stock_trl(trainer_and_batch):
    trainer, batch, grad_tolerance = trainer_and_batch
    model = trainer.model
    stock_loss, stock_grads = _loss_and_grads(model, lambda: DPOTrainer.compute_loss(trainer, model, dict(batch)))
    our_loss, our_grads = _loss_and_grads(model, lambda: dpo.dpo_step(model, dict(batch), trainer.beta).loss)

    assert stock_loss.item() != pytest.approx(0.6931, abs=1e-4), "adapters were not perturbed: the check would be vacuous"
    torch.testing.assert_close(our_loss, stock_loss, rtol=1e-5, atol=1e-6)
    assert stock_grads.keys() == our_grads.keys() and len(our_grads) > 0
    assert any("lora_magnitude_vector" in n for n in our_grads), "DoRA magnitudes must be trained too"
    for name in stock_grads:
        assert torch.count_nonzero(stock_grads[name]) > 0, name
        relative = (our_grads[name] - stock_grads[name]).norm() / stock_grads[name].norm()
        assert relative < grad_tolerance, f"{name}: relative gradient difference {relative:.2e}"


def test_reference_is_the_model_with_adapters_disabled(trainer_and_batch):
    trainer, batch, _ = trainer_and_batch
    model = trainer.model
    ref = dpo.reference_logps(model, dict(batch))
    with torch.no_grad():
        policy = dpo.completion_logps(model, dict(batch))
        with model.disable_adapter():
            again = dpo.completion_logps(model, dict(batch))
    torch.testing.assert_close(ref, again)
    assert not torch.allclose(ref, policy), "perturbed adapters must change the policy"


def test_sigmoid_loss_matches_the_formula():
    policy = torch.tensor([-3.0, -5.0, -4.0, -4.0])  # chosen_0, chosen_1, rejected_0, rejected_1
    reference = torch.tensor([-4.0, -4.0, -4.0, -4.0])
    loss, chosen_rewards, rejected_rewards = dpo.sigmoid_loss(policy, reference, beta=0.5)
    expected = -(torch.nn.functional.logsigmoid(torch.tensor(0.5)) + torch.nn.functional.logsigmoid(torch.tensor(-0.5))) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([0.0, 0.0]))


def test_trl_config_defaults_we_rely_on():
    # activation_checkpointing, as smolbox's trainer passes it: TRL's default sets transformers 5.23's old name, which warns
    args = DPOConfig(output_dir="unused", use_cpu=True, bf16=False, activation_checkpointing=True)
    assert args.loss_type == ["sigmoid"] and args.f_divergence_type == "reverse_kl"
    assert args.ld_alpha is None and not args.use_weighting


def test_pairs_are_packed_and_give_the_unpacked_log_probs(trainer_and_batch):
    """TRL's batch repeats each pair's prompt and image; smolbox runs a pair as one packed row. Same numbers."""
    trainer, batch, _ = trainer_and_batch
    model = trainer.model
    packed = dpo.pack_pairs(dict(batch), model.get_base_model().config)
    assert packed is not None, "a TRL vision batch must take the packed path"
    b = batch["input_ids"].shape[0] // 2
    assert packed.input_ids.shape[0] == b and packed.pixel_values.shape[0] == b
    assert packed.targets.numel() == int(batch["completion_mask"].sum())
    padded = dpo.pack_pairs(dict(batch), model.get_base_model().config, pad_multiple=64)
    assert padded.input_ids.shape[1] % 64 == 0
    assert padded.input_ids.shape[1] > packed.input_ids.shape[1]
    with torch.no_grad():
        ours = dpo.completion_logps(model, dict(batch))
        unpacked = dpo.completion_logps(model, dict(batch), pack=False)
        ours_padded = dpo.completion_logps(model, dict(batch), pad_multiple=64)
    torch.testing.assert_close(ours, unpacked, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours_padded, ours, rtol=1e-5, atol=1e-4)  # padding changes no value


def test_pairs_with_different_images_are_not_packed(trainer_and_batch):
    trainer, batch, _ = trainer_and_batch
    other = dict(batch)
    other["pixel_values"] = batch["pixel_values"].clone()
    other["pixel_values"][-1] += 1.0
    assert dpo.pack_pairs(other, trainer.model.get_base_model().config) is None


def test_batches_are_packed_in_the_loader(trainer_and_batch):
    """The trainer's collator packs in the DataLoader worker: each pair's tiles once, in the model's dtype, and the
    segment ids instead of the 4D mask; the log-probs are those of TRL's unpacked batch."""
    trainer, batch, _ = trainer_and_batch
    model = trainer.model
    examples = [trainer.rows[i] for i in range(4)]
    loaded = trainer.data_collator(examples)
    assert set(loaded) == {dpo.PACKED}, "a TRL vision batch must be packed where it is made"
    packed = loaded[dpo.PACKED]
    assert packed["pixel_values"].shape[0] == len(examples) and packed["pixel_values"].dtype == model.get_base_model().dtype
    assert packed["segment"].shape == packed["input_ids"].shape
    on_device = trainer._prepare_inputs(loaded)
    with torch.no_grad():
        ours = dpo.completion_logps(model, on_device)
        unpacked = dpo.completion_logps(model, dict(batch), pack=False)
    torch.testing.assert_close(ours, unpacked, rtol=1e-5, atol=1e-4)
    assert trainer.floating_point_ops(on_device) == 6 * packed["input_ids"].numel() * model.num_parameters(exclude_embeddings=True)


def test_prompts_once_gives_the_processors_tensors(trainer_and_batch):
    """TRL's collator asks for [prompts] * 2 with [images] * 2; the wrapper processes one half and repeats it."""
    trainer, _, _ = trainer_and_batch
    once = trainer.data_collator.collator.processor
    assert isinstance(once, PromptsOnce)
    examples = [dict(trainer.rows[i]) for i in range(3)]
    images = [example["images"] for example in examples] * 2
    prompts = [f"<image>Question {i % 3}?" for i in range(6)]
    kwargs = dict(padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    expected = once.processor(images=images, text=prompts, **kwargs)

    class Counting:  # the processor, counting the rows it is asked to process
        rows = 0

        def __call__(self, images=None, text=None, **kw):
            Counting.rows += len(text)
            return once.processor(images=images, text=text, **kw)

    got = PromptsOnce(Counting())(images=images, text=prompts, **kwargs)
    assert Counting.rows == 3, "the repeated half must not be processed again"
    assert expected.keys() == got.keys() and "pixel_values" in got
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    other = images[:3] + [list(example["images"]) for example in examples]  # equal, but other objects: processed whole
    torch.testing.assert_close(once(images=other, text=prompts, **kwargs)["pixel_values"], expected["pixel_values"])


def test_the_loader_collator_survives_a_spawned_worker(trainer_and_batch):
    """DataLoader workers started with spawn (macOS, Windows) receive the collator pickled."""
    import pickle

    trainer, _, _ = trainer_and_batch
    collator = pickle.loads(pickle.dumps(trainer.data_collator))
    assert isinstance(collator.collator.processor, PromptsOnce)
    examples = lambda: [trainer.rows[i] for i in range(2)]  # noqa: E731 (TRL's collator edits the rows it is given)
    again, first = collator(examples())[dpo.PACKED], trainer.data_collator(examples())[dpo.PACKED]
    assert again.keys() == first.keys()
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0)

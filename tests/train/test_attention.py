"""train.cudnn_attention (smolbox.train.attention): which attention backends each part of the tiny SmolVLM runs
under. The settings are process-wide flags that the CPU build of torch holds too, so the test records them at every
scaled-dot-product attention call (forward, and the checkpointed recompute in backward); which kernel a CUDA GPU then
runs, and how fast, is measured on one (bench/train_bench.py `:cudnn-vision`, docs/benchmarks.md)."""

import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

from smolbox import tiny
from smolbox.train.attention import cudnn_in_vision, run_backends


def test_cudnn_first_in_the_vision_tower_only_forward_and_recompute(tiny_bundle, monkeypatch):
    calls = []  # (query length, whether cuDNN attention is enabled) at every attention call; transformers' sdpa
    original = F.scaled_dot_product_attention  # function looks the torch function up when it runs

    def spy(query, *args, **kwargs):
        calls.append((query.shape[-2], torch.backends.cuda.cudnn_sdp_enabled()))
        return original(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = AutoModelForImageTextToText.from_pretrained(tiny.resolve("builtin:tiny", "model"), attn_implementation="sdpa")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    pixels = torch.randn(2, 3, vision.image_size, vision.image_size)
    ids = torch.randint(0, model.config.text_config.vocab_size, (1, 12))
    assert patches != ids.shape[1]
    before = torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()

    def step():
        calls.clear()
        with run_backends("vision", "cuda"):  # cuDNN left out, but where chosen
            images = model.model.vision_model(pixel_values=pixels).last_hidden_state
            text = model.model.text_model(input_ids=ids).last_hidden_state
            forward = len(calls)
            (images.sum() + text.sum()).backward()
            assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before
        # every layer's attention ran twice: forward, then the checkpointed recompute in backward
        layers = vision.num_hidden_layers + model.config.text_config.num_hidden_layers
        assert forward == layers and len(calls) == 2 * layers, calls
        return {length: {enabled for n, enabled in calls if n == length} for length in (patches, ids.shape[1])}

    assert step() == {patches: {False}, ids.shape[1]: {False}}
    assert cudnn_in_vision(model)
    assert step() == {patches: {True}, ids.shape[1]: {False}}
    assert run_backends("vision", "cpu").__class__.__name__ == "nullcontext"

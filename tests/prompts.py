"""Model inputs several test modules feed to PyTorch and to the ONNX graphs alike."""


def left_padded_batch(processor):
    """Two prompts of different lengths and tile counts: left padding, and an all-zero padding image."""
    from PIL import Image

    tall = Image.new("RGB", (40, 90), (200, 30, 30))
    small = Image.new("RGB", (30, 30), (20, 200, 60))
    prompts = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square? Answer in one word."}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare?"}]}],
    ]
    texts = [processor.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    processor.image_processor.do_image_splitting = True
    return processor(text=texts, images=[[tall], [small, tall]], padding=True, padding_side="left", return_tensors="pt")

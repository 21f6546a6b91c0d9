"""Image facts two stages share (training's data cleaning and the server's preprocessing): no torch."""

from __future__ import annotations

from PIL import Image

WHITE = (255, 255, 255, 255)


def on_white(image: Image.Image) -> Image.Image:
    """The image as RGB with its transparency (alpha band, palette alpha or a 'transparency' colour) laid on white,
    as transformers' convert_to_rgb does; each caller decides which images have transparency to lay."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")

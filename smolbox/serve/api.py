"""The OpenAI chat-completions request: typed models, the checks that need the server's limits, and the errors.

Validation is apart from scheduling: a request that reaches the engine is a `Prompt` with its images decoded and
within every limit. Anything else is an `APIError`, which the app answers as OpenAI does: HTTP status and
{"error": {"message", "type", "param", "code"}}, the message saying what to change.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import ServeConfig

ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message that says what to change, type, param, code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def __reduce__(self):  # raised in a preprocessing worker process (smolbox.serve.prepare), re-raised here
        return APIError, (self.status, self.message, self.param, self.code, self.kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- the request body ---------------------------------------------------------------------------------------
# Fields a client may send that smolbox does not use (user, frequency_penalty, ...) are ignored, as before.

StrictPositive = Annotated[int, Field(strict=True, ge=1)]


class ImageURL(BaseModel):
    url: Annotated[str, Field(strict=True)]


class ContentPart(BaseModel):
    """{'type': 'text', 'text': ...} or {'type': 'image_url', 'image_url': {'url': ...}} (a bare URL string too)."""

    type: Literal["text", "image_url"]
    text: Annotated[str, Field(strict=True)] | None = None
    image_url: ImageURL | Annotated[str, Field(strict=True)] | None = None

    @model_validator(mode="after")
    def _filled(self):
        if (self.type == "text" and self.text is None) or (self.type == "image_url" and self.image_url is None):
            raise ValueError(f"a {self.type} part needs its '{self.type}' field")
        return self

    @property
    def url(self) -> str:
        return self.image_url.url if isinstance(self.image_url, ImageURL) else self.image_url


class Message(BaseModel):
    role: Literal[ROLES]
    content: Annotated[list[ContentPart], Field(min_length=1)]

    @field_validator("content", mode="before")
    @classmethod
    def _string_is_one_text_part(cls, value):
        return [{"type": "text", "text": value}] if isinstance(value, str) else value


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. `model` and `n` are checked against the server (`validate`), not typed here."""

    model_config = ConfigDict(extra="ignore")

    model: Any = None
    messages: Annotated[list[Message], Field(min_length=1)]
    n: Any = 1
    max_completion_tokens: StrictPositive | None = None
    max_tokens: StrictPositive | None = None
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(strict=True)] | None = None
    stop: Annotated[str, Field(strict=True)] | list[Annotated[str, Field(strict=True, min_length=1)]] | None = None
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: StreamOptions | None = None


# What each field must be; a validation error names the first field it concerns, in this order.
FIELD_RULES = {
    "messages": "'messages' must be a non-empty array of message objects.",
    "max_completion_tokens": "'max_tokens' must be a positive integer.",
    "max_tokens": "'max_tokens' must be a positive integer.",
    "temperature": "'temperature' must be a number between 0.0 and 2.0.",
    "top_p": "'top_p' must be a number between 0.0 and 1.0.",
    "seed": "'seed' must be an integer.",
    "stop": "'stop' must be a string or an array of up to 4 non-empty strings.",
    "stream": "'stream' must be a boolean.",
    "stream_options": "'stream_options' must be an object such as {\"include_usage\": true}.",
}
PARAMS = {"max_completion_tokens": "max_tokens"}


def _error(errors: list[dict]) -> APIError:
    """The first validation error as an OpenAI-style error: top-level fields first, then messages in order."""
    def rank(error):
        loc = error["loc"]
        nested = len(loc) > 1 and loc[0] == "messages"
        return (nested, list(FIELD_RULES).index(loc[0]) if loc and loc[0] in FIELD_RULES else len(FIELD_RULES))

    loc = min(errors, key=rank)["loc"]
    if not loc:
        return APIError(400, "The request body must be a JSON object.")
    if loc[0] != "messages" or len(loc) == 1:
        return APIError(400, FIELD_RULES.get(loc[0], f"'{loc[0]}' is not valid."), PARAMS.get(loc[0], loc[0]))
    where = f"messages[{loc[1]}]"
    if len(loc) == 2 or loc[2] != "content":
        return APIError(400, f"{where} must be an object with role 'system', 'user' or 'assistant'.", where)
    if len(loc) == 3:
        return APIError(400, f"{where}.content must be a string or a non-empty array of content parts.", f"{where}.content")
    at = f"{where}.content[{loc[3]}]"
    if "image_url" in loc[4:]:
        return APIError(400, f"{at}.image_url.url must be a string.", f"{at}.image_url")
    return APIError(400, f"{at} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', 'image_url': {{'url': ...}}}}.", at)


# ---- the checks that need the server ------------------------------------------------------------------------


@dataclass
class Prompt:
    """A valid request: generation settings, the chat for the template (image parts in place), decoded images."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    chat: list[dict]
    images: list[Image.Image]


def validate(body: Any, limits: ServeConfig, model_name: str) -> Prompt:
    """Check the request body against the schema and the server's limits; decode its images."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{model_name}'.", "model", "model_not_found")
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise _error(exc.errors()) from None
    if request.n != 1:
        raise APIError(400, "Only n=1 is supported.", "n")
    max_tokens = request.max_completion_tokens if "max_completion_tokens" in request.model_fields_set else request.max_tokens
    max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
    if max_tokens > limits.max_tokens_limit:
        raise APIError(400, f"'max_tokens' is {max_tokens}; this server allows at most {limits.max_tokens_limit}.", "max_tokens")
    if request.top_p == 0.0:
        raise APIError(400, "'top_p' must be greater than 0.", "top_p")
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if len(stop) > 4 or not all(stop):
        raise APIError(400, FIELD_RULES["stop"], "stop")

    chat, images = [], []
    for i, message in enumerate(request.messages):
        parts = []
        for j, part in enumerate(message.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                images.append(load_image(part.url, f"messages[{i}].content[{j}]", limits))
                parts.append({"type": "image"})
        chat.append({"role": message.role, "content": parts})
    if len(images) > limits.max_images:
        raise APIError(400, f"The request has {len(images)} images; this server accepts at most {limits.max_images} per request.", "messages")
    return Prompt(max_tokens, 1.0 if request.temperature is None else request.temperature,
                  1.0 if request.top_p is None else request.top_p, request.seed, stop, request.stream,
                  bool(request.stream_options and request.stream_options.include_usage), chat, images)


def load_image(url: str, where: str, limits: ServeConfig) -> Image.Image:
    """An image part's picture as RGB: a base64 data: URI (remote URLs only when the operator allows them), its
    size checked from the header before any pixel is decoded."""
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise APIError(400, f"{where}: image URLs are not fetched by this server; send the image inline as a "
                                "data: URI (data:image/png;base64,...).", where, "remote_images_disabled")
        import urllib.request

        with urllib.request.urlopen(url, timeout=10) as response:  # only when an operator enabled it
            raw = response.read(limits.max_body_bytes + 1)
    elif url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, f"{where}: only base64 data: URIs are supported (data:image/png;base64,...).", where)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data: URI is not valid base64.", where, "invalid_base64") from None
    else:
        raise APIError(400, f"{where}: the image URL must be a data: URI.", where)
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size  # from the header: decide before decoding the pixels
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise APIError(400, f"{where}: the bytes are not an image this server can read (PNG, JPEG, WebP, GIF, ...).", where, "invalid_image") from None
    if width * height > limits.max_image_pixels or width == 0 or height == 0:
        raise APIError(400, f"{where}: the image is {width}x{height} = {width * height} pixels; at most {limits.max_image_pixels} "
                            "are accepted: resize it.", where, "image_too_large")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise APIError(400, f"{where}: the image data is truncated or corrupt.", where, "invalid_image") from None
    return image.convert("RGB")

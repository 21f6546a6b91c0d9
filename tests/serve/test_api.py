"""The request as the API validates it, in process: what a valid body becomes, and for each kind of bad body the
OpenAI-style error (status, param, code) that says what to change. tests/serve/test_app.py sends the same over
HTTP to a running server."""

import base64
import io

import pytest
from PIL import Image

from smolbox.config import load_config
from smolbox.serve.api import APIError, validate

LIMITS = load_config("tiny", env={}, dotenv=None).serve
MODEL = "tiny"


def png(size=(48, 64)) -> str:
    buffer = io.BytesIO()
    Image.new("RGBA", size, (200, 40, 40, 128)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(*parts):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": p}} if p.startswith("data:") else {"type": "text", "text": p}
                                        for p in parts]}


def test_a_valid_body_becomes_the_chat_the_images_and_the_settings():
    prompt = validate({"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, user(png(), "What color?")],
                       "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_p": 0.5, "seed": 3, "stop": "\n",
                       "stream": True, "stream_options": {"include_usage": True}, "user": "ignored", "frequency_penalty": 0},
                      LIMITS, MODEL)
    assert prompt.chat == [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                           {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    assert len(prompt.images) == 1 and prompt.images[0].mode == "RGB" and prompt.images[0].size == (48, 64)
    assert (prompt.max_tokens, prompt.temperature, prompt.top_p, prompt.seed, prompt.stop) == (7, 0.0, 0.5, 3, ["\n"])
    assert prompt.stream and prompt.include_usage


def test_defaults_come_from_the_server():
    prompt = validate({"messages": [user("hi")]}, LIMITS, MODEL)
    assert (prompt.max_tokens, prompt.temperature, prompt.top_p, prompt.seed, prompt.stop) == (LIMITS.default_max_tokens, 1.0, 1.0, None, [])
    assert not prompt.stream and not prompt.include_usage and prompt.images == []
    image_url_as_a_string = {"role": "user", "content": [{"type": "image_url", "image_url": png()}]}
    assert len(validate({"messages": [image_url_as_a_string]}, LIMITS, MODEL).images) == 1


BAD = {  # body -> (status, param, code)
    "not an object": ([1, 2], 400, None, None),
    "unknown model": ({"model": "gpt-4o", "messages": [user("x")]}, 404, "model", "model_not_found"),
    "no messages": ({"messages": []}, 400, "messages", None),
    "messages not a list": ({"messages": "hello"}, 400, "messages", None),
    "n above 1": ({"messages": [user("x")], "n": 2}, 400, "n", None),
    "max_tokens as string": ({"messages": [user("x")], "max_tokens": "12"}, 400, "max_tokens", None),
    "max_tokens as bool": ({"messages": [user("x")], "max_tokens": True}, 400, "max_tokens", None),
    "max_completion_tokens zero": ({"messages": [user("x")], "max_completion_tokens": 0}, 400, "max_tokens", None),
    "max_tokens over limit": ({"messages": [user("x")], "max_tokens": 10**6}, 400, "max_tokens", None),
    "temperature out of range": ({"messages": [user("x")], "temperature": 5}, 400, "temperature", None),
    "top_p zero": ({"messages": [user("x")], "top_p": 0}, 400, "top_p", None),
    "seed not an integer": ({"messages": [user("x")], "seed": 1.5}, 400, "seed", None),
    "five stop strings": ({"messages": [user("x")], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    "empty stop string": ({"messages": [user("x")], "stop": ""}, 400, "stop", None),
    "stream not a boolean": ({"messages": [user("x")], "stream": "yes"}, 400, "stream", None),
    "wrong role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0]", None),
    "message not an object": ({"messages": ["hi"]}, 400, "messages[0]", None),
    "empty content": ({"messages": [{"role": "user", "content": []}]}, 400, "messages[0].content", None),
    "unknown part": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0].content[0]", None),
    "url not a string": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}]}, 400,
                         "messages[0].content[0].image_url", None),
    "remote url": ({"messages": [user("x"), {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]},
                   400, "messages[1].content[0]", "remote_images_disabled"),
    "bad base64": ({"messages": [user("data:image/png;base64,@@@")]}, 400, "messages[0].content[0]", "invalid_base64"),
    "not an image": ({"messages": [user("data:image/png;base64," + base64.b64encode(b"plain text").decode())]}, 400,
                     "messages[0].content[0]", "invalid_image"),
    "too many images": ({"messages": [user(*[png((8, 8))] * (LIMITS.max_images + 1))]}, 400, "messages", None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_body_is_an_openai_style_error_naming_the_param(case):
    body, status, param, code = BAD[case]
    with pytest.raises(APIError) as caught:
        validate(body, LIMITS, MODEL)
    error = caught.value
    assert (error.status, error.param, error.code) == (status, param, code), error.body()
    assert error.body()["error"]["message"] == error.message and error.kind == "invalid_request_error"


def test_the_first_problem_is_named_top_level_fields_before_messages():
    with pytest.raises(APIError) as caught:
        validate({"messages": [{"role": "robot"}], "temperature": 9, "stream": 1}, LIMITS, MODEL)
    assert caught.value.param == "temperature" and "between 0.0 and 2.0" in caught.value.message

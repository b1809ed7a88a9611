"""Chat content parts: text parts are joined; an image part gets a 400 that says images are not supported."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def chat(live, content) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/chat/completions", timeout=60, json={
        "model": "tiny-served", "messages": [{"role": "user", "content": content}], "max_tokens": 2,
        "temperature": 0})


def test_an_image_part_is_refused_with_a_clear_message(tiny_live):
    r = chat(tiny_live, [{"type": "text", "text": "What is in this picture?"}, IMAGE])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith("images are not supported by this model"), err
    assert err["param"] == "messages" and err["code"] == "unsupported_content"


def test_text_parts_read_as_the_same_text_as_a_string(tiny_live):
    parts = chat(tiny_live, [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}])
    whole = chat(tiny_live, "Hello, world")
    assert parts.status_code == whole.status_code == 200, parts.text
    a, b = parts.json()["usage"], whole.json()["usage"]
    assert b["prompt_tokens_details"]["cached_tokens"] > 0  # the same prompt again: its blocks were cached
    assert {**a, "prompt_tokens_details": None} == {**b, "prompt_tokens_details": None}
    assert parts.json()["choices"][0]["message"] == whole.json()["choices"][0]["message"]


def test_an_audio_part_names_its_type(tiny_live):
    r = chat(tiny_live, [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])
    assert r.status_code == 400 and "'input_audio'" in r.json()["error"]["message"], r.text

"""A minimal client of SGLang's OpenAI-compatible API that also times the first token."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Optional, Union

import requests

Prompt = Union[str, list]  # a completion prompt (text or token ids), or chat messages


@dataclasses.dataclass
class Completion:
    text: str
    ttft_s: float  # request sent -> first generated text received
    last_token_s: float  # request sent -> last generated text received
    total_s: float
    finish_reason: Optional[str]
    chunks: int  # streamed chunks that carried text (1 when not streaming)


def complete(base_url: str, prompt: Prompt, *, max_tokens: int = 32, stream: bool = False,
             temperature: float = 0.0, timeout: float = 600, **extra) -> Completion:
    """POST /v1/chat/completions (``prompt`` is a message list) or /v1/completions (text or ids)."""
    chat = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
    body = {"model": "default", "max_tokens": max_tokens, "temperature": temperature,
            "stream": stream, **extra}
    body["messages" if chat else "prompt"] = prompt
    url = f"{base_url}/v1/{'chat/completions' if chat else 'completions'}"
    start = time.perf_counter()
    with requests.post(url, json=body, stream=stream, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url} answered HTTP {r.status_code}: {r.text[:500]}")
        if not stream:
            choice = r.json()["choices"][0]
            now = time.perf_counter() - start
            text = choice["message"]["content"] if chat else choice["text"]
            return Completion(text, now, now, now, choice.get("finish_reason"), 1)
        parts, ttft, last, finish, chunks = [], None, None, None, 0
        for line in r.iter_lines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{url} streamed an error: {event['error']}")
            choice = event["choices"][0]
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if piece:
                last = time.perf_counter() - start
                ttft = ttft if ttft is not None else last
                parts.append(piece)
                chunks += 1
            finish = choice.get("finish_reason") or finish
        total = time.perf_counter() - start
        return Completion("".join(parts), total if ttft is None else ttft, total if last is None else last,
                          total, finish, chunks)

"""A minimal client of SGLang's HTTP APIs that times every streamed chunk.

``complete`` speaks the OpenAI-compatible API (completions and chat); ``generate`` SGLang's native
``/generate``, whose chunks also carry the number of tokens generated so far.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable, Iterator, Optional, Union

import requests

Prompt = Union[str, list]  # a completion prompt (text or token ids), or chat messages


class RequestFailed(RuntimeError):
    """An error status, or an error event in the stream after ``chunks`` had arrived."""

    def __init__(self, message: str, status: int, chunks: list[str]):
        super().__init__(message)
        self.status, self.chunks = status, chunks


@dataclasses.dataclass
class Completion:
    text: str
    ttft_s: float  # request sent -> first generated text received
    last_token_s: float  # request sent -> last generated text received
    total_s: float
    finish_reason: Optional[str]
    chunks: list[str]  # the pieces of text, in arrival order (one when not streaming)
    chunk_times: list[float]  # seconds from sending the request to each piece
    chunk_tokens: list[int] = dataclasses.field(default_factory=list)  # tokens so far, when known
    logprobs: Optional[dict] = None  # the choice's logprobs (OpenAI API, not streaming)
    id: Optional[str] = None  # SGLang's request id

    def time_to_token(self, k: int) -> float:
        """Seconds from sending the request until its k-th generated token arrived."""
        return next(t for count, t in zip(self.chunk_tokens, self.chunk_times) if count >= k)


def complete(base_url: str, prompt: Prompt, *, max_tokens: int = 32, stream: bool = False,
             temperature: float = 0.0, timeout: float = 600, on_text: Optional[Callable[[str], None]] = None,
             **extra) -> Completion:
    """POST /v1/chat/completions (``prompt`` is a message list) or /v1/completions (text or ids).
    ``on_text`` is called with each piece of streamed text as it arrives."""
    chat = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
    body = {"model": "default", "max_tokens": max_tokens, "temperature": temperature,
            "stream": stream, **extra}
    body["messages" if chat else "prompt"] = prompt
    url = f"{base_url}/v1/{'chat/completions' if chat else 'completions'}"
    start = time.perf_counter()
    with requests.post(url, json=body, stream=stream, timeout=timeout) as r:
        _raise_for_status(url, r)
        if not stream:
            response = r.json()
            choice = response["choices"][0]
            now = time.perf_counter() - start
            text = choice["message"]["content"] if chat else choice["text"]
            return Completion(text, now, now, now, choice.get("finish_reason"), [text], [now],
                              logprobs=choice.get("logprobs"), id=response.get("id"))
        chunks, times, finish, rid = [], [], None, None
        for event in _events(url, r, chunks):
            rid = rid or event.get("id")
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if piece:
                    chunks.append(piece)
                    times.append(time.perf_counter() - start)
                    if on_text is not None:
                        on_text(piece)
                finish = choice.get("finish_reason") or finish
        return _streamed(chunks, times, [], time.perf_counter() - start, finish, rid)


def generate(base_url: str, text: str, *, max_tokens: int = 32, temperature: float = 0.0,
             timeout: float = 600, **sampling) -> Completion:
    """POST /generate, streaming: every chunk says how many tokens have been generated."""
    url = f"{base_url}/generate"
    body = {"text": text, "stream": True,
            "sampling_params": {"max_new_tokens": max_tokens, "temperature": temperature, **sampling}}
    start = time.perf_counter()
    with requests.post(url, json=body, stream=True, timeout=timeout) as r:
        _raise_for_status(url, r)
        chunks, times, counts, finish, rid, sent = [], [], [], None, None, 0
        for event in _events(url, r, chunks):
            meta = event["meta_info"]
            rid, finish = meta["id"], (meta.get("finish_reason") or {}).get("type") or finish
            if len(event["text"]) > sent:  # each event carries the whole text so far
                chunks.append(event["text"][sent:])
                sent = len(event["text"])
                times.append(time.perf_counter() - start)
                counts.append(meta["completion_tokens"])
        return _streamed(chunks, times, counts, time.perf_counter() - start, finish, rid)


def _streamed(chunks, times, counts, total, finish, rid) -> Completion:
    first, last = (times[0], times[-1]) if times else (total, total)
    return Completion("".join(chunks), first, last, total, finish, chunks, times, counts, id=rid)


def _events(url: str, response, chunks: list[str]) -> Iterator[dict]:
    for line in response.iter_lines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            status = error.get("code", 500) if isinstance(error, dict) else 500
            raise RequestFailed(f"{url} streamed an error: {error}", status, chunks)
        yield event


def _raise_for_status(url: str, response) -> None:
    if response.status_code != 200:
        raise RequestFailed(f"{url} answered HTTP {response.status_code}: {response.text[:500]}",
                            response.status_code, [])

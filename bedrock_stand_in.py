"""A local Bedrock runtime on the real wire, for chat_stream's tests and benchmark.

HTTP/1.1 on 127.0.0.1, answering ConverseStream (and GetInferenceProfile) with AWS event-stream messages
(CRCs included) as the real service does, so that boto3, aiobotocore and langchain-aws run unmodified against it
with fake credentials. Each question's answer is scripted with a `Reply`; every request is recorded as a `Call`.
Below it, the few helpers that start chat_stream.py against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/secret-profile"  # in error messages, never shown


# --- a local Bedrock: HTTP/1.1 on 127.0.0.1 answering with AWS event-stream messages, as the real service does


def event_message(headers: dict[str, str], payload: dict[str, Any]) -> bytes:
    """One binary event-stream message: prelude, CRC, string headers, JSON payload, CRC."""
    head = b"".join(
        bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v.encode())) + v.encode()
        for k, v in headers.items()
    )
    body = json.dumps(payload).encode()
    prelude = struct.pack(">II", 12 + len(head) + len(body) + 4, len(head))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + head + body
    return message + struct.pack(">I", zlib.crc32(message))


def event(name: str, payload: dict[str, Any]) -> bytes:
    return event_message({":message-type": "event", ":event-type": name, ":content-type": "application/json"}, payload)


def exception_event(name: str, message: str) -> bytes:
    headers = {":message-type": "exception", ":exception-type": name, ":content-type": "application/json"}
    return event_message(headers, {"message": message})


@dataclass
class Reply:
    """What the stand-in answers to one question. tokens=None echoes the question."""

    tokens: list[str] | None = None
    first_delay: float = 0.0  # seconds before the first token
    delay: float = 0.0  # seconds between tokens
    stop_reason: str = "end_turn"
    http_error: tuple[int, str] | None = None  # (status, error type) instead of a stream
    silent: bool = False  # send nothing at all, not even the response headers, until the client gives up
    unknown_delta: bool = False  # after the tokens, a content delta of a kind no client library knows yet
    no_stop: bool = False  # after the tokens, end the stream cleanly but without messageStop and metadata
    exception: str | None = None  # an exception event after the tokens
    hang: bool = False  # after the tokens, send nothing and keep the connection open
    cut: bool = False  # after the tokens, drop the TCP connection
    corrupt: bool = False  # after the tokens, an event whose CRC is wrong


@dataclass
class Call:
    """One request the stand-in received, and what became of its answer."""

    path: str
    body: dict[str, Any]
    tokens_sent: int = 0
    finished: bool = False  # the whole answer was sent
    client_closed_at: float | None = None  # time.monotonic() when the client closed the stream early


def echo_tokens(question: str) -> list[str]:
    return ["Echo:", *[" " + word for word in question.split()]]


def echo(question: str) -> str:
    """The whole answer the stand-in gives by default: the question, echoed."""
    return "".join(echo_tokens(question))


class FakeBedrock:
    """A Bedrock runtime on 127.0.0.1: ConverseStream, errors included, and GetInferenceProfile."""

    def __init__(self, default: Reply | None = None) -> None:
        self.calls: list[Call] = []
        self.replies: dict[str, Reply] = {}  # by question; others get `default`
        self.default = default or Reply()
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", 0, backlog=1024))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)

    def calls_for(self, question: str) -> list[Call]:
        return [c for c in self.calls if last_question(c.body) == question]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        prefix = b""
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:  # keep-alive: one request after another on this connection
                head = prefix + await reader.readuntil(b"\r\n\r\n")
                method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                if method == "GET" and path.startswith("/inference-profiles/"):  # the control plane's one call
                    self.inference_profile(writer)
                    prefix = b""
                    continue
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                call = Call(path, json.loads(await reader.readexactly(length)))
                self.calls.append(call)
                # the client sends nothing while it reads an answer, so a read that returns means it closed
                watch = asyncio.ensure_future(reader.read(1))
                watch.add_done_callback(lambda w: w.cancelled() or w.exception())  # a reset is an answer too
                if not await self.respond(call, writer, watch):
                    break
                watch.cancel()  # a no-op if the client already sent something (or closed)
                try:
                    prefix = await watch
                except asyncio.CancelledError:
                    prefix = b""
                else:
                    if not prefix:
                        break  # the client closed the connection
        writer.close()

    def inference_profile(self, writer: asyncio.StreamWriter) -> None:
        """GetInferenceProfile: every application inference profile here routes to Claude 3.7 Sonnet."""
        model = "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-7-sonnet-20250219-v1:0"
        body = json.dumps({"models": [{"modelArn": model}], "status": "ACTIVE", "type": "APPLICATION"}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    async def respond(self, call: Call, writer: asyncio.StreamWriter, watch: asyncio.Future) -> bool:
        """Answer one request; False when the connection must close."""
        reply = self.replies.get(last_question(call.body), self.default)
        tokens = echo_tokens(last_question(call.body)) if reply.tokens is None else reply.tokens
        limit = call.body.get("inferenceConfig", {}).get("maxTokens")
        if limit and len(tokens) > limit:  # as Bedrock does: the answer stops at maxTokens deltas (one token each)
            tokens, reply = tokens[:limit], dataclasses.replace(reply, stop_reason="max_tokens")
        if reply.silent:
            await watch
            call.client_closed_at = time.monotonic()
            return False
        if reply.http_error:
            status, kind = reply.http_error
            body = json.dumps({"message": f"{kind} for {ARN}"}).encode()
            writer.write(
                b"HTTP/1.1 %d Error\r\nContent-Type: application/json\r\nx-amzn-ErrorType: %s:http://internal.amazon.com/\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (status, kind.encode(), len(body), body)
            )
            await writer.drain()
            return True
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.amazon.eventstream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        events = self.converse_events(call, tokens, reply)
        for i, data in enumerate(events):
            pause = reply.first_delay if i == 1 else reply.delay if 1 < i <= len(tokens) else 0
            if pause:
                await asyncio.wait([watch], timeout=pause)
            if watch.done():  # the client went away
                call.client_closed_at = time.monotonic()
                return False
            if data is None:
                break
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            try:
                await writer.drain()
            except ConnectionError:  # the client went away while we waited for it to read
                call.client_closed_at = time.monotonic()
                return False
            call.tokens_sent += 1 <= i <= len(tokens)
        else:
            writer.write(b"0\r\n\r\n")
            call.finished = True
            return True
        if reply.cut:
            writer.transport.abort()
            return False
        if reply.hang:
            await watch  # send nothing more until the client gives up
            call.client_closed_at = time.monotonic()
            return False
        writer.write(b"0\r\n\r\n")  # after an exception event the stream ends
        return True

    def converse_events(self, call: Call, tokens: list[str], reply: Reply) -> Iterator[bytes | None]:
        yield event("messageStart", {"role": "assistant"})
        for token in tokens:
            yield event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": token}})
        yield from self.failure(reply)
        if reply.unknown_delta:
            yield event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"futureKind": {"value": 1}}})
        yield event("contentBlockStop", {"contentBlockIndex": 0})
        if reply.no_stop:
            return
        yield event("messageStop", {"stopReason": reply.stop_reason})
        usage = {"inputTokens": 10 * len(call.body["messages"]), "outputTokens": len(tokens)}
        yield event("metadata", {"usage": {**usage, "totalTokens": sum(usage.values())}, "metrics": {"latencyMs": 1}})

    def failure(self, reply: Reply) -> Iterator[bytes | None]:
        if reply.exception:
            yield exception_event(reply.exception, f"{reply.exception} for {ARN}")
        if reply.corrupt:
            yield event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "x"}})[:-1] + b"\0"
        if reply.exception or reply.corrupt or reply.hang or reply.cut:
            yield None


def last_question(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else content[0]["text"]


# --- running chat_stream.py against it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SETTINGS = [
    "BEDROCK_MODEL_ID",
    "AWS_REGION",
    "AWS_PROFILE",
    "BEDROCK_ENDPOINT_URL",
    "TEMPERATURE",
    "MAX_TOKENS",
    "SYSTEM_PROMPT",
    "HOST",
    "PORT",
    "WORKERS",
    "STREAM_TIMEOUT",
    "MAX_CONCURRENT_STREAMS",
    "MAX_QUESTION_CHARS",
    "MAX_HISTORY_MESSAGES",
    "MAX_HISTORY_TOKENS",
    "CHAT_API_KEY",
    "ALLOWED_ORIGINS",
    "ALLOWED_HOSTS",
    "MAX_CONNECTIONS",
    "SEND_TIMEOUT",
    "MAX_FRAMES_PER_SECOND",
    "DRAIN_TIMEOUT",
    "SESSION_TTL",
    "RESUME_GRACE",
    "MAX_SESSIONS",
]


def server_env(**settings: Any) -> dict[str, str]:
    """The environment of a test server: fake credentials, and every setting given (blank = default, None =
    unset), so that neither the developer's AWS configuration nor a .env file beside the module can leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in SETTINGS}
    env |= dict.fromkeys([k for k in SETTINGS if not k.startswith("AWS_")], "")  # boto3 reads a blank AWS_PROFILE
    env |= {"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "fake", "AWS_EC2_METADATA_DISABLED": "true"}
    env |= {"AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard", "PYTHONUNBUFFERED": "1"}
    env |= {k: str(v) for k, v in settings.items()}
    return {k: v for k, v in env.items() if settings.get(k, "") is not None}


def healthy(http: str) -> bool:
    try:
        return httpx.get(f"{http}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(condition: Callable[[], Any], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)

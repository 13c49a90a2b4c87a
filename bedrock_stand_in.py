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
import subprocess
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


def think(text: str) -> dict[str, Any]:
    """A reasoning delta, for Reply.tokens: Bedrock's reasoningContent text."""
    return {"reasoningContent": {"text": text}}


REDACTED = {"reasoningContent": {"redactedContent": "ZW5jcnlwdGVkIHRoaW5raW5n"}}  # a redacted block (a blob, base64)


@dataclass
class Reply:
    """What the stand-in answers to one question. tokens=None echoes the question. A token is a text delta (a str) or
    a reasoning delta (see `think`, REDACTED): each run of one kind is a content block of its own, and a block of
    reasoning text ends with its signature, as Bedrock streams them."""

    tokens: list[str | dict[str, Any]] | None = None
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
    usage: dict[str, Any] | None = None  # the usage it sent (in the metadata event)


def echo_tokens(question: str) -> list[str]:
    return ["Echo:", *[" " + word for word in question.split()]]


def echo(question: str) -> str:
    """The whole answer the stand-in gives by default: the question, echoed."""
    return "".join(echo_tokens(question))


OVERFLOWS = [  # how Bedrock's models refuse a request over their context window, as seen in the field
    "Input is too long for requested model.",
    "The model returned the following errors: prompt is too long: {n} tokens > {limit} maximum",
    "The model returned the following errors: input length and `max_tokens` exceed context limit: {n} + 4096 > {limit}",
    "The model returned the following errors: input length and max_tokens exceed context limit: {n} + 4096 > {limit}",
    "too many total text bytes",
    "Input Tokens Exceeded: Number of input tokens exceeds maximum length",
]


class FakeBedrock:
    """A Bedrock runtime on 127.0.0.1: ConverseStream, errors included, and GetInferenceProfile.

    With `context_limit`, a request over that many estimated tokens (see `estimated_tokens`) is refused before its
    stream, as Bedrock refuses a context overflow: HTTP 400 ValidationException with `overflow` as its message.
    Requests with cache points get Bedrock's cache figures in their usage: a cache read for the longest prefix that
    an earlier request wrote at one of its cache points (Claude finds it at any content block before this request's
    last cache point, Nova only at a cache point), a cache write for the rest up to the last cache point;
    inputTokens is what remains, all in estimated tokens. (Bedrock's minimum cacheable prefix is ignored.)
    """

    def __init__(self, default: Reply | None = None, context_limit: int | None = None, overflow: str = "") -> None:
        self.calls: list[Call] = []
        self.replies: dict[str, Reply] = {}  # by question; others get `default`
        self.default = default or Reply()
        self.context_limit, self.overflow = context_limit, overflow or OVERFLOWS[0]
        self.cached: set[str] = set()  # the prefixes written to the cache
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
        message = reply.http_error and f"{reply.http_error[1]} for {ARN}"
        if self.context_limit and (n := estimated_tokens(call.body)) > self.context_limit:  # before any token
            reply = dataclasses.replace(reply, http_error=(400, "ValidationException"))
            message = self.overflow.format(n=n, limit=self.context_limit)
        if reply.http_error:
            status, kind = reply.http_error
            body = json.dumps({"message": message}).encode()
            writer.write(
                b"HTTP/1.1 %d Error\r\nContent-Type: application/json\r\nx-amzn-ErrorType: %s:http://internal.amazon.com/\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (status, kind.encode(), len(body), body)
            )
            await writer.drain()
            return True
        if refused := thinking_refused(call.body):
            body = json.dumps({"message": refused}).encode()
            writer.write(
                b"HTTP/1.1 400 Error\r\nContent-Type: application/json\r\nx-amzn-ErrorType: ValidationException:"
                b"http://internal.amazon.com/\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            return True
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.amazon.eventstream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for data, n in self.converse_events(call, tokens, reply):  # n: which token the event is (0: not a token)
            pause = reply.first_delay if n == 1 else reply.delay if n > 1 else 0
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
            call.tokens_sent += n > 0
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

    def converse_events(self, call: Call, tokens: list[str | dict], reply: Reply) -> Iterator[tuple[bytes | None, int]]:
        yield event("messageStart", {"role": "assistant"}), 0
        block, thinking = 0, None  # the content block, and what it holds: reasoning text (True), redacted, text (False)
        for n, token in enumerate(tokens, 1):
            reasoning = token["reasoningContent"] if isinstance(token, dict) else None
            kind = None if reasoning is None else "text" in reasoning
            if n > 1 and kind != thinking:
                yield from self.block_stop(block, thinking)
                block += 1
            thinking, delta = kind, {"text": token} if reasoning is None else token
            yield event("contentBlockDelta", {"contentBlockIndex": block, "delta": delta}), n
        for data in self.failure(reply):
            yield data, 0
        if reply.unknown_delta:
            yield event("contentBlockDelta", {"contentBlockIndex": block, "delta": {"futureKind": {"value": 1}}}), 0
        yield from self.block_stop(block, thinking)
        if reply.no_stop:
            return
        yield event("messageStop", {"stopReason": reply.stop_reason}), 0
        usage = {"inputTokens": 10 * len(call.body["messages"]), "outputTokens": len(tokens)}
        prefixes, points = cache_prefixes(call.body)
        if points:  # as Bedrock does: a read of the longest cached prefix, a write up to the last cache point
            seen = prefixes[: points[-1] + 1] if "anthropic" in call.path else [prefixes[i] for i in points]
            read = max((t for key, t in seen if key in self.cached), default=0)
            write = 0 if prefixes[points[-1]][0] in self.cached else prefixes[points[-1]][1] - read
            self.cached |= {prefixes[i][0] for i in points}
            usage = {"inputTokens": estimated_tokens(call.body) - read - write, "outputTokens": len(tokens)}
            usage |= {"cacheReadInputTokens": read, "cacheWriteInputTokens": write}
            if write:  # as Bedrock sends it; langchain-aws then reports no cache write of its own (issue 11)
                usage["cacheDetails"] = [{"ttl": "5m", "inputTokens": write}]
        total = usage["inputTokens"] + usage["outputTokens"] + usage.get("cacheReadInputTokens", 0)
        call.usage = {**usage, "totalTokens": total + usage.get("cacheWriteInputTokens", 0)}
        yield event("metadata", {"usage": call.usage, "metrics": {"latencyMs": 1}}), 0

    def block_stop(self, block: int, thinking: bool | None) -> Iterator[tuple[bytes, int]]:
        if thinking:  # reasoning text is signed as its block ends
            signature = {"reasoningContent": {"signature": f"c2lnbmVk{block}"}}
            yield event("contentBlockDelta", {"contentBlockIndex": block, "delta": signature}), 0
        yield event("contentBlockStop", {"contentBlockIndex": block}), 0

    def failure(self, reply: Reply) -> Iterator[bytes | None]:
        if reply.exception:
            yield exception_event(reply.exception, f"{reply.exception} for {ARN}")
        if reply.corrupt:
            yield event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "x"}})[:-1] + b"\0"
        if reply.exception or reply.corrupt or reply.hang or reply.cut:
            yield None


def thinking_refused(body: dict[str, Any]) -> str | None:
    """Why Bedrock would refuse the request's thinking fields (Claude's rules), if it would: a budget of at least
    1,024 tokens and below maxTokens; with thinking on, no temperature."""
    thinking = body.get("additionalModelRequestFields", {}).get("thinking")
    if not thinking:
        return None
    if thinking.get("type") == "enabled":
        budget, limit = thinking.get("budget_tokens"), body.get("inferenceConfig", {}).get("maxTokens")
        if not isinstance(budget, int) or budget < 1024:
            return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        if limit is not None and budget >= limit:
            return "`max_tokens` must be greater than `thinking.budget_tokens`"
    elif thinking.get("type") != "adaptive":
        return f"thinking.type: Input should be 'enabled', 'adaptive' or 'disabled', not {thinking.get('type')!r}"
    if "temperature" in body.get("inferenceConfig", {}):
        return "`temperature` may only be set to 1 when thinking is enabled or in adaptive mode"
    return None


def estimated_tokens(body: dict[str, Any]) -> int:
    """A request's size in tokens, estimated at four characters a token (of its system prompt and messages)."""
    blocks = [*body.get("system", []), *(b for m in body["messages"] for b in m["content"])]
    return -(-sum(len(b.get("text", "")) for b in blocks) // 4)


def cache_prefixes(body: dict[str, Any]) -> tuple[list[tuple[str, int]], list[int]]:
    """A request's prefixes, one ending after each of its content blocks (a key, and its size in tokens), and the
    indexes of those that end at a cache point."""
    prefixes, points, prefix = [], [], {"system": [], "messages": []}
    blocks = [("system", b) for b in body.get("system", [])]
    blocks += [(m["role"], b) for m in body["messages"] for b in [{"start": True}, *m["content"]]]
    for role, block in blocks:
        if "cachePoint" in block:
            points.append(len(prefixes) - 1)
            continue
        if role == "system":
            prefix["system"].append(block)
        elif "start" in block:
            prefix["messages"].append({"role": role, "content": []})
            continue
        else:
            prefix["messages"][-1]["content"].append(block)
        prefixes.append((json.dumps(prefix), estimated_tokens(prefix)))
    return prefixes, points


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
    "MAX_SESSION_MEMORY_MB",
    "MAX_DETACHED_PER_CLIENT",
    "REDIS_URL",
    "JWT_SECRET",
    "JWT_PUBLIC_KEY",
    "JWT_JWKS_URL",
    "JWT_AUDIENCE",
    "JWT_ISSUER",
    "USER_REQUESTS_PER_MINUTE",
    "USER_TOKENS_PER_MINUTE",
    "USER_MAX_STREAMS",
    "PROMPT_CACHE",
    "REASONING_EFFORT",
    "REASONING_BUDGET",
    "GUARDRAIL_ID",
    "GUARDRAIL_VERSION",
    "GUARDRAIL_STREAM_MODE",
    "BEDROCK_PROVIDER",
    "METRICS",
    "LOG_FORMAT",
]


def server_env(**settings: Any) -> dict[str, str]:
    """The environment of a test server: fake credentials, and every setting given (blank = default, None =
    unset), so that neither the developer's AWS configuration nor a .env file beside the module can leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in SETTINGS}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the server sets it for its workers (blank would mean a folder "")
    env |= dict.fromkeys([k for k in SETTINGS if not k.startswith("AWS_")], "")  # boto3 reads a blank AWS_PROFILE
    env |= {"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "fake", "AWS_EC2_METADATA_DISABLED": "true"}
    env |= {"AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard", "PYTHONUNBUFFERED": "1"}
    env |= {k: str(v) for k, v in settings.items()}
    return {k: v for k, v in env.items() if settings.get(k, "") is not None}


class RedisServer:
    """A real redis-server (Debian's package) on a free loopback port, without persistence, as a shared store for
    chat_stream.py processes; stop() and start() it again on the same port (it then holds nothing)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for(self.answers, 10, "redis-server to start")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16) == b"+PONG\r\n"
        except OSError:
            return False

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        self.stop()


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

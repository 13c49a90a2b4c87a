"""chat-stream: AWS Bedrock answers streamed token by token over a WebSocket, with per-session memory.

Run it:   python chat_stream.py     (plain `uvicorn chat_stream:app` works, without the server layer's limits)
Demo without an AWS account:   BEDROCK_MODEL_ID=offline python chat_stream.py, then open http://127.0.0.1:8000/

Protocol, on ws://HOST:PORT/ws/chat/completions, one JSON text frame per message:
  client -> server   {"question": str, "session_id"?: str}     ask; no session_id (or null) starts a new session
                     {"type": "cancel"}                         stop the answer being streamed
                     {"type": "end_session", "session_id"}     forget one of this connection's sessions now
                     {"type": "resume", "session_id", "resume_token", "turn_id"?, "after"?}
                                                                rejoin a session after a dropped connection
                     {"type": "refresh", "token"}               with signed tokens: a new one, before this one expires
  server -> client   {"type": "start", "session_id", "turn_id", "resume_token"}
                     {"type": "token", "text", "seq"}           zero or more; seq counts 1, 2, 3, ... in a turn
                     {"type": "reasoning", "text" or "redacted": true, "seq"}
                                                                the model's thinking, before or between tokens
                                                                (counted in the same seq); clients may ignore it
                     {"type": "end", "session_id", "turn_id", "full_text", "stop_reason", "history_trimmed",
                      "usage": {"input_tokens", "output_tokens", "cache_read_input_tokens", "cache_write_input_tokens"},
                      "reasoning_chars"}                        full_text is the answer only, without the thinking
                     or {"type": "error", "session_id"?, "turn_id"?, "code", "message", "retry_after"?}
                     {"type": "resumed", "session_id", "history": [{"role", "text"}], "pending": null or
                      {"turn_id", "question"}}, then the pending turn's frames after `after`, live, and its end
                     {"type": "refreshed", "expires_at"}        the refresh was taken
Error codes: invalid_request, too_large, busy, session_in_use, not_found, throttled, access_denied, model_error,
unavailable, timeout, internal (each with its messages in ERRORS), and from the budgets layer rate_limited (with
retry_after, in seconds: ask again then). After any error the connection stays open. Close codes, from the layers:
1007 (text that is not UTF-8), 1008 (too many frames, or a message that never ends), 1009 (frame too large), 1012
(server restart: SIGTERM drains answers first), 4401 (with signed tokens: the token expired). A session outlives its
connection by SESSION_TTL, and its answer streams on for RESUME_GRACE, for a resume.

The module has two parts. The reference, the whole protocol on one process (copy it alone, from the top to the
`# ===` line, and mount its `app` or its `routes`: see the README's "Lift the reference"):
  settings; sessions (resume included, and the in-process store); the model (Bedrock, and the offline one); errors
  (every code and message, and the meter: an answer's log line, refusals counted); one answer; the connection;
  routes and the app.
Then the layers a sidecar adds, each a section that can be deleted whole, with its settings and imports:
  the Redis store (REDIS_URL: sessions shared by every process and replica); signed tokens (JWT_SECRET, ...: a JWT
  per user at the handshake, in place of the shared key); budgets (USER_REQUESTS_PER_MINUTE, ...: what each user
  may ask, across processes with REDIS_URL); metrics and JSON logs (GET /metrics, LOG_FORMAT=json); the chat page
  (GET /); the server (uvicorn's protocols with their limits, the drain on SIGTERM, workers) and main.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import inspect
import ipaddress
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    SSOError,
    TokenRetrievalError,
)
from dotenv import dotenv_values
from langchain_aws import ChatBedrockConverse
from langchain_aws.chat_models.bedrock_converse import _messages_to_bedrock, _parse_stream_event
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    trim_messages,
)
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import PrivateAttr, model_validator
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

# --- settings: read once, as the module is imported, from the environment (and a .env beside the module); a bad
# value raises BadSetting, which names the key (a secret without its value)

T = TypeVar("T")


DOTENV = dotenv_values(Path(__file__).with_name(".env"))  # a .env beside this module (none: empty)


def environment(key: str) -> str:
    """A variable of the environment, or else of the .env beside this module: read, not loaded, so that the process's
    environment stays as it was (a host app's own .env, beside the module it lifted, included)."""
    return os.environ[key] if key in os.environ else DOTENV.get(key) or ""


class BadSetting(ValueError):
    """A setting the module cannot use. Raised while it is imported, so a host app gets a clear exception;
    `python chat_stream.py` prints it as one line (see `one_line`)."""


def early_line(message: str, level: str = "CRITICAL") -> str:
    """A line written before logging is set up (a bad setting, say): text, or one JSON object when LOG_FORMAT asks
    for JSON lines (read raw: it may be the bad setting)."""
    if environment("LOG_FORMAT").strip().lower() != "json":
        return f"chat_stream: {'warning: ' if level == 'WARNING' else ''}{message}"
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    return json.dumps({"time": now, "level": level, "logger": "chat_stream", "message": message})


def one_line(kind: type[BaseException], exc: BaseException, traceback: Any) -> None:
    """`python chat_stream.py`: a bad setting ends start-up with one line on stderr (exit status 1), not a traceback."""
    if issubclass(kind, BadSetting):
        print(early_line(str(exc)), file=sys.stderr)
    else:
        sys.__excepthook__(kind, exc, traceback)


if __name__ == "__main__":  # only as a program: imported into another app, the module leaves the process alone
    sys.excepthook = one_line


def setting(key: str, cast: Callable[[str], T], default: T, secret: bool = False) -> T:
    """One setting from the environment (or the .env); unset or blank means the default."""
    raw = environment(key).strip()
    if not raw:
        return default
    try:
        return cast(raw)
    except ValueError:
        shown = "(not shown: it may hold a password)" if secret else f"={raw!r}"
        raise BadSetting(f"bad setting {key}{shown}: expected {cast.__name__.replace('_', ' ')}") from None


def positive_int(raw: str) -> int:
    if (value := int(raw)) < 1:
        raise ValueError(raw)
    return value


def positive_number(raw: str) -> float:
    if not (value := float(raw)) > 0:
        raise ValueError(raw)
    return value


def seconds(raw: str) -> float:
    if not (value := float(raw)) >= 0:
        raise ValueError(raw)
    return value


def number_from_0_to_1(raw: str) -> float:
    if not 0 <= (value := float(raw)) <= 1:
        raise ValueError(raw)
    return value


def one_of(*choices: str) -> Callable[[str], str]:
    def choice(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(raw)
        return raw.lower()

    choice.__name__ = " or ".join(choices)
    return choice


def origins(raw: str) -> frozenset[str]:
    return frozenset(o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip())


def hosts(raw: str) -> list[str]:
    names = [h.strip().lower() for h in raw.split(",") if h.strip()]
    if any("*" in h[1:] or (h.startswith("*") and h != "*" and not h.startswith("*.")) for h in names):
        raise ValueError(raw)  # Starlette's rule: a wildcard only as "*" or "*.example.com"
    return names


BEDROCK_MODEL_ID = setting("BEDROCK_MODEL_ID", str, "amazon.nova-micro-v1:0")  # model id, or "offline" for the demo
BEDROCK_PROVIDER = setting("BEDROCK_PROVIDER", str, "")  # the model's provider, when langchain-aws cannot tell (ARNs)
AWS_REGION = setting("AWS_REGION", str, "us-east-1")  # region of the Bedrock runtime
AWS_PROFILE = setting("AWS_PROFILE", str, None)  # named credentials profile; None = boto3's default chain
BEDROCK_ENDPOINT_URL = setting("BEDROCK_ENDPOINT_URL", str, None)  # VPC endpoint or a local stand-in
TEMPERATURE = setting("TEMPERATURE", number_from_0_to_1, 0.3)  # sampling temperature sent to the model
MAX_TOKENS = setting("MAX_TOKENS", positive_int, 4096)  # cap on answer length; it also bounds an answer's memory
SYSTEM_PROMPT = setting("SYSTEM_PROMPT", str, None)  # sent first in every request
STREAM_TIMEOUT = setting("STREAM_TIMEOUT", positive_number, 60.0)  # seconds Bedrock may stay silent: "timeout"
MAX_CONCURRENT_STREAMS = setting("MAX_CONCURRENT_STREAMS", positive_int, 256)  # per process; over it: "busy"
MAX_QUESTION_CHARS = setting("MAX_QUESTION_CHARS", positive_int, 32000)  # longer questions: "too_large"
MAX_HISTORY_MESSAGES = setting("MAX_HISTORY_MESSAGES", positive_int, 40)  # memory per session, whole turns
MAX_HISTORY_TOKENS = setting("MAX_HISTORY_TOKENS", positive_int, 100_000)  # a request's budget (estimated tokens)
PROMPT_CACHE = setting("PROMPT_CACHE", one_of("auto", "off"), "auto")  # cache points, for models that take them
REASONING_EFFORT = setting("REASONING_EFFORT", str.lower, None)  # how hard the model thinks, one of the levels its
# profile lists (low, medium, high, ...); unset = the model's default
REASONING_BUDGET = setting("REASONING_BUDGET", positive_int, None)  # thinking tokens, for the Claude models that take
# a fixed budget instead of a level (3.7, and the 4s without effort levels); unset = off
if REASONING_EFFORT and REASONING_BUDGET:
    raise BadSetting("set REASONING_EFFORT or REASONING_BUDGET, not both")
if REASONING_BUDGET is not None and not 1024 <= REASONING_BUDGET < MAX_TOKENS:
    raise BadSetting(f"REASONING_BUDGET={REASONING_BUDGET} must be at least 1024 and below MAX_TOKENS ({MAX_TOKENS})")
GUARDRAIL_ID = setting("GUARDRAIL_ID", str, None)  # a Bedrock guardrail applied to every answer, with its version
GUARDRAIL_VERSION = setting("GUARDRAIL_VERSION", str, None)
GUARDRAIL_STREAM_MODE = setting("GUARDRAIL_STREAM_MODE", one_of("sync", "async"), "sync")  # Bedrock's two modes
if (GUARDRAIL_ID is None) != (GUARDRAIL_VERSION is None):
    raise BadSetting("set both GUARDRAIL_ID and GUARDRAIL_VERSION, or neither")
CHAT_API_KEY = setting("CHAT_API_KEY", str, None)  # if set, handshakes need "Bearer <key>" or ?token=<key>
ALLOWED_ORIGINS = setting("ALLOWED_ORIGINS", origins, frozenset())  # browser origins besides our own; "*" = any
ALLOWED_HOSTS = setting("ALLOWED_HOSTS", hosts, ["localhost"])  # host names served besides IP addresses (DNS
# rebinding); "*" = any
MAX_CONNECTIONS = setting("MAX_CONNECTIONS", positive_int, 1000)  # open WebSockets per process; over it: HTTP 503
SESSION_TTL = setting("SESSION_TTL", seconds, 900.0)  # seconds a session outlives its connection; 0 = dies with it
RESUME_GRACE = min(setting("RESUME_GRACE", seconds, 30.0), SESSION_TTL)  # seconds an answer streams on, unread
MAX_SESSIONS = setting("MAX_SESSIONS", positive_int, 10_000)  # per process; when full, detached ones go (see shed)
MAX_SESSION_MEMORY_MB = setting("MAX_SESSION_MEMORY_MB", positive_int, 1024)  # what sessions may hold per process
# (histories and undelivered answers, as stored); when full, detached ones go; if none is left: "busy"
MAX_DETACHED_PER_CLIENT = setting("MAX_DETACHED_PER_CLIENT", positive_int, max(64, MAX_SESSIONS // 10))  # sessions
# one address leaves waiting for a resume; past it, its own go (the emptiest, then the oldest)
MAX_SESSION_ID_CHARS = 128
MAX_SESSIONS_PER_CONNECTION = 4  # with MAX_HISTORY_TOKENS, bounds what one connection holds (README: limits)

log = logging.getLogger("uvicorn.error.chat_stream")  # subtle: a child of uvicorn's logger, so it is configured
# however the app was started (python chat_stream.py, uvicorn CLI, workers, an app that mounts this one)


# --- sessions: each conversation, its resume token and its answer in flight; what the process holds, bounded


class Thought(str):
    """A piece of the model's reasoning among a turn's tokens (answer text is a plain str); Thought("") is a block the
    model redacted. Sent as "reasoning" frames, counted in seq with the tokens, never part of the answer's text."""

    __slots__ = ()


REDACTED = Thought("")  # a block of reasoning the model redacted: one frame, with no text


@dataclass(eq=False)
class Turn:
    """One answer. Its tokens (answer text, and the model's reasoning as Thoughts) stay here until its final frame is
    delivered, so a client that lost its connection can resume it: `seq` n is tokens[n - 1]."""

    id: str
    question: str
    producer: str | None = None  # the process reading it from Bedrock, when not this one (a shared store's)
    bytes: int = 0  # what it holds as stored: its question, tokens and final text, and what is still reserved
    reserved: int = 0  # of ANSWER_BYTES, what its tokens have not used yet (see grow); released when it ends
    counted: bool = False  # its bytes are in MEMORY (it is the pending turn of a session held here)
    tokens: list[str] = field(default_factory=list)  # every token so far
    thought: bool = False  # some of them are Thoughts
    context: list[BaseMessage] = field(default_factory=list)  # the history sent with the question
    first_token_at: float | None = None  # time.perf_counter() when the first token arrived
    final: dict[str, Any] | None = None  # its end or error frame, once the answer is over
    sent: int = 0  # tokens handed to the attached connection
    task: asyncio.Task[None] | None = None  # the answer (see `answer`), reading Bedrock; or following another process
    stopped: str | None = None  # why the answer was stopped, once it was (see `halt`)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # a token or the final frame arrived
    room: asyncio.Event = field(default_factory=asyncio.Event)  # the connection caught up (see WINDOW)


@dataclass(eq=False)
class Session:
    id: str
    owner: WebSocket | None  # the only connection that may read or extend it; None while detached
    resume_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)  # the client's secret
    history: list[BaseMessage] = field(default_factory=list)  # whole user/assistant turns, oldest first
    pending: Turn | None = None  # the turn whose final frame has not been delivered
    timers: list[asyncio.TimerHandle] = field(default_factory=list)  # while detached: grace, then expiry
    client: str = ""  # the address of the connection that last held it (see client_of)
    replay_due: float = 0.0  # (loop time) until when its resumes' replays are paid for (see resume)
    bytes: int = 0  # what its history holds, as stored (see weigh)
    user: str | None = None  # whose it is, when handshakes name users (see Gate): only they may ask, end or resume


SESSIONS: dict[str, Session] = {}  # at most MAX_SESSIONS; leave on end_session, expiry (SESSION_TTL) or eviction
DETACHED: dict[str, Session] = {}  # the sessions with no connection, least recently detached first
WAITING: dict[str, dict[str, Session]] = {}  # the same, by client: at most MAX_DETACHED_PER_CLIENT each
CONNECTIONS: dict[WebSocket, asyncio.Task[None] | None] = {}  # open chat sockets and the turn each is sending
# (None: idle), at most MAX_CONNECTIONS; each leaves in its handler's `finally`
STREAMS: set[Turn] = set()  # answers whose Bedrock stream is open; at most MAX_CONCURRENT_STREAMS (an answer being
# stopped to make room may hold its place a moment longer); each leaves as its stream closes
BACKGROUND: set[asyncio.Task[Any]] = set()  # tasks nobody awaits (grace checks), until they end
DRAINING = asyncio.Event()  # set to stop taking work (a drain on SIGTERM does): /healthz says 503, no new question
WINDOW = 64  # tokens an answer may read ahead of a connection that reads slowly; then Bedrock's stream waits
REPLAY_RATE = 2000  # tokens a second that one session's resumes may replay, whichever connections ask


class Memory:
    """The bytes the sessions held here take, as stored: their histories, and their pending turns (question, tokens,
    final text). Counted as they change, never summed, against MAX_SESSION_MEMORY_MB."""

    limit = MAX_SESSION_MEMORY_MB * 2**20
    used = 0


MEMORY = Memory()
MESSAGE_BYTES = 900  # a LangChain message around its text, measured with tracemalloc
ANSWER_BYTES = 64 * MAX_TOKENS  # what a new turn must find room for: its answer, at a typical token's 64 bytes


def weigh(history: list[BaseMessage]) -> int:
    return sum(sys.getsizeof(m.content) + MESSAGE_BYTES for m in history)


def grow(turn: Turn, text: str) -> None:
    """A token (or the final text) joined the turn: count it, out of what the turn reserved first (ANSWER_BYTES, see
    start_turn), and make room if the sessions pass the budget."""
    size = sys.getsizeof(text) + 8  # the string and its slot in the list
    taken = min(size, turn.reserved)
    turn.reserved, size = turn.reserved - taken, size - taken
    turn.bytes += size
    if turn.counted and size:
        MEMORY.used += size
        if MEMORY.used > MEMORY.limit:
            shed()


def count(turn: Turn | None, counted: bool) -> None:
    """The turn starts (`counted`) or stops being one that a session held here is waiting for."""
    if turn is not None and turn.counted != counted:
        turn.counted = counted
        MEMORY.used += turn.bytes if counted else -turn.bytes


def keep(session: Session) -> None:
    """Hold the session here (counted)."""
    SESSIONS[session.id] = session
    session.bytes = weigh(session.history)
    MEMORY.used += session.bytes
    count(session.pending, True)


def rewrite(session: Session, history: list[BaseMessage]) -> None:
    """The session's history is `history` from now on."""
    if SESSIONS.get(session.id) is session:
        MEMORY.used -= session.bytes
        MEMORY.used += (size := weigh(history))
    else:
        size = weigh(history)
    session.history, session.bytes = history, size


def full(sessions: int, more: int) -> bool:
    """`sessions` more sessions and `more` bytes would pass MAX_SESSIONS or the memory budget."""
    return len(SESSIONS) + sessions > MAX_SESSIONS or MEMORY.used + more > MEMORY.limit


def room(sessions: int, more: int) -> str | None:
    """Room for `sessions` more sessions and `more` bytes, or why not: when full, detached sessions go (see shed);
    "sessions_full" or "memory_full" if that is not enough."""
    if full(sessions, more):
        shed(sessions, more)
    if len(SESSIONS) + sessions > MAX_SESSIONS:
        return "sessions_full"
    return "memory_full" if MEMORY.used + more > MEMORY.limit else None


def shed(sessions: int = 0, more: int = 0) -> None:
    """Detached sessions go until `sessions` more and `more` bytes fit, with a twentieth of each limit to spare (so
    that a flood sorts once every many sessions): first those of the client that left the most waiting, each client's
    least worth first (see worth), then its oldest. A session a connection holds never goes."""
    count_goal = MAX_SESSIONS - sessions - MAX_SESSIONS // 20
    bytes_goal = MEMORY.limit - more - MEMORY.limit // 20
    queues = {
        client: sorted(reversed(waiting.values()), key=worth, reverse=True) for client, waiting in WAITING.items()
    }
    heap = [(-len(queue), worth(queue[-1]), client) for client, queue in queues.items()]
    heapq.heapify(heap)
    while heap and (len(SESSIONS) > count_goal or MEMORY.used > bytes_goal):
        _, _, client = heapq.heappop(heap)
        evict((queue := queues[client]).pop())
        if queue:
            heapq.heappush(heap, (-len(queue), worth(queue[-1]), client))


def worth(session: Session) -> int:
    """How much a client loses with the session: 0 if it is empty; 1 if it holds a turn or less; 2 for a longer
    conversation, or an answer still streaming for a resume (its client is likely on its way back)."""
    if session.pending in STREAMS or len(session.history) > 2:
        return 2
    return 1 if session.history or session.pending else 0


def evict(session: Session) -> None:
    """A detached session goes to make room, here and from a shared store (unless it was taken since)."""
    drop(session)
    background(STORE.evict(session))


def client_of(ws: WebSocket) -> str:
    """Where a connection comes from (behind a proxy, as uvicorn's proxy headers say): its address, an IPv6 one by
    its /64, which one host can hold whole."""
    host = ws.client.host if ws.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 4:
        return host
    if address.ipv4_mapped:  # an IPv4 client of a socket that takes both, as ::ffff:a.b.c.d
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{host}/64", strict=False))


def new_session(session_id: str | None, ws: WebSocket, question: str) -> Session:
    """A session attached to `ws` (an id is minted if the client gave none), with room for its first turn; refused
    (BadRequest) when full with sessions all attached, or when full and the client already left
    MAX_DETACHED_PER_CLIENT waiting (it would only make room by evicting its own)."""
    client, more = client_of(ws), ANSWER_BYTES + sys.getsizeof(question)
    if full(1, more) and len(WAITING.get(client, ())) >= MAX_DETACHED_PER_CLIENT:
        raise BadRequest("client_full", session_id)
    if why := room(1, more):
        raise BadRequest(why, session_id)
    session = Session(session_id or secrets.token_urlsafe(16), ws, client=client, user=GATE.user(ws))
    keep(session)
    return session


def attach(session: Session, ws: WebSocket) -> None:
    """`ws` holds the session from now on, even if another connection held it (a half-open one, say)."""
    wake(session)  # subtle: first, as it waits under the client that left it, which may not be this one
    session.owner, session.client = ws, client_of(ws)
    disarm(session)


def wake(session: Session) -> None:
    """The session no longer waits for a resume."""
    if DETACHED.get(session.id) is session:
        del DETACHED[session.id]
        waiting = WAITING[session.client]
        del waiting[session.id]
        if not waiting:
            del WAITING[session.client]


def detach(session: Session) -> None:
    """Its connection closed. The session waits SESSION_TTL for a resume; its answer streams on for RESUME_GRACE."""
    unfollow(session)
    if SESSION_TTL == 0:
        drop(session)
        return
    session.owner = None
    DETACHED[session.id] = session
    (waiting := WAITING.setdefault(session.client, {}))[session.id] = session
    session.timers.append(asyncio.get_running_loop().call_later(SESSION_TTL, drop, session))
    stream_on(session)
    if len(waiting) > MAX_DETACHED_PER_CLIENT:  # the client's own go first, never another's (see shed)
        evict(min(waiting.values(), key=worth))  # the emptiest, then the oldest


def let_go(session: Session, answer_goes_on: bool) -> None:
    """Another copy of the session replaced this one (a shared store's: see `take`): forget this one. Its answer
    goes on for the new copy, or (`answer_goes_on`) for a reader in another process while one holds the session."""
    remove(session)
    session.owner = None
    unfollow(session)
    disarm(session)
    if answer_goes_on:
        stream_on(session)


def drop(session: Session) -> None:
    """Forget the session here now; an answer it still reads is stopped (a shared store keeps the session)."""
    remove(session)
    disarm(session)
    if session.pending:
        halt(session.pending, "disconnected")


def remove(session: Session) -> None:
    if SESSIONS.get(session.id) is session:
        del SESSIONS[session.id]
        MEMORY.used -= session.bytes
        count(session.pending, False)
    wake(session)


def disarm(session: Session) -> None:
    for timer in session.timers:
        timer.cancel()
    session.timers.clear()


def stream_on(session: Session) -> None:
    """No connection here reads the session's answer now: it runs to its end, kept for a resume, or to RESUME_GRACE."""
    if (turn := session.pending) and turn in STREAMS:
        turn.room.set()
        session.timers.append(asyncio.get_running_loop().call_later(RESUME_GRACE, grace, session))


def unfollow(session: Session) -> None:
    """No connection here reads the session now: stop following an answer another process reads (a resume follows
    it again), so that each connection here follows one at most."""
    if (turn := session.pending) and turn.producer is not None and turn.task:
        turn.task.cancel()


def grace(session: Session) -> None:
    """RESUME_GRACE passed with no connection here to read the answer: stop it, unless a connection in another
    process holds the session (then look again after another RESUME_GRACE)."""

    async def check() -> None:
        elsewhere = await STORE.read_elsewhere(session)
        if not session.timers:  # attached again meanwhile
            return
        if elsewhere:
            session.timers.append(asyncio.get_running_loop().call_later(RESUME_GRACE, grace, session))
        else:
            stop(session)

    background(check())


def halt(turn: Turn, why: str) -> bool:
    """Stop the answer that reads `turn` from Bedrock; `why` is how it ends: "cancelled" (its end frame still comes,
    with what was read), or the outcome of one cut short. False if it reads nothing, or is stopped already (the
    first reason stands)."""
    if turn not in STREAMS or turn.stopped is not None or turn.task.cancelling():
        return False
    turn.stopped = why
    if inspect.getcoroutinestate(turn.task.get_coro()) == inspect.CORO_CREATED:  # subtle: a task cancelled before its
        asyncio.get_running_loop().call_soon(turn.task.cancel)  # first step never runs (no final frame, nothing
    else:  # spent): cancelled once it has begun (a cancel in the same read as its question)
        turn.task.cancel()
    return True


def stop(session: Session) -> bool:
    """End the answer the session is streaming as a cancel does (its end frame still comes); False if none is read
    here. An answer another process reads is stopped only for a connection here that holds the session: a copy left
    detached here may be stale, the session held elsewhere since."""
    turn = session.pending
    if turn and turn.producer and turn.final is None:
        if session.owner is not None:
            STORE.cancel(turn)  # its end frame comes through the store
        return False
    return turn is not None and halt(turn, "cancelled")


def make_room() -> bool:
    """MAX_CONCURRENT_STREAMS are open: stop the answer that has waited longest for a resume, if there is one, so
    that clients who ask and leave cannot lock out those who stay. It ends as at RESUME_GRACE."""
    return any(stop(session) for session in DETACHED.values())


def counts() -> dict[str, int]:
    """What the process holds now, as /healthz shows it."""
    now = {"connections": len(CONNECTIONS), "sessions": len(SESSIONS), "detached": len(DETACHED)}
    return now | {"streams": len(STREAMS), "session_bytes": MEMORY.used}


def background(coroutine: Any) -> None:
    """Run `coroutine` in a task nobody awaits (held in BACKGROUND until it ends)."""
    task = asyncio.create_task(coroutine)
    BACKGROUND.add(task)
    task.add_done_callback(BACKGROUND.discard)


def user_hash(user: str) -> str:
    """A user as logs show them: a short hash of the id, never the id."""
    return hashlib.sha256(user.encode(errors="surrogatepass")).hexdigest()[:12]


def digest(token: str, user: str | None = None) -> bytes:
    """What a resume must prove, hashed: the session's resume token, and the user it belongs to (if any)."""
    proof = token if user is None else f"{len(user)}:{user}:{token}"
    return hashlib.sha256(proof.encode(errors="surrogatepass")).digest()  # subtle: a client may send lone surrogates


class Store:
    """Where sessions live for other processes: here, nowhere (SESSIONS is the whole store, and nothing is shared).
    A shared store replaces it (STORE), method for method; its failures raise StoreUnavailable."""

    shared = False  # sessions live beyond this process
    healthy = True  # the store answers (/healthz says 503 when not)
    sockets = 0  # connections it may hold open
    where = "in this process"  # where sessions live, as the start-up line says it

    async def open(self) -> None:
        """At start-up: reach the store, or raise."""

    async def close(self) -> None:
        """At shutdown, after the last answer: write what is left."""

    async def begin(self, session: Session, turn: Turn) -> bool:
        """Record the session and its new pending turn before the answer starts; False if another connection holds
        the session (a new session: if it exists already)."""
        return True

    def record(self, turn: Turn) -> None:
        """A token, or the final frame, of an answer read here arrived (batched: this never waits)."""

    def cancel(self, turn: Turn) -> None:
        """Stop an answer another process reads."""

    async def settle(self, session: Session, turn: Turn) -> None:
        """`turn` is delivered, and `settle` made the history `session.history`."""

    async def claim(self, session_id: str, token: str, here: Session | None, user: str | None) -> Session | None:
        """The session a resume names, if `token` is its resume token and `user` its user: `here` (this process's
        copy), or a fresh copy of the one the store holds; None for a wrong token, another user's session, or no
        such session."""
        if here is None or not hmac.compare_digest(digest(token, user), digest(here.resume_token, here.user)):
            return None
        return here

    async def release(self, session: Session) -> None:
        """Its connection closed (`detach` ran): its SESSION_TTL starts."""

    async def evict(self, session: Session) -> None:
        """The process let a detached session go to make room (see shed): it goes from the store too, unless a
        connection elsewhere took it since."""

    async def forget(self, session: Session) -> None:
        """end_session: the session goes now."""

    async def exists(self, session_id: str, user: str | None) -> bool:
        """A session of `user`'s that this process does not hold exists elsewhere."""
        return False

    async def read_elsewhere(self, session: Session) -> bool:
        """A connection in another process holds the session, and reads its answer from the store."""
        return False


STORE = Store()


# --- the model: LangChain's interface (messages in, AIMessageChunks out) over native async I/O


class BedrockChat(ChatBedrockConverse):
    """ChatBedrockConverse whose async stream reads Bedrock with aiobotocore, for plain chat.

    LangChain's default `astream` runs every chunk's `next()` in a thread pool, which caps how many answers
    a process can stream at full speed; here each answer is a coroutine and costs no thread. Requests are built
    by langchain-aws's own Converse helpers from the model's fields (temperature, max_tokens, guardrail_config,
    additional_model_request_fields, ...; its model profiles drop what a model refuses). Per-call arguments
    (`bind_tools`, `bind(...)`) are refused: use ChatBedrockConverse for those. Text deltas become plain-string
    chunks, the cheapest kind LangChain has; other events (reasoning, usage, stop reason) are parsed by
    langchain-aws; content it does not know is skipped. A model that writes its reasoning inline in the text (Nova
    v1's <thinking>...</thinking>, as langchain-aws knows) streams it as reasoning chunks (see InlineReasoning).
    Every model streams, even those langchain-aws has not verified as streaming-capable. With `cache_points`, a
    model that takes them (CACHE_POINT_MODELS) gets Bedrock cache points after the system prompt and after the last
    completed turn, and the usage chunk carries Bedrock's own cache figures (langchain-aws folds them into
    input_tokens).
    """

    aclient: Any = None  # aiobotocore "bedrock-runtime" client: see `open`
    cache_points: bool = False  # prompt caching, for the models that take it
    pool_size: int = 10  # Bedrock connections at once
    silence_timeout: float = 60.0  # seconds Bedrock may stay silent, before or during an answer
    _opening: asyncio.Lock = PrivateAttr(default_factory=asyncio.Lock)
    _exits: AsyncExitStack = PrivateAttr(default_factory=AsyncExitStack)
    _closed: bool = PrivateAttr(default=False)  # by `aclose`: an answer that starts after it is "unavailable"

    @model_validator(mode="after")
    def always_stream(self) -> BedrockChat:
        self.disable_streaming = False  # subtle: langchain-aws turns streaming off for models it has not verified
        return self

    async def open(self) -> Any:
        """The aiobotocore client, opened by the first caller (the app's lifespan, or else its first answer) and kept
        until `aclose`. After `silence_timeout` seconds of silence a stream fails with a TimeoutError, its connection
        closed."""
        async with self._opening:
            if self._closed:
                raise ConnectionError("the Bedrock client is closed: the app is shutting down")
            if self.aclient is None:
                timeout = self.silence_timeout
                config = AioConfig(max_pool_connections=self.pool_size, connect_timeout=timeout, read_timeout=timeout)
                client = AioSession(profile=self.credentials_profile_name).create_client(
                    "bedrock-runtime", region_name=self.region_name, endpoint_url=self.endpoint_url, config=config
                )
                self.aclient = await self._exits.enter_async_context(client)
                # subtle: botocore retries timeouts too, which made a silent Bedrock cost several times `timeout`;
                # vetoing them keeps `timeout` the bound a client sees, while throttling and 5xx are still retried
                events = self.aclient.meta.events
                events.register("request-created.bedrock-runtime", mark_sent)
                events.register_first("needs-retry.bedrock-runtime", partial(no_retry_after_timeout, timeout=timeout))
        return self.aclient

    async def aclose(self) -> None:
        self._closed = True
        await self._exits.aclose()
        self.aclient = None

    @asynccontextmanager
    async def connect(self, pool_size: int, timeout: float) -> AsyncIterator[None]:
        """The client open for a block, with these limits."""
        self.pool_size, self.silence_timeout, self._closed = pool_size, timeout, False
        await self.open()
        try:
            yield
        finally:
            await self.aclose()

    async def _astream(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any
    ) -> AsyncIterator[ChatGenerationChunk]:
        if kwargs:
            raise NotImplementedError(f"BedrockChat streams plain chat; use ChatBedrockConverse for {sorted(kwargs)}")
        bedrock_messages, system = _messages_to_bedrock(
            messages, self.system, model_id=self._get_base_model(), provider=self.provider
        )
        if self.cache_points and CACHE_POINT_MODELS.match(self._get_base_model()):
            add_cache_points(system, bedrock_messages)
        client = self.aclient or await self.open()
        response = await client.converse_stream(
            messages=bedrock_messages, system=system, **self._converse_params(stop=stop)
        )
        stream, finished = response["stream"], False
        inline = InlineReasoning(*tags) if (tags := self._inline_reasoning_tags_for_model()) else None
        try:
            async for event in stream:
                finished = finished or "messageStop" in event
                if "text" in (delta := event.get("contentBlockDelta", {}).get("delta", {})):
                    if inline is None or inline.answering:
                        yield ChatGenerationChunk(message=AIMessageChunk(delta["text"]))  # the hot path: plain text
                    else:
                        for chunk in inline.split(delta["text"]):
                            yield ChatGenerationChunk(message=chunk)
                elif "messageStart" not in event and "contentBlockStop" not in event:  # those carry nothing
                    usage = event.get("metadata", {}).get("usage", {})  # before langchain-aws pops it
                    try:
                        chunk = _parse_stream_event(event)
                    except ValueError:  # a kind of content newer than langchain-aws: the answer goes on without it
                        log.debug("skipped a Bedrock event langchain-aws does not know: %s", list(event))
                        continue
                    if chunk.usage_metadata:
                        chunk.response_metadata["model_name"] = self.base_model_id or self.model_id
                        for key, bedrock_key in CACHE_USAGE.items():
                            if bedrock_key in usage:  # with cache points only
                                chunk.response_metadata[key] = usage[bedrock_key]
                    yield ChatGenerationChunk(message=chunk)
                if inline is not None and "contentBlockStop" in event:
                    for chunk in inline.split("", end=True):
                        yield ChatGenerationChunk(message=chunk)
        finally:
            stream.close()  # subtle: closes the HTTP connection now, even when cancelled, not at garbage collection
        if not finished:
            raise ConnectionError("Bedrock's stream ended without messageStop")


class InlineReasoning:
    """Nova v1's inline reasoning, <thinking>...</thinking> before its answer (as langchain-aws knows it), split out of
    a stream of text deltas as reasoning chunks shaped as langchain-aws shapes reasoningContent deltas. An opening tag
    counts only before the answer's first text (or right after a closing tag): one the answer mentions is text. A
    delta that ends with the start of a tag is held back until the next one shows whether it is one, and so is
    leading whitespace (blank before a tag, it goes). The newlines right after a tag go too. An opening tag that the
    block never closes was text after all (langchain-aws splits complete pairs only): what streamed as reasoning
    since comes again, as text, when the block ends."""

    def __init__(self, opening: str, closing: str) -> None:
        self.opening, self.closing = opening, closing
        self.inside = False  # within the tags
        self.leading = True  # no answer text yet (since the start, or a closing tag): an opening tag may come
        self.after_tag = False  # newlines here go
        self.held = ""
        self.thought: list[str] = []  # the reasoning since the opening tag, in case none closes it

    @property
    def answering(self) -> bool:
        """The answer has begun, after any reasoning: its deltas are its text (the hot path)."""
        return not (self.inside or self.leading or self.held)

    def split(self, text: str, end: bool = False) -> list[AIMessageChunk]:
        """The chunks of `text`, after what was held back; with `end` (the content block ended), nothing is held."""
        if self.answering:
            return [AIMessageChunk(text)] if text else []
        pieces: list[AIMessageChunk] = []
        text, self.held = self.held + text, ""
        while self.inside or self.leading:
            tag = self.closing if self.inside else self.opening
            if (at := text.find(tag)) < 0 or (not self.inside and text[:at].strip()):
                break  # no tag here (or text before an opening one: it is the answer's)
            if self.inside:
                self.add(pieces, text[:at])  # (before an opening tag, only blanks: they go)
            text, self.inside, self.leading, self.after_tag = text[at + len(tag) :], not self.inside, True, True
            self.thought = []
        if not end and (self.inside or self.leading):
            keep = held_back(text, self.closing if self.inside else self.opening)
            if not self.inside and not text[: len(text) - keep].strip():
                keep = len(text)  # blank so far: it may come before a tag
            text, self.held = text[: len(text) - keep], text[len(text) - keep :]
        self.add(pieces, text)
        if end and self.inside:  # never closed: text
            pieces.append(AIMessageChunk(self.opening + "".join(self.thought)))
            self.inside, self.leading, self.thought = False, False, []
        return pieces

    def add(self, pieces: list[AIMessageChunk], text: str) -> None:
        if self.after_tag:
            text = text.lstrip("\r\n")
            self.after_tag = not text
        if text and self.inside:
            self.thought.append(text)
            block = {"type": "reasoning_content", "reasoning_content": {"text": text}, "index": 0}  # subtle: an index,
            pieces.append(AIMessageChunk([block]))  # or langchain-core's merge of the chunks takes quadratic time
        elif text:
            pieces.append(AIMessageChunk(text))
            self.leading = self.leading and not text.strip()


def held_back(text: str, tag: str) -> int:
    """How many characters at the end of `text` may be the start of `tag`."""
    if tag[0] not in text[1 - len(tag) :]:
        return 0
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-n:])), 0)


class OfflineChat(BaseChatModel):
    """A deterministic model for demos and front-end work: it answers by quoting the question, word by word, in a
    little markdown (a list, and the question in a code block); with `thinks`, a few words of reasoning come first,
    as LangChain's standard reasoning blocks."""

    max_tokens: int | None = None
    delay: float = 0.02  # seconds between words, so the streaming is visible
    thinks: bool = False

    @property
    def _llm_type(self) -> str:
        return "offline"

    def _reply(self, messages: list[BaseMessage]) -> tuple[list[str], str, dict[str, int]]:
        question = messages[-1].text
        fence = "`" * max(3, 1 + max(map(len, re.findall(r"`+", question)), default=0))  # longer than any in it
        text = (
            "This is the offline demo model: it can only echo.\n\n- no AWS account needed\n- streamed word by word, "
            f"as Bedrock's answers are\n\nYou asked:\n\n{fence}\n{question}\n{fence}"
        )
        ends = [m.end() for m in re.finditer(r"\S+", text)]  # subtle: linear; "\s*\S+" is quadratic on runs of spaces
        words = [text[start:end] for start, end in zip([0, *ends], ends, strict=False)]
        stop_reason = "max_tokens" if self.max_tokens and len(words) > self.max_tokens else "end_turn"
        words = words[: self.max_tokens]
        tokens_in = sum(len(m.text.split()) for m in messages)
        usage = {"input_tokens": tokens_in, "output_tokens": len(words), "total_tokens": tokens_in + len(words)}
        return words, stop_reason, usage

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        words, stop_reason, usage = self._reply(messages)
        message = AIMessage("".join(words), response_metadata={"stopReason": stop_reason}, usage_metadata=usage)
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _astream(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> AsyncIterator[ChatGenerationChunk]:
        words, stop_reason, usage = self._reply(messages)
        thinking = re.findall(r"\S+\s*", f"The question has {len(messages[-1].text.split())} words; I echo them. ")
        for word in thinking if self.thinks else []:
            await asyncio.sleep(self.delay)
            yield ChatGenerationChunk(message=AIMessageChunk([{"type": "reasoning", "reasoning": word}]))
        for word in words:
            await asyncio.sleep(self.delay)
            yield ChatGenerationChunk(message=AIMessageChunk(word))
        last = AIMessageChunk("", response_metadata={"stopReason": stop_reason}, usage_metadata=usage)
        yield ChatGenerationChunk(message=last)


CACHE_POINT_MODELS = re.compile(  # base model ids that take cache points through Converse (Bedrock refuses them
    # elsewhere): Claude 3.5 Haiku, 3.7 Sonnet and every Claude since 4 (a name, then its version: sonnet-4-5, opus-5,
    # haiku-5-5, and those to come), Nova v1 and Nova 2
    r"anthropic\.claude-(3-5-haiku|3-7-sonnet|[a-z]+-([4-9]|[1-9][0-9]))|amazon\.nova-(micro|lite|pro|premier|2-)"
)


CACHE_USAGE = {  # Bedrock's cache figures: as end.usage names them, and as Bedrock does
    "cache_read_input_tokens": "cacheReadInputTokens",
    "cache_write_input_tokens": "cacheWriteInputTokens",
}


def add_cache_points(system: list[dict[str, Any]], messages: list[dict[str, Any]]) -> None:
    """Cache points after the system prompt and after the last two answers (3 of Bedrock's 4): this request writes
    the conversation up to its last answer to the cache, and reads what the previous request wrote, up to the answer
    before. subtle: Nova reads the cache only at cache points; Claude also looks back from them."""
    point = {"cachePoint": {"type": "default"}}
    if system:
        system.append(point)
    for message in messages[-4:-1]:  # ..., answer, question, answer, and the question being asked
        if message["role"] == "assistant":
            message["content"].append(point)


def mark_sent(request: Any, **kwargs: Any) -> None:
    """botocore's request-created hook: when each attempt starts (see no_retry_after_timeout); a second one of the
    same call (its context is the call's) is a retry."""
    if "sent_at" in request.context:
        METER.retried()
    request.context["sent_at"] = time.monotonic()


def no_retry_after_timeout(
    caught_exception: Exception | None = None, request_dict: Any = None, timeout: float = 0, **kwargs: Any
) -> bool | None:
    """botocore's needs-retry hook: False (no retry) after a timeout, None (botocore decides) otherwise. subtle: a
    read "timeout" long before `timeout` passed is aiohttp 3.14 handing out a pooled connection that a stale read
    timer already failed (aiohttp issues 12953, 13000; seen here after a held-back stream): that one is retried."""
    if isinstance(caught_exception, ReadTimeoutError) and request_dict:
        sent_at = request_dict.get("context", {}).get("sent_at")
        if sent_at is not None and time.monotonic() - sent_at < timeout / 2:
            log.info("retrying a request that timed out %.3fs after it was sent", time.monotonic() - sent_at)
            return None
    return False if isinstance(caught_exception, ReadTimeoutError | ConnectTimeoutError) else None


def build_model() -> BaseChatModel:
    """The model, checked against what langchain-aws's model profile knows of it (its reasoning effort levels, its
    output limit); REASONING_EFFORT is written into the family's request fields by langchain-aws itself."""
    if BEDROCK_MODEL_ID == "offline":
        return OfflineChat(max_tokens=MAX_TOKENS, thinks=bool(REASONING_EFFORT or REASONING_BUDGET))
    if BEDROCK_MODEL_ID.startswith("arn:") and not BEDROCK_PROVIDER:
        raise BadSetting("BEDROCK_MODEL_ID is an ARN: set BEDROCK_PROVIDER too (anthropic, amazon, meta, ...)")
    budget = REASONING_BUDGET and {"thinking": {"type": "enabled", "budget_tokens": REASONING_BUDGET}}
    model = build_bedrock(budget)
    profile = model.profile or {}
    levels = profile.get("reasoning_effort_levels") or []
    if REASONING_EFFORT and REASONING_EFFORT not in levels:
        takes = f"one of {', '.join(levels)}" if levels else "none (langchain-aws's profile lists no levels)"
        raise BadSetting(f"REASONING_EFFORT={REASONING_EFFORT!r}: {BEDROCK_MODEL_ID} takes {takes}")
    if REASONING_EFFORT:
        model = build_bedrock(None, REASONING_EFFORT)  # langchain-aws writes the family's request fields
    if budget and (model.provider != "anthropic" or levels):
        instead = "; it takes REASONING_EFFORT" if levels else ""
        raise BadSetting(f"REASONING_BUDGET: {BEDROCK_MODEL_ID} takes no thinking budget{instead}")
    if (most := profile.get("max_output_tokens")) and MAX_TOKENS > most:
        raise BadSetting(f"MAX_TOKENS={MAX_TOKENS} is above {BEDROCK_MODEL_ID}'s {most} output tokens")
    if "thinking" in (model.additional_model_request_fields or {}) or profile.get("temperature") is False:
        model.temperature = None  # subtle: Claude refuses one with thinking on, and Claude 5 always
    return model


def build_bedrock(thinking: dict[str, Any] | None, effort: str | None = None) -> BedrockChat:
    return BedrockChat(
        model_id=BEDROCK_MODEL_ID,
        provider=BEDROCK_PROVIDER,
        region_name=AWS_REGION,
        credentials_profile_name=AWS_PROFILE,
        endpoint_url=BEDROCK_ENDPOINT_URL,
        temperature=TEMPERATURE,
        max_tokens=MAX_TOKENS,
        reasoning_effort=effort,
        additional_model_request_fields=thinking,
        cache_points=PROMPT_CACHE == "auto",
        guardrail_config=GUARDRAIL_ID
        and {
            "guardrailIdentifier": GUARDRAIL_ID,
            "guardrailVersion": GUARDRAIL_VERSION,
            "streamProcessingMode": GUARDRAIL_STREAM_MODE,
        },
        pool_size=MAX_CONCURRENT_STREAMS,
        silence_timeout=STREAM_TIMEOUT,
    )


MODEL = build_model()  # one model, and one connection pool, for the whole process
CONTEXT_TOKENS = (MODEL.profile or {}).get("max_input_tokens")  # the model's window, if its profile knows it
HISTORY_TOKENS = min(MAX_HISTORY_TOKENS, CONTEXT_TOKENS - MAX_TOKENS if CONTEXT_TOKENS else MAX_HISTORY_TOKENS)
if HISTORY_TOKENS < 1:
    raise BadSetting(f"MAX_TOKENS={MAX_TOKENS} leaves no room in {BEDROCK_MODEL_ID}'s {CONTEXT_TOKENS}-token window")


# --- errors: every error frame's code and message, in one table; upstream failures mapped to codes in one place;
# and the meter, which counts them

ERRORS = {  # what went wrong -> (the code a client acts on, the message it shows)
    "not_text": ("invalid_request", "Binary frames are not supported; send JSON text."),
    "not_json": ("invalid_request", "The frame is not valid JSON."),
    "not_an_object": ("invalid_request", "The frame must be a JSON object."),
    "unknown_type": (
        "invalid_request",
        'Unknown frame type; send a question, "cancel", "end_session", "resume" or "refresh".',
    ),
    "bad_session_id": (
        "invalid_request",
        f"session_id must be a non-empty string of at most {MAX_SESSION_ID_CHARS} characters.",
    ),
    "session_id_not_unicode": ("invalid_request", "session_id is not valid Unicode text."),
    "bad_resume": ("invalid_request", "resume_token must be a string, and turn_id a string if given."),
    "bad_after": ("invalid_request", "after must be a whole number of frames (tokens and reasoning), 0 or more."),
    "no_question": ("invalid_request", "question must be a non-empty string."),
    "question_not_unicode": ("invalid_request", "question is not valid Unicode text."),
    "question_too_long": ("too_large", f"question is longer than {MAX_QUESTION_CHARS} characters."),
    "too_long_for_model": (
        "too_large",
        "The question is too long for the model, even without the conversation before it.",
    ),
    "too_many_sessions": (
        "too_large",
        f"This connection already has {MAX_SESSIONS_PER_CONNECTION} sessions; end one or reconnect.",
    ),
    "busy": ("busy", "An answer is already streaming; wait for it or cancel it."),
    "sessions_full": ("busy", f"{MAX_SESSIONS=} are all in use; try again later."),
    "memory_full": ("busy", "The server's memory for conversations (MAX_SESSION_MEMORY_MB) is full; try again later."),
    "client_full": (
        "busy",
        f"The server is full, and {MAX_DETACHED_PER_CLIENT} conversations from your address wait for a resume; "
        "resume or end one of them, or try again later.",
    ),
    "in_use": ("session_in_use", "This session is open on another connection; resume it with its resume_token first."),
    "not_found": (
        "not_found",
        "No such session: it may have expired, or the resume_token is wrong. Start a new session.",
    ),
    "throttled": ("throttled", "The model is receiving too many requests; try again shortly."),
    "access_denied": (
        "access_denied",
        "The server is not allowed to use the model; check its AWS credentials and permissions.",
    ),
    "model_error": ("model_error", "The model could not answer this request."),
    "unavailable": ("unavailable", "The model service is unavailable; try again shortly."),
    "restarting": ("unavailable", "The server is restarting; reconnect and ask again."),
    "store_down": ("unavailable", "Sessions cannot be stored right now; try again shortly."),
    "stopped": ("unavailable", "The server stopped this answer; ask again."),
    "bad_refresh": ("invalid_request", "token must be a string."),
    "no_tokens": ("invalid_request", "This server takes no signed tokens: there is nothing to refresh."),
    "timeout": ("timeout", "The model took too long to respond."),
    "internal": ("internal", "Something went wrong on the server."),
}
BEDROCK_ERRORS = {  # Bedrock error code, lower-cased (in-stream events spell it lowerCamelCase) -> our code
    "throttlingexception": "throttled",
    "servicequotaexceededexception": "throttled",
    "accessdeniedexception": "access_denied",
    "unrecognizedclientexception": "access_denied",
    "invalidsignatureexception": "access_denied",
    "expiredtokenexception": "access_denied",
    "modeltimeoutexception": "timeout",
    "internalserverexception": "unavailable",
    "serviceunavailableexception": "unavailable",
    "modelnotreadyexception": "unavailable",
}  # anything else Bedrock refuses (ValidationException, modelStreamErrorException, ...) is "model_error"


def error_code(exc: Exception) -> str:
    if isinstance(exc, ClientError):  # HTTP errors and exception events inside the stream alike
        return BEDROCK_ERRORS.get(exc.response.get("Error", {}).get("Code", "").lower(), "model_error")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | ProfileNotFound | CredentialRetrievalError):
        return "access_denied"
    if isinstance(exc, SSOError | TokenRetrievalError):  # an SSO login that expired, or a token that cannot be had
        return "access_denied"
    if isinstance(exc, TimeoutError | ReadTimeoutError | ConnectTimeoutError):
        return "timeout"
    if isinstance(exc, BotoCoreError | aiohttp.ClientError | ConnectionError):
        return "unavailable"
    return "internal"


CONTEXT_OVERFLOW = re.compile(  # how Bedrock's models say a request is over their context window (ValidationException)
    r"input is too long|prompt is too long|input length and `?max_tokens`? exceed context limit|"
    r"too many total text bytes|input tokens exceeded",
    re.IGNORECASE,
)


def overflowed(exc: Exception) -> bool:
    error = exc.response.get("Error", {}) if isinstance(exc, ClientError) else {}
    return error.get("Code") == "ValidationException" and bool(CONTEXT_OVERFLOW.search(error.get("Message", "")))


def error_frame(why: str, session_id: str | None = None, turn_id: str | None = None) -> dict[str, Any]:
    code, message = ERRORS[why]
    frame = {"type": "error", "code": code, "message": message}
    frame = frame if session_id is None else {"type": "error", "session_id": session_id, **frame}
    return frame if turn_id is None else {**frame, "turn_id": turn_id}


class BadRequest(Exception):
    """A frame refused (`why`: a key of ERRORS), answered with its error frame; the connection goes on."""

    def __init__(self, why: str, session_id: str | None = None) -> None:
        super().__init__(why)
        self.frame = error_frame(why, session_id)


class StoreUnavailable(Exception):
    """A shared store failed (Redis is away, say): the question is refused as "unavailable", the connection goes on."""


class Meter:
    """What answers and refusals leave behind: each answer's one log line (never its text), and the error frames that
    end no answer, counted by code. A subclass that feeds a metrics system too can replace it (METER)."""

    def __init__(self) -> None:
        self.refusals: dict[str, int] = {}
        self.retries = 0  # Bedrock requests botocore sent again

    def answered(
        self, session: Session, turn: Turn, outcome: str, took: float, first: float | None, usage: dict, reported: bool
    ) -> None:
        """`outcome`: end, cancelled, disconnected or an error code; `took`, `first`: seconds to the final frame and to
        the first token (None: none came); `reported`: the usage is the model's own."""
        fields = {"session_id": session.id, "turn_id": turn.id, "model": BEDROCK_MODEL_ID}
        fields |= {"ttft_ms": first and round(first * 1000), "duration_ms": round(took * 1000)}
        fields |= {"tokens_in": usage["input_tokens"], "tokens_out": usage["output_tokens"], "outcome": outcome}
        fields |= {"reasoning_chars": reasoning_chars(turn), "user": session.user and user_hash(session.user)}
        line = "answer session=%r turn=%s model=%s ttft_ms=%s duration_ms=%d tokens_in=%d tokens_out=%d outcome=%s "
        line += "reasoning_chars=%d user=%s"
        log.info(line, *fields.values(), extra={"answer": fields})

    def refused(self, code: str) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1

    def retried(self) -> None:
        self.retries += 1


METER = Meter()


async def send(ws: WebSocket, frame: dict[str, Any]) -> None:
    await ws.send_text(json.dumps(frame, ensure_ascii=False))


async def refuse(ws: WebSocket, frame: dict[str, Any]) -> None:
    """Send an error frame that ends no answer, counted."""
    METER.refused(frame["code"])
    await send(ws, frame)


# --- one answer: a task reads Bedrock into its Turn; another sends the Turn to whichever connection holds the session


async def answer(session: Session, turn: Turn) -> None:
    """Read the model's answer into `turn`, to its final frame, whether or not a connection is attached."""
    stop_reason, usage, completed = None, None, len(session.history) // 2  # the turns before this question
    started, outcome = time.perf_counter(), "end"
    try:
        try:
            stop_reason, usage = await read(session, turn)
        except ClientError as exc:
            if not (overflowed(exc) and session.history):
                raise
            log.info("context overflow: session=%r turn=%s: retrying with half the history", session.id, turn.id)
            oldest_half = (completed + 1) // 2  # turns, rounded up; they go for good
            rewrite(session, session.history[2 * oldest_half :])
            stop_reason, usage = await read(session, turn)
    except asyncio.CancelledError:
        if turn.stopped != "cancelled":  # the session is gone here, the server stops, or the store refused the turn
            outcome = turn.stopped or "disconnected"
            turn.final = error_frame("stopped", session.id, turn.id)
            STORE.record(turn)  # for a reader in another process
            raise
        asyncio.current_task().uncancel()
        stop_reason = outcome = "cancelled"
    except Exception as exc:
        outcome = "too_large" if overflowed(exc) else error_code(exc)
        if outcome == "internal":
            log.exception("answer failed: session=%r turn=%s", session.id, turn.id)
        else:
            log.warning("answer failed: session=%r turn=%s code=%s detail=%s", session.id, turn.id, outcome, exc)
    finally:
        STREAMS.discard(turn)  # the upstream is closed: from here on a cancel cannot cut it short
        billed = usage or {"input_tokens": 0, "output_tokens": len(turn.tokens)}  # Bedrock's, or when it never came
        # deltas read
        took, first = time.perf_counter() - started, turn.first_token_at and turn.first_token_at - started
        METER.answered(session, turn, outcome, took, first, billed, reported=usage is not None)  # (a cancel) the
        GATE.spent(turn, usage)
        usage = dict.fromkeys(CACHE_USAGE, 0) | billed
    if outcome in ("end", "cancelled"):
        end = {"type": "end", "session_id": session.id, "turn_id": turn.id, "full_text": text_of(turn)}
        trimmed = completed - len(turn.context) // 2  # turns left out, by the budget or the overflow
        end |= {"stop_reason": stop_reason, "usage": usage, "history_trimmed": trimmed}
        turn.final = end | {"reasoning_chars": reasoning_chars(turn)}
        grow(turn, end["full_text"])
    else:
        turn.final = error_frame("too_long_for_model" if outcome == "too_large" else outcome, session.id, turn.id)
    release(turn)
    turn.changed.set()
    STORE.record(turn)


def release(turn: Turn) -> None:
    """The answer is over: what it reserved and did not use is free again."""
    if turn.counted:
        MEMORY.used -= turn.reserved
    turn.bytes -= turn.reserved
    turn.reserved = 0


def request(session: Session, question: str) -> list[BaseMessage]:
    """The messages sent for `question`: the system prompt, the newest whole turns of the history that fit
    MAX_HISTORY_TOKENS together with it and the question, and the question. The question always goes, however
    long: if it is too long for the model, Bedrock says so."""
    system = [SystemMessage(SYSTEM_PROMPT)] if SYSTEM_PROMPT else []
    messages = trim_messages(
        [*system, *session.history, HumanMessage(question)],
        max_tokens=HISTORY_TOKENS,
        token_counter=count_tokens_approximately,
        strategy="last",
        start_on="human",  # subtle: whole turns, so the roles alternate as Bedrock requires
        include_system=True,
    )
    if not messages or messages[-1].type != "human":  # the question alone is over the budget
        return [*system, HumanMessage(question)]
    return messages


async def read(session: Session, turn: Turn) -> tuple[str | None, dict[str, int] | None]:
    """Ask the model, with the history that fits (see `request`); stream its answer into `turn`; return its stop
    reason and usage."""
    messages = request(session, turn.question)
    turn.context = [m for m in messages[:-1] if m.type != "system"]  # the history that went with the question
    stop_reason, usage = None, None
    async with aclosing(MODEL.astream(messages)) as chunks:  # the Bedrock stream is closed even when cancelled
        async for chunk in chunks:
            if text := str(chunk.text):  # subtle: a plain str, half the size of langchain-core's TextAccessor
                pieces: tuple[str, ...] | list[Thought] = (valid(text),)
            elif pieces := reasoning(chunk.content):
                turn.thought = True
            for token in pieces:
                turn.first_token_at = turn.first_token_at or time.perf_counter()
                turn.tokens.append(token)
                grow(turn, token)
                turn.changed.set()
                STORE.record(turn)
                while len(turn.tokens) - turn.sent > WINDOW and session.owner is not None:
                    turn.room.clear()  # the client reads slowly: stop reading Bedrock until it catches up
                    await turn.room.wait()
            stop_reason = chunk.response_metadata.get("stopReason", stop_reason)
            if chunk.usage_metadata:
                usage = {k: chunk.usage_metadata[k] for k in ("input_tokens", "output_tokens")}
                usage |= {k: chunk.response_metadata[k] for k in CACHE_USAGE if k in chunk.response_metadata}
    return stop_reason, usage


def reasoning(content: str | list[Any]) -> list[Thought]:
    """The reasoning in a chunk's content, as Thoughts: langchain-aws's reasoning_content blocks (a redacted one as
    REDACTED) and LangChain's standard reasoning blocks. Signatures are left out: the history holds no thinking."""
    thoughts: list[Thought] = []
    for block in content if type(content) is list else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "reasoning_content" and (text := block["reasoning_content"].get("text")):
            thoughts.append(Thought(valid(text)))
        elif kind == "reasoning_content" and "redacted_content" in block["reasoning_content"]:
            thoughts.append(REDACTED)
        elif kind == "reasoning" and (text := block.get("reasoning")):
            thoughts.append(Thought(valid(text)))
    return thoughts


def valid(text: str) -> str:
    """`text`, its lone surrogates (which no UTF-8 encoder takes: not the client's socket, not a store) as U+FFFD."""
    if text.isascii() or is_unicode(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def text_of(turn: Turn) -> str:
    """The answer's text: its tokens without its reasoning."""
    return "".join([t for t in turn.tokens if type(t) is str] if turn.thought else turn.tokens)


def reasoning_chars(turn: Turn) -> int:
    return sum(len(t) for t in turn.tokens if type(t) is Thought) if turn.thought else 0


def thought_frame(thought: Thought, seq: int) -> dict[str, Any]:
    if thought:
        return {"type": "reasoning", "text": thought, "seq": seq}
    return {"type": "reasoning", "redacted": True, "seq": seq}


async def deliver(ws: WebSocket, session: Session, turn: Turn, after: int, start: dict[str, Any] | None) -> None:
    """Send `ws` the turn's tokens from seq `after` + 1, then the live tail, then its end or error; if another
    connection takes the session over first, say so (session_in_use, with the turn's id) and stop. The turn is
    settled as its final frame is sent."""
    try:
        if start:
            await send(ws, start)
        sent = turn.sent = after  # the answer reads ahead of this connection by at most WINDOW tokens
        turn.room.set()
        while session.owner is ws:
            if sent < len(turn.tokens):
                sent = turn.sent = sent + 1
                if type(token := turn.tokens[sent - 1]) is str:  # (the hot path: no call)
                    await send(ws, {"type": "token", "text": token, "seq": sent})
                else:
                    await send(ws, thought_frame(token, sent))
                turn.room.set()
            elif turn.final is None:
                turn.changed.clear()
                await turn.changed.wait()
            else:
                ended = turn.final["type"] == "end"
                if ended and settle(ws, session, turn):  # in the history before its frame goes: a resume finds it
                    await STORE.settle(session, turn)
                await send(ws, turn.final)
                if not ended and settle(ws, session, turn):  # an error once delivered (a resume meanwhile gets it
                    background(STORE.settle(session, turn))  # again), and the next question need not wait for it
                return
        # subtle: the other may be a resume this client sent before, from a connection it has left, that a process
        # elsewhere handled late; told, the client resumes again here
        await refuse(ws, error_frame("in_use", session.id, turn.id))
    except (WebSocketDisconnect, WebSocketDisconnected):
        return  # the connection is closing: its handler detaches the session, and a resume sends the rest


def settle(ws: WebSocket, session: Session, turn: Turn) -> bool:
    """The turn is delivered to `ws`; False if `ws` no longer holds the session. An answer with text joins the
    history; a failed one is not recorded, so the history stays valid for the next question."""
    if session.owner is not ws or session.pending is not turn:
        return False
    session.pending = None
    count(turn, False)
    if turn.final["type"] == "end" and turn.final["full_text"].strip():
        history = [*turn.context, HumanMessage(turn.question), AIMessage(turn.final["full_text"])]
        history = history[-MAX_HISTORY_MESSAGES:]  # turns left out for the budget are gone already
        if history[0].type == "ai":  # an odd cap cut the oldest turn in two: whole turns, as Bedrock needs
            history = history[1:]
        rewrite(session, history)  # subtle: trim_messages(token_counter=len) would do the same, for 50 MB more memory
    return True


# --- the connection: check the handshake, validate each frame, start answers, clean up on close


def parse(message: dict[str, Any]) -> dict[str, Any]:
    """The client's frame with its "type" (question, cancel, end_session or resume), checked; else BadRequest."""
    if message.get("text") is None:
        raise BadRequest("not_text")
    try:
        data = json.loads(message["text"])
    except (ValueError, RecursionError):
        raise BadRequest("not_json") from None
    if not isinstance(data, dict):
        raise BadRequest("not_an_object")
    kind = data.get("type") or "question"
    if kind == "cancel":
        return {"type": "cancel"}  # whatever else it holds
    if kind == "refresh":
        if not isinstance(token := data.get("token"), str):
            raise BadRequest("bad_refresh")
        return {"type": kind, "token": token}
    if kind not in ("question", "end_session", "resume"):
        raise BadRequest("unknown_type")
    session_id = data.get("session_id")
    if session_id is None and kind == "question":
        pass  # a new session, with an id the server mints
    elif not isinstance(session_id, str) or not session_id.strip() or len(session_id) > MAX_SESSION_ID_CHARS:
        raise BadRequest("bad_session_id")
    elif not is_unicode(session_id):
        raise BadRequest("session_id_not_unicode")
    if kind == "end_session":
        return {"type": kind, "session_id": session_id}
    if kind == "resume":
        token, turn_id, after = data.get("resume_token"), data.get("turn_id"), data.get("after")
        if not isinstance(token, str) or not isinstance(turn_id, str | None):
            raise BadRequest("bad_resume")
        if after is not None and (type(after) is not int or after < 0):
            raise BadRequest("bad_after", session_id)
        return {"type": kind, "session_id": session_id, "resume_token": token, "turn_id": turn_id, "after": after or 0}
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRequest("no_question", session_id)
    if len(question) > MAX_QUESTION_CHARS:
        raise BadRequest("question_too_long", session_id)
    if not is_unicode(question):
        raise BadRequest("question_not_unicode", session_id)
    return {"type": kind, "session_id": session_id, "question": question}


def is_unicode(text: str) -> bool:
    """False for text holding lone surrogates ("\\ud800" in JSON), which no model and no UTF-8 encoder accepts."""
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


HOST_HEADER = re.compile(r"(?P<name>[a-z0-9._-]+|\[(?P<ipv6>[a-f0-9:.]+)\])(?::[0-9]{1,5})?")  # name or [IPv6], port


def host_allowed(host: str) -> bool:
    """A Host header the app serves (DNS rebinding): an IP address (a rebinding names a host), or a name ALLOWED_HOSTS
    lists. The app checks every request (HostCheck), and the chat route every handshake again, wherever it is
    mounted."""
    if "*" in ALLOWED_HOSTS:
        return True
    if (parsed := HOST_HEADER.fullmatch(host.lower())) is None:
        return False
    name = parsed["name"]
    try:
        ipaddress.ip_address(parsed["ipv6"] or name)
        return True
    except ValueError:
        return any(name == p or (p.startswith("*.") and name.endswith(p[1:])) for p in ALLOWED_HOSTS)


class Gate:
    """Who a handshake speaks for, and what they may ask: here, whoever has the shared CHAT_API_KEY, if it is set, as
    much as they like. The signed tokens layer puts a token per user in its place (it checks the token, answers
    `refresh` frames, and closes a connection whose token expired); the budgets layer counts what each one asks."""

    async def check(self, conn: HTTPConnection) -> tuple[int, str, str] | None:
        """Why the handshake's credentials are refused, if they are (as `refusal` says it)."""
        if CHAT_API_KEY is None:
            return None
        scheme, _, credentials = conn.headers.get("authorization", "").partition(" ")
        given = credentials.strip() if scheme.lower() == "bearer" else conn.query_params.get("token", "")
        if not given:
            return 403, "no key", "no key"
        if not hmac.compare_digest(given.encode(), CHAT_API_KEY.encode()):
            return 403, "wrong key", "wrong key"
        return None

    def subprotocol(self, ws: WebSocket) -> str | None:
        """The subprotocol the accepted handshake names, if any."""
        return None

    def user(self, ws: WebSocket) -> str | None:
        """The user the handshake named; None: its sessions are its connection's, as anyone's with their token."""
        return None

    def watch(self, ws: WebSocket) -> asyncio.Task[None] | None:
        """A task that runs while `ws` is open, if the credentials need one; cancelled as it closes."""
        return None

    async def refresh(self, ws: WebSocket, token: str) -> dict[str, Any]:
        """A `refresh` frame: the new credentials, checked; the frame that answers it."""
        raise BadRequest("no_tokens")

    async def admit(self, ws: WebSocket, turn: Turn, session_id: str | None) -> None:
        """A question from `ws`, before the model is asked: raise BadRequest (for `session_id`) to refuse it."""

    def spent(self, turn: Turn, usage: dict[str, int] | None) -> None:
        """The answer to a question admitted is over: its usage as the model reported it; None if the model never did
        (it was cut short, it failed, or it was never asked: then turn.task is None)."""


GATE = Gate()


async def refusal(conn: HTTPConnection) -> tuple[int, str, str] | None:
    """Why a handshake is refused, if it is: its HTTP status, the reason (as a client may be told it), and the log's
    line for it (never a key)."""
    host, origin = conn.headers.get("host", ""), conn.headers.get("origin", "").rstrip("/").lower()
    if not host_allowed(host):
        return 400, "host", f"Host {host!r} not allowed (ALLOWED_HOSTS)"
    if refused := await GATE.check(conn):
        return refused
    # subtle: only browsers send Origin, and a browser page from another site must not get in; our own page's Origin
    # names the Host it was served from, one that ALLOWED_HOSTS let in
    if origin and "*" not in ALLOWED_ORIGINS and origin not in ALLOWED_ORIGINS:
        if urlsplit(origin).netloc != host.lower():
            return 403, "origin", f"Origin {conn.headers.get('origin')!r} not allowed (ALLOWED_ORIGINS)"
    if DRAINING.is_set():
        return 503, "the server is restarting", "the server is restarting"
    if len(CONNECTIONS) >= MAX_CONNECTIONS:
        return 503, f"{MAX_CONNECTIONS=} are open", f"{MAX_CONNECTIONS=} are open"
    return None


async def chat(ws: WebSocket) -> None:
    if refused := await refusal(ws):
        status, reason, line = refused
        log.warning("refused a WebSocket: %s", line)
        if status == 400:
            await ws.send_denial_response(PlainTextResponse("Invalid host header", 400))
        elif status == 401:
            await ws.send_denial_response(PlainTextResponse(f"Refused: {reason}.", 401))
        elif status == 403:
            await ws.close(code=1008)  # before accept(): uvicorn answers the handshake with HTTP 403
        else:
            await ws.send_denial_response(PlainTextResponse(f"Refused: {reason}; try again shortly.", 503))
        return
    CONNECTIONS[ws] = None
    held: set[Session] = set()  # the sessions this connection attached (another may have taken one over since)
    sending: asyncio.Task[None] | None = None  # `deliver` of the turn this connection streams
    watching = None
    try:
        await ws.accept(subprotocol=GATE.subprotocol(ws))
        watching = GATE.watch(ws)
        while (message := await ws.receive())["type"] != "websocket.disconnect":
            try:
                request = parse(message)
                held = {s for s in held if s.owner is ws and SESSIONS.get(s.id) is s}
                streaming = sending is not None and not sending.done()
                sending = await handle(ws, request, held, streaming) or sending
            except BadRequest as bad:
                await refuse(ws, bad.frame)
            except StoreUnavailable as exc:
                log.debug("the session store failed: %s", exc)  # the store says so once, not at each question
                await refuse(ws, error_frame("store_down", request.get("session_id")))
            CONNECTIONS[ws] = sending
    except (WebSocketDisconnect, WebSocketDisconnected):
        pass  # it closed while a frame was sent to it (a resume's, say)
    finally:
        if watching:
            watching.cancel()
        if sending:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
        for session in held:
            if session.owner is ws and SESSIONS.get(session.id) is session:
                detach(session)  # its answer, if any, streams on for a resume (see RESUME_GRACE)
                try:
                    await STORE.release(session)
                except StoreUnavailable:
                    pass  # a shared store lets the session expire by itself, a little later
        CONNECTIONS.pop(ws, None)


async def handle(
    ws: WebSocket, request: dict[str, Any], held: set[Session], streaming: bool
) -> asyncio.Task[None] | None:
    """One valid frame from `ws`, which holds the sessions `held`; return the task that sends a new turn, if one
    starts. A refusal is raised as BadRequest."""
    kind, session_id = request["type"], request.get("session_id")
    session = SESSIONS.get(session_id)
    if kind == "cancel":
        for mine in held:  # one of them streams at most: its end frame holds what was read
            stop(mine)
    elif kind == "refresh":
        await send(ws, await GATE.refresh(ws, request["token"]))
    elif kind == "end_session":
        if session is not None and session.owner is ws:
            stop(session)  # its end frame still comes
            drop(session)
            await STORE.forget(session)
        elif session is not None and session.user != GATE.user(ws):
            pass  # another user's: ignored, as an unknown one is
        elif session is not None or await STORE.exists(session_id, GATE.user(ws)):  # an unknown one is ignored
            raise BadRequest("in_use", session_id)
    elif DRAINING.is_set():
        raise BadRequest("restarting", session_id)  # before busy: reconnect elsewhere
    elif not STORE.healthy:  # a shared store is away: no model call that could not be recorded
        raise BadRequest("store_down", session_id)
    elif streaming:
        raise BadRequest("busy", session_id)
    elif (session is None or session.owner is not ws) and len(held) >= MAX_SESSIONS_PER_CONNECTION:
        raise BadRequest("too_many_sessions", session_id)
    elif kind == "resume":
        if (session := await take(session_id, request["resume_token"], GATE.user(ws))) is None:
            raise BadRequest("not_found", session_id)  # one answer for both cases: no oracle
        held.add(session)
        return await resume(ws, session, request["turn_id"], request["after"])
    elif session is not None and session.owner is not ws:  # (another user's: as if there were none)
        raise BadRequest("in_use" if session.user == GATE.user(ws) else "not_found", session_id)
    else:
        question = request["question"]
        turn = Turn(
            secrets.token_urlsafe(12), question, bytes=sys.getsizeof(question) + ANSWER_BYTES, reserved=ANSWER_BYTES
        )
        await GATE.admit(ws, turn, session_id)  # a budget may refuse it (rate_limited), before the checks that hold
        # what they find
        try:
            return await admitted(ws, session, session_id, turn, held)
        finally:
            if turn.task is None:  # the model was never asked
                GATE.spent(turn, None)
    return None


async def admitted(
    ws: WebSocket, session: Session | None, session_id: str | None, turn: Turn, held: set[Session]
) -> asyncio.Task[None]:
    """A question admitted: room for it, its session (a new one if none), and its turn, started. Each check holds what
    it finds before anything is awaited, so that questions asked at once cannot all pass it."""
    now = SESSIONS.get(session_id)
    if now is not session:  # another connection made it, or took it, while the budget was asked
        raise BadRequest("in_use" if now is None or now.user == GATE.user(ws) else "not_found", session_id)
    if DRAINING.is_set():  # (the drain began meanwhile)
        raise BadRequest("restarting", session_id)
    if len(STREAMS) >= MAX_CONCURRENT_STREAMS and not make_room():
        raise BadRequest("busy", session_id)
    if session is not None and (why := room(0, turn.bytes)):
        raise BadRequest(why, session_id)
    session = session or new_session(session_id, ws, turn.question)
    new = session not in held
    try:
        sending = await start_turn(ws, session, turn, chosen_id=new and session_id is not None)
    except (BadRequest, StoreUnavailable):
        if new:
            drop(session)  # it was never recorded
        raise
    held.add(session)
    return sending


async def start_turn(ws: WebSocket, session: Session, turn: Turn, chosen_id: bool) -> asyncio.Task[None]:
    """Ask the model; return the task that sends the answer to `ws`. The store records the turn before the start
    frame goes, while the model is asked (a round trip saved at every question), except in a new session whose id
    the client chose: the store first says whether it exists elsewhere, so that a refusal costs no model call."""
    session.pending = turn  # subtle: counted with its answer's room reserved, so that questions asked at once each
    # find room for theirs
    count(turn, True)
    if not chosen_id:
        ask_model(session, turn)
    try:
        if not await STORE.begin(session, turn):  # held elsewhere (or, new here, it exists elsewhere)
            raise BadRequest("in_use", session.id)
    except (BadRequest, StoreUnavailable) as exc:
        session.pending = None
        count(turn, False)
        halt(turn, exc.frame["code"] if isinstance(exc, BadRequest) else "unavailable")  # its outcome
        if isinstance(exc, BadRequest):
            let_go(session, answer_goes_on=False)  # a resume elsewhere took it (or, new here, it exists elsewhere)
        raise
    if chosen_id:
        ask_model(session, turn)
    start = {"type": "start", "session_id": session.id, "turn_id": turn.id, "resume_token": session.resume_token}
    return asyncio.create_task(deliver(ws, session, turn, 0, start))


def ask_model(session: Session, turn: Turn) -> None:
    turn.task = asyncio.create_task(answer(session, turn))
    STREAMS.add(turn)
    turn.task.add_done_callback(lambda _: STREAMS.discard(turn))


async def take(session_id: str, token: str, user: str | None) -> Session | None:
    """The session a resume names, if `token` is its resume token and `user` its user; None for a wrong token,
    another user's session, or no such session. A shared store hands back a fresh copy of the session it holds,
    which replaces this process's copy, if any."""
    here = SESSIONS.get(session_id)  # subtle: before the store's round trip, during which it may be let go
    if here is None and STORE.shared and not DETACHED and (why := room(1, 0)):  # room(), with nothing to shed
        raise BadRequest(why, session_id)  # before the claim takes the session from its holder
    session = await STORE.claim(session_id, token, here, user)
    if session is None or session is here:
        return session  # subtle: only a valid claim may evict a detached session below, to make room
    if here is not None:
        let_go(here, answer_goes_on=False)
    elif why := room(1, 0):  # they filled up during the round trip
        let_go(session, answer_goes_on=False)  # it follows nothing
        await STORE.release(session)
        raise BadRequest(why, session_id)
    keep(session)
    return session


ROLES = {"human": "user", "ai": "assistant"}  # LangChain's message types, as the resumed frame names them


async def resume(ws: WebSocket, session: Session, turn_id: str | None, after: int) -> asyncio.Task[None] | None:
    """Attach the session to `ws` (taking it from any connection that still held it) and say what it holds; return
    the task that sends its pending turn, from the token after `after` if the client names that turn. Replays are
    paced per session (REPLAY_RATE), whichever connection asks."""
    loop = asyncio.get_running_loop()
    # subtle: paced per session, not per connection, so that reconnecting again and again to replay a long answer
    # costs the client time, not the server a core
    if (wait := session.replay_due - loop.time()) > 0:
        await asyncio.sleep(wait)
        if SESSIONS.get(session.id) is not session:  # taken from here meanwhile
            raise BadRequest("in_use", session.id)
    attach(session, ws)
    turn = session.pending
    history = [{"role": ROLES[m.type], "text": m.text} for m in session.history]
    pending = turn and {"turn_id": turn.id, "question": turn.question}
    await send(ws, {"type": "resumed", "session_id": session.id, "history": history, "pending": pending})
    if turn is None or session.owner is not ws:
        return None
    if turn_id != turn.id:
        after = 0
    elif turn.producer is None:  # subtle: a client may claim more than exists (followed from elsewhere, it may not:
        after = min(after, len(turn.tokens))  # the tokens it saw may not be in the store yet)
    session.replay_due = max(session.replay_due, loop.time()) + max(0, len(turn.tokens) - after) / REPLAY_RATE
    return asyncio.create_task(deliver(ws, session, turn, after, None))


# --- routes and the app


async def healthz(request: Request) -> JSONResponse:
    if DRAINING.is_set():  # a load balancer stops sending new clients here
        return JSONResponse({"status": "draining", **counts()}, status_code=503)
    if not STORE.healthy:  # a shared store is away: no question can be answered (it comes back by itself)
        return JSONResponse({"status": "store_unavailable", **counts()}, status_code=503)
    return JSONResponse({"status": "ok", **counts()})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """The store reached and the Bedrock client opened before the first question (without this lifespan, the first
    question opens the client); both closed after the last answer."""
    await STORE.open()
    try:
        if isinstance(MODEL, BedrockChat):
            await MODEL.open()
        log.info("chat-stream started: model=%s, sessions %s", BEDROCK_MODEL_ID, STORE.where)
        yield
    finally:
        if isinstance(MODEL, BedrockChat):
            await MODEL.aclose()
        await STORE.close()  # after the last answer (a SIGTERM drain lets them finish): the last ones are written


class HostCheck:
    """The app's middleware: a request or handshake whose Host header it does not serve gets HTTP 400 (see
    `host_allowed`), as Starlette's TrustedHostMiddleware answers it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and not host_allowed(host := Headers(scope=scope).get("host", "")):
            if scope["type"] == "websocket":
                log.warning("refused a WebSocket: Host %r not allowed (ALLOWED_HOSTS)", host)
            await PlainTextResponse("Invalid host header", status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


routes = [
    Route("/healthz", healthz),
    WebSocketRoute("/ws/chat/completions", chat),
]
middleware = [Middleware(HostCheck)]

app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


# === Above: the reference, a whole app. Below: the layers a sidecar adds, each a section to delete whole =========
# Each layer brings its own settings and imports, and plugs in by replacing or extending something the reference owns
# (STORE, GATE, METER, ERRORS, the app's routes and lifespan); the reference never names a layer.


# --- the Redis store: sessions in Redis, shared by every process and replica with the same REDIS_URL; any of them can
# take a session over after a drop

import contextlib  # noqa: E402 (each layer imports what it needs where it begins, so that it can be deleted whole)
import itertools  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import redis  # noqa: E402
import redis.asyncio  # noqa: E402
from redis.asyncio.connection import parse_url  # noqa: E402
from redis.asyncio.retry import Retry  # noqa: E402
from redis.backoff import NoBackoff  # noqa: E402
from redis.exceptions import RedisError  # noqa: E402


def redis_url(raw: str) -> str:
    if urlsplit(raw).scheme not in ("redis", "rediss"):
        raise ValueError(raw)
    parse_url(raw)  # as the connection pool will: its query arguments too
    return raw


redis_url.__name__ = "a redis:// or rediss:// URL"
REDIS_URL = setting("REDIS_URL", redis_url, None, secret=True)  # sessions shared by processes; unset: this one
PROCESS = secrets.token_hex(6)  # this process, as the others that share the store name it
CLAIMS = itertools.count(1)  # numbers each hold a copy of a session here takes on it
MESSAGES = {"human": HumanMessage, "ai": AIMessage}  # LangChain's message types, as the store keeps them
ERRORS["producer_gone"] = (
    "unavailable",
    "The server answering this question stopped before the answer ended; ask again.",
)


def milliseconds(seconds: float) -> int:
    return int(seconds * 1000)


def dumps(history: list[BaseMessage]) -> str:
    return json.dumps([[m.type, m.text] for m in history], ensure_ascii=False)  # read back with MESSAGES


class RedisStore(Store):
    """Sessions in Redis (or Valkey, or ElastiCache without cluster mode), shared by every process with the same
    REDIS_URL. Keys:

      chat:session:{session_id}  hash: token (SHA-256 of the resume token, with its user's if any), user (SHA-256 of
                                 it, or ""), history (JSON), owner (the claim of the connection holding it, "" while
                                 none does), turn and question (the pending turn)
      chat:turn:{turn_id}        stream: the answer's tokens in batches {s: first seq, t: JSON list}, then its
                                 final frame {f: JSON, k: how many history messages were sent with the question}
      chat:process:{process}     set: "." and the turns the process reads now; it lives LEASE unless renewed, so a
                                 process that dies frees its sessions and its turns

    The reference's sessions stay the working copy in each process; Redis is what outlives a process. A session's key
    expires SESSION_TTL after its connection closed; while one holds it, it is renewed to SESSION_TTL
    + 60 s every 30 s. A turn's key lives as long as its session's (each write, claim, release and renewal gives it
    the session's TTL), and goes once it is delivered (the next write of the process reading it deletes it, should the
    settle have come first). A
    resume that takes a session from a connection publishes [session_id, claim] on chat:moved; a cancel of an answer
    read elsewhere, its turn_id on chat:cancel. Each process writes what it reads from Bedrock from one task, in one
    script call every FLUSH_EVERY. Standalone Redis only (or a primary endpoint): scripts touch several keys.
    """

    shared = True
    FLUSH_EVERY = 0.02  # seconds tokens gather before they are written
    LEASE = 3.0  # seconds a process counts as alive after its last heartbeat (one a second)
    BEGIN = """
        local session = redis.call('HMGET', KEYS[1], 'owner', 'user')
        if session[1] and session[2] and session[2] ~= ARGV[9] then return -1 end  -- another user's
        if session[1] and session[1] ~= ARGV[1] then return 0 end
        redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', ARGV[2], 'history', ARGV[3], 'turn', ARGV[4],
                   'question', ARGV[5], 'producer', ARGV[8], 'user', ARGV[9])
        redis.call('PEXPIRE', KEYS[1], ARGV[6])
        redis.call('SADD', KEYS[2], '.', ARGV[4])
        redis.call('PEXPIRE', KEYS[2], ARGV[7])
        return 1"""
    CLAIM = """
        local session = redis.call('HMGET', KEYS[1], 'token', 'owner', 'history', 'turn', 'question', 'producer')
        if session[1] ~= ARGV[2] then return false end
        redis.call('HSET', KEYS[1], 'owner', ARGV[1])
        redis.call('PEXPIRE', KEYS[1], ARGV[3])
        if session[4] ~= '' then redis.call('PEXPIRE', 'chat:turn:' .. session[4], ARGV[3]) end
        if session[2] ~= '' and session[2] ~= ARGV[1] then  -- (its own claim: this call, sent again)
            redis.call('PUBLISH', 'chat:moved', cjson.encode({ARGV[4], session[2]}))
        end
        return session"""
    SETTLE = """
        if redis.call('HGET', KEYS[1], 'turn') ~= ARGV[1] then return 0 end
        redis.call('HSET', KEYS[1], 'turn', '', 'question', '', 'history', ARGV[2])
        redis.call('PEXPIRE', KEYS[1], ARGV[3])
        redis.call('DEL', KEYS[2])
        return 1"""
    RELEASE = """
        local session = redis.call('HMGET', KEYS[1], 'owner', 'turn')
        if session[1] ~= ARGV[1] then return 0 end
        redis.call('HSET', KEYS[1], 'owner', '', 'left', ARGV[1])
        if session[2] ~= '' then redis.call('PEXPIRE', 'chat:turn:' .. session[2], ARGV[2]) end
        return redis.call('PEXPIRE', KEYS[1], ARGV[2])"""  # subtle: PEXPIRE 0 deletes it (SESSION_TTL=0)
    EVICT = """
        local session = redis.call('HMGET', KEYS[1], 'owner', 'left', 'turn')
        if session[1] ~= '' or session[2] ~= ARGV[1] then return 0 end
        if session[3] ~= '' then redis.call('DEL', 'chat:turn:' .. session[3]) end
        return redis.call('DEL', KEYS[1])"""  # only a session this copy released, no one holding it since
    FORGET = """
        if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0"""
    FLUSH = """
        local process, n, ttl = KEYS[#KEYS], (#KEYS - 1) / 2, ARGV[1]
        for i = 1, n do
            local turn, session, a = KEYS[2 * i - 1], KEYS[2 * i], 1 + (i - 1) * 5
            if redis.call('HGET', session, 'turn') ~= ARGV[a + 5] then
                redis.call('DEL', turn)  -- delivered (by any process) or its session gone: nothing to keep
                redis.call('SREM', process, ARGV[a + 5])
            else
                if ARGV[a + 2] ~= '' then redis.call('XADD', turn, '*', 's', ARGV[a + 1], 't', ARGV[a + 2]) end
                if ARGV[a + 3] ~= '' then
                    redis.call('XADD', turn, '*', 'f', ARGV[a + 3], 'k', ARGV[a + 4])
                    redis.call('SREM', process, ARGV[a + 5])
                end
                local left = redis.call('PTTL', session)  -- in every call that writes it: it lives as its session
                redis.call('PEXPIRE', turn, left > 0 and left or ttl)
            end
        end
        if ARGV[n * 5 + 2] ~= '0' then
            for j = n * 5 + 3, #ARGV do redis.call('SADD', process, ARGV[j]) end
            redis.call('SADD', process, '.')
            redis.call('PEXPIRE', process, ARGV[n * 5 + 2])
        end
        return n"""
    TOUCH = """
        for _, key in ipairs(KEYS) do
            redis.call('PEXPIRE', key, ARGV[1])
            local turn = redis.call('HGET', key, 'turn')
            if turn and turn ~= '' then redis.call('PEXPIRE', 'chat:turn:' .. turn, ARGV[1]) end
        end
        return #KEYS"""

    def __init__(self, url: str) -> None:
        pool = redis.asyncio.BlockingConnectionPool.from_url(  # subtle: a full ConnectionPool raises; this one waits
            url,
            max_connections=MAX_CONNECTIONS + 16,  # a follower each at most (blocking reads), and a few more
            timeout=5,  # seconds to wait for a connection from the pool
            socket_connect_timeout=2,
            socket_timeout=5,  # longer than a follower's blocking read (1 s)
            retry=Retry(NoBackoff(), 1),  # once, at once: a connection Redis closed is reopened; then "unavailable"
        )
        self.redis = redis.asyncio.Redis(connection_pool=pool)
        self.sockets = MAX_CONNECTIONS + 16
        self.where = f"in Redis at {shown(url)}"
        scripts = ("BEGIN", "CLAIM", "SETTLE", "RELEASE", "EVICT", "FORGET", "FLUSH", "TOUCH")
        self.scripts = {name: self.redis.register_script(getattr(self, name)) for name in scripts}
        self.process = f"chat:process:{PROCESS}"
        # the copies of sessions made here, each with its claim (as a key's owner field names it), both ways; entries
        # leave with their copy, or when a resume here replaces it, or a notice lets it go
        self.claims: weakref.WeakKeyDictionary[Session, str] = weakref.WeakKeyDictionary()
        self.copies: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()
        self.attached: dict[str, Session] = {}  # the copies a connection here holds (their keys renewed); each leaves
        # as its connection releases it or ends it, or when a notice lets it go
        self.reading: weakref.WeakValueDictionary[str, Turn] = weakref.WeakValueDictionary()  # turns read here, by id
        self.shared: weakref.WeakKeyDictionary[Turn, int] = weakref.WeakKeyDictionary()  # tokens written, by turn
        self.tasks: set[asyncio.Task[Any]] = set()  # the writer, the listener, followers and notices, until they end
        self.held_ttl = milliseconds(SESSION_TTL + 60)
        self.live: dict[Turn, str] = {}  # the turns this process reads whose final frame is not written yet, and
        # their sessions' ids
        self.dirty: set[Turn] = set()  # the turns with tokens or a final frame to write
        self.wake = asyncio.Event()  # something to write
        self.beat_at = 0.0  # when the process's key is renewed next (loop time)
        self.touch_at = 0.0  # when the keys of the sessions attached here are renewed next

    def claim_of(self, session: Session) -> str:
        """The claim of this copy of the session, `{process}.{n}`, made the first time it is asked for."""
        if session not in self.claims:
            self.claims[session] = claim = f"{PROCESS}.{next(CLAIMS)}"
            self.copies[claim] = session
        return self.claims[session]

    def unclaim(self, session: Session) -> None:
        """This copy is no longer the process's: no notice reaches it, and its key is not renewed from here."""
        self.copies.pop(self.claims.get(session, ""), None)
        if self.attached.get(session.id) is session:
            del self.attached[session.id]

    @contextlib.contextmanager
    def reaching(self) -> Iterator[None]:
        """Redis's failures, as the reference knows them."""
        try:
            yield
        except RedisError as exc:
            self.failing(exc)
            raise StoreUnavailable(f"Redis: {exc}") from exc

    def failing(self, exc: RedisError) -> None:
        """Redis failed: one WARNING line for the outage, not one a request (the next write that works says it is
        back)."""
        if self.healthy:
            log.warning("Redis fails (REDIS_URL): %s; questions get unavailable until it answers again", exc)
        self.healthy = False

    def spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def session_key(self, session_id: str) -> str:
        return f"chat:session:{session_id}"

    def turn_key(self, turn_id: str) -> str:
        return f"chat:turn:{turn_id}"

    async def open(self) -> None:
        await self.redis.ping()
        self.spawn(self.write())
        self.spawn(self.listen())

    async def close(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.flush(beat=False)
            await self.redis.delete(self.process)  # its turns are over: followers elsewhere know it at once
        except RedisError as exc:
            log.warning("could not write the last answers to Redis at shutdown: %s", exc)
        await self.redis.aclose()

    async def begin(self, session: Session, turn: Turn) -> bool:
        keys = [self.session_key(session.id), self.process]
        args = [self.claim_of(session), digest(session.resume_token, session.user), dumps(session.history), turn.id]
        args.append(turn.question)
        self.reading[turn.id] = turn  # a cancel from elsewhere finds it, even one sent as this call returns
        user = self.user_key(session.user)
        with self.reaching():
            began = await self.scripts["BEGIN"](keys, [*args, self.held_ttl, milliseconds(self.LEASE), PROCESS, user])
        if began != 1:
            self.unclaim(session)
            if began == -1:  # as if there were none
                raise BadRequest("not_found", session.id)
            return False
        self.attached[session.id] = session
        self.live[turn] = session.id
        self.record(turn)  # the tokens read meanwhile
        return True

    def record(self, turn: Turn) -> None:
        if turn in self.live:  # recorded by begin(): a turn refused is never written
            self.dirty.add(turn)
            self.wake.set()

    def cancel(self, turn: Turn) -> None:
        self.spawn(self.notify("chat:cancel", turn.id))

    async def notify(self, channel: str, message: str) -> None:
        try:
            await self.redis.publish(channel, message)
        except RedisError as exc:
            log.warning("could not publish on %s: %s", channel, exc)

    async def settle(self, session: Session, turn: Turn) -> None:
        keys = [self.session_key(session.id), self.turn_key(turn.id)]
        try:
            await self.scripts["SETTLE"](keys, [turn.id, dumps(session.history), self.held_ttl])
        except RedisError as exc:  # the next question writes the session whole again
            log.warning("could not record turn=%s in Redis: %s", turn.id, exc)

    async def claim(self, session_id: str, token: str, here: Session | None, user: str | None) -> Session | None:
        session = Session(session_id, None, token, user=user)  # (the digest holds the user: another's fails)
        args = [self.claim_of(session), digest(token, user), self.held_ttl, session_id]
        with self.reaching():
            if not (saved := await self.scripts["CLAIM"]([self.session_key(session_id)], args)):
                return None
            history, turn_id, question, producer = (value.decode() for value in saved[2:])
            session.history = [MESSAGES[kind](text) for kind, text in json.loads(history)]  # as dumps() wrote it
            if here and here.pending and here.pending.id == turn_id and here.pending.producer is None:
                session.pending = here.pending  # read here: delivered from memory (even if the claim's own notice,
                # on chat:moved, let `here` go meanwhile)
            elif turn_id:
                session.pending = await self.follow(session, Turn(turn_id, question, producer))
        if here is not None:
            self.unclaim(here)  # replaced by `session` (see take)
        self.attached[session_id] = session
        return session

    async def release(self, session: Session) -> None:
        if self.attached.get(session.id) is session:  # subtle: its claim stays, so that if this call fails, a notice
            del self.attached[session.id]  # still reaches the copy when a resume elsewhere takes the session
        with self.reaching():
            await self.scripts["RELEASE"](
                [self.session_key(session.id)], [self.claim_of(session), milliseconds(SESSION_TTL)]
            )

    async def evict(self, session: Session) -> None:
        self.unclaim(session)
        try:
            await self.scripts["EVICT"]([self.session_key(session.id)], [self.claim_of(session)])
        except RedisError as exc:  # it expires by itself
            log.warning("could not evict session=%r from Redis: %s", session.id, exc)

    async def forget(self, session: Session) -> None:
        self.unclaim(session)
        with self.reaching():
            await self.scripts["FORGET"]([self.session_key(session.id)], [self.claim_of(session)])

    async def exists(self, session_id: str, user: str | None) -> bool:
        with self.reaching():
            found = await self.redis.hmget(self.session_key(session_id), "owner", "user")
        return found[0] is not None and (found[1] or b"").decode() == self.user_key(user)

    @staticmethod
    def user_key(user: str | None) -> str:
        """A session's user as Redis keeps it: a hash, never the id ("" for none)."""
        return "" if user is None else digest(user).hex()

    async def read_elsewhere(self, session: Session) -> bool:
        try:
            owner = (await self.redis.hget(self.session_key(session.id), "owner") or b"").decode()
            if not owner or owner == self.claims.get(session):
                return False
            return bool(await self.redis.exists(f"chat:process:{owner.partition('.')[0]}"))
        except RedisError:
            return False

    async def write(self) -> None:
        """The one task that writes what this process reads: new tokens and final frames every FLUSH_EVERY (when
        there are any), the process's heartbeat every second, and every 30 s the keys of the sessions it holds."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 1)
            await asyncio.sleep(self.FLUSH_EVERY)
            self.wake.clear()
            beat, now = False, asyncio.get_running_loop().time()
            if now >= self.beat_at:
                beat, self.beat_at = True, now + 1
            with contextlib.suppress(RedisError):
                try:
                    await self.flush(beat)
                except RedisError:
                    if beat:  # subtle: Redis out of memory refuses the script, not this renewal: readers elsewhere
                        await self.redis.pexpire(self.process, milliseconds(self.LEASE))  # wait for the answer
                    raise  # instead of taking its process for dead
                except Exception:  # a bug: it must not stop every later write of this process
                    log.exception("could not write to Redis")
                    continue
                if now >= self.touch_at:
                    self.touch_at = now + 30
                    await self.touch()

    async def touch(self) -> None:
        """Renew the keys of the sessions attached here: a session lives on while a connection holds it, idle or
        not, as in one process."""
        if attached := [self.session_key(session_id) for session_id in self.attached]:
            await self.scripts["TOUCH"](attached, [self.held_ttl])

    async def flush(self, beat: bool) -> None:
        """Write the new tokens and final frames, and with `beat` renew the process's key, in one script call: at
        200 streams that costs a fifth of the CPU of a pipeline of XADDs (redis-py's packing of each command)."""
        turns, self.dirty = self.dirty, set()
        written = {turn: (len(turn.tokens), turn.final) for turn in turns}
        keys, args = [], [self.held_ttl]
        for turn, (count, final) in written.items():
            shared = self.shared.get(turn, 0)
            tokens = turn.tokens[shared:count]
            if turn.thought:  # a Thought as {"r": its text}
                tokens = [{"r": t} if type(t) is Thought else t for t in tokens]
            batch = json.dumps(tokens, ensure_ascii=False) if shared < count else ""
            end = "" if final is None else json.dumps(final, ensure_ascii=False)
            keys += [self.turn_key(turn.id), self.session_key(self.live[turn])]
            args += [shared + 1, batch, end, len(turn.context), turn.id]
        args.append(milliseconds(self.LEASE) if beat else 0)
        if beat:
            args += [turn.id for turn in self.live if written.get(turn, (0, None))[1] is None]
        try:
            await self.scripts["FLUSH"]([*keys, self.process], args)
        except RedisError as exc:
            self.failing(exc)
            self.dirty |= turns  # written again, whole, next time: a follower counts each seq once
            raise
        if not self.healthy:
            log.info("Redis answers again: questions are taken")
        self.healthy = True
        for turn, (count, final) in written.items():
            self.shared[turn] = count
            if final is not None:
                del self.live[turn]

    async def follow(self, session: Session, turn: Turn) -> Turn:
        """A turn that another process reads (or read): what was written so far, then a task that follows it."""
        entries = await self.redis.xrange(self.turn_key(turn.id))
        last = self.apply(session, turn, entries) if entries else b"0-0"
        if turn.final is None:
            turn.task = self.spawn(self.tail(session, turn, last))
        return turn

    def apply(self, session: Session, turn: Turn, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> bytes:
        for _, data in entries:
            if turn.final is not None:
                break
            if b"t" in data:
                first, tokens = int(data[b"s"]), json.loads(data[b"t"])
                for token in tokens[len(turn.tokens) + 1 - first :]:  # a batch written twice counts once
                    if type(token) is dict:
                        token, turn.thought = Thought(token["r"]), True
                    turn.tokens.append(token)
                    grow(turn, token)
            else:
                turn.final, kept = json.loads(data[b"f"]), int(data[b"k"])
                grow(turn, turn.final.get("full_text", ""))
                turn.context = session.history[len(session.history) - kept :]
        turn.changed.set()
        return entries[-1][0]

    async def tail(self, session: Session, turn: Turn, last: bytes) -> None:
        """Follow the turn to its final frame. If its process stops reading it first (it is no longer in the process's
        key, and no frame came for two seconds), the turn ends as unavailable; unless it was delivered meanwhile."""
        key, misses = self.turn_key(turn.id), 0
        try:
            while turn.final is None:
                if reply := await self.redis.xread({key: last}, block=1000):
                    last, misses = self.apply(session, turn, reply[0][1]), 0
                elif not await self.redis.sismember(f"chat:process:{turn.producer}", turn.id):
                    misses += 1  # subtle: twice, as a final frame written just after the read is then read
                    if misses < 2:
                        continue
                    if await self.redis.hget(self.session_key(session.id), "turn") != turn.id.encode():
                        # subtle: delivered elsewhere after this copy was read, to a connection its client had left
                        # (the turn and its frames are gone): as when a resume elsewhere takes the session, this copy
                        # goes, and its reader is told to resume, which brings the answer in the history
                        let_go(session, answer_goes_on=False)
                        return
                    turn.final = error_frame("producer_gone", session.id, turn.id)
        except RedisError as exc:
            log.warning("lost the answer turn=%s from Redis: %s", turn.id, exc)
            turn.final = error_frame("store_down", session.id, turn.id)
        finally:
            turn.changed.set()  # its reader wakes, even when it is stopped (see `unfollow`)

    async def listen(self) -> None:
        """Notices from other processes: a resume took a session held here; a client cancelled an answer read here."""
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe("chat:moved", "chat:cancel")
                    async for message in pubsub.listen():
                        self.notice(message["channel"].decode(), message["data"].decode())
            except RedisError:
                await asyncio.sleep(1)  # Redis is away (/healthz says so): listen again when it is back

    def notice(self, channel: str, data: str) -> None:
        if channel == "chat:moved":
            session_id, claim = json.loads(data)
            if (session := self.copies.get(claim)) is not None and session.id == session_id:
                self.unclaim(session)
                let_go(session, answer_goes_on=True)  # its connection's next question: session_in_use
        elif turn := self.reading.get(data):
            halt(turn, "cancelled")


def shown(url: str) -> str:
    """A Redis URL without its password."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


def reach_redis(url: str) -> None:
    """At start-up: one clear line and exit 1 if Redis does not answer (the password never shows)."""
    where = shown(url)
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3) as client:
            client.ping()
    except RedisError as exc:
        sys.exit(early_line(f"cannot reach Redis at {where} (REDIS_URL): {exc}"))


if REDIS_URL:
    if __name__ == "__main__":  # python chat_stream.py (its workers, if any, share the supervisor's check)
        reach_redis(REDIS_URL)
    STORE = RedisStore(REDIS_URL)


# --- signed tokens: the app's own JWTs name the user who asks, in place of one shared key; a connection lives no
# longer than its token

import jwt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_pem_public_key  # noqa: E402

JWT_SECRET = setting("JWT_SECRET", str, None, secret=True)  # HS256 tokens, signed with this secret
JWT_PUBLIC_KEY = setting("JWT_PUBLIC_KEY", str, None)  # or RS256 / ES256 tokens, checked with this PEM public key
# (its lines joined by "\n", as one environment variable holds them)
JWT_JWKS_URL = setting("JWT_JWKS_URL", str, None)  # or RS256 / ES256 tokens, checked with the keys this JWKS lists
JWT_AUDIENCE = setting("JWT_AUDIENCE", str, None)  # the `aud` every token must name, if set
JWT_ISSUER = setting("JWT_ISSUER", str, None)  # the `iss` every token must name, if set
if sum(v is not None for v in (JWT_SECRET, JWT_PUBLIC_KEY, JWT_JWKS_URL)) > 1:
    raise BadSetting("set one of JWT_SECRET, JWT_PUBLIC_KEY and JWT_JWKS_URL")
if CHAT_API_KEY is not None and (JWT_SECRET or JWT_PUBLIC_KEY or JWT_JWKS_URL):
    raise BadSetting("set CHAT_API_KEY or a JWT setting, not both: tokens take the key's place")
LEEWAY = 5  # seconds of clock skew allowed on exp, nbf and iat (a connection ends as late as its token is taken)
TOKEN_GRACE = 20.0  # seconds an answer in flight may go on after its connection's token expired
TOKEN_EXPIRED = 4401  # the close code when it did: get a new token and reconnect (then resume)
JWKS_LIFESPAN, JWKS_RETRY, JWKS_MAX_BYTES = 300.0, 5.0, 65536  # a JWKS is kept 5 minutes; a kid it does not list
# fetches it again at most every 5 s (whatever a flood of made-up kids asks); a larger one is refused


class Keys:
    """The keys that check tokens: a secret (HS256), a public key (RS256 or ES256, by its type), or a JWKS fetched
    and kept for JWKS_LIFESPAN, fetched again for a kid it does not list (at most every JWKS_RETRY seconds, however
    many tokens name one)."""

    def __init__(self) -> None:
        self.jwks: dict[str, jwt.PyJWK] = {}
        self.fetched = -JWKS_RETRY  # (monotonic) when the JWKS was last fetched
        self.fetching = asyncio.Lock()
        if JWT_PUBLIC_KEY:
            try:
                self.public = load_pem_public_key(JWT_PUBLIC_KEY.replace("\\n", "\n").encode())
            except ValueError:
                raise BadSetting("bad setting JWT_PUBLIC_KEY: expected a PEM public key (RSA or EC)") from None
            if not isinstance(self.public, RSAPublicKey | EllipticCurvePublicKey):
                raise BadSetting("bad setting JWT_PUBLIC_KEY: expected an RSA or EC public key")
            self.algorithm = "ES256" if isinstance(self.public, EllipticCurvePublicKey) else "RS256"

    async def find(self, token: str) -> tuple[Any, list[str]]:
        """The key for `token`, and the one algorithm it may be signed with (never "none", never HS with a public
        key)."""
        if JWT_SECRET:
            return JWT_SECRET, ["HS256"]
        if JWT_PUBLIC_KEY:
            return self.public, [self.algorithm]
        kid = jwt.get_unverified_header(token).get("kid")
        if kid not in self.jwks or time.monotonic() - self.fetched > JWKS_LIFESPAN:
            async with self.fetching:  # one fetch for all the handshakes that wait for it
                age = time.monotonic() - self.fetched
                if age > JWKS_LIFESPAN or (kid not in self.jwks and age > JWKS_RETRY):
                    await self.fetch()
        if (found := self.jwks.get(kid)) is None:
            raise jwt.InvalidKeyError(f"no key {kid!r} in the JWKS")
        return found.key, [found.algorithm_name]

    async def fetch(self) -> None:
        self.fetched = time.monotonic()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                async with http.get(JWT_JWKS_URL) as response:
                    response.raise_for_status()
                    body = await response.content.read(JWKS_MAX_BYTES + 1)
            if len(body) > JWKS_MAX_BYTES:
                raise ValueError(f"over {JWKS_MAX_BYTES} bytes")
            keys = jwt.PyJWKSet.from_dict(json.loads(body)).keys
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as exc:
            log.warning("cannot read the JWKS at JWT_JWKS_URL: %s", exc)  # the keys known stay in use
            return
        self.jwks = {k.key_id: k for k in keys if k.key_id and k.algorithm_name in ("RS256", "ES256")}


def token_of(conn: HTTPConnection) -> tuple[str, str | None]:
    """The handshake's token, and the subprotocol to answer: `Authorization: Bearer`, `?token=`, or (what a browser
    can send) `Sec-WebSocket-Protocol: bearer, <token>`, answered `bearer`."""
    scheme, _, credentials = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip(), None
    offered = [p.strip() for p in conn.headers.get("sec-websocket-protocol", "").split(",")]
    if len(offered) == 2 and offered[0] == "bearer":
        return offered[1], "bearer"
    return conn.query_params.get("token", ""), None


class TokenGate(Gate):
    """Each handshake carries a JWT, checked with PyJWT: its signature, `exp` (required), `nbf` and `iat`, and `aud`
    and `iss` when JWT_AUDIENCE and JWT_ISSUER are set. Its `sub` is the user. A connection lives no longer than its
    token: a `refresh` frame with a new token for the same user moves its end; at the end an answer in flight has
    TOKEN_GRACE seconds to finish, then the connection is closed with TOKEN_EXPIRED."""

    def __init__(self) -> None:
        self.keys = Keys()

    async def claims(self, token: str) -> dict[str, Any]:
        key, algorithms = await self.keys.find(token)
        return jwt.decode(
            token,
            key,
            algorithms=algorithms,
            audience=JWT_AUDIENCE,
            issuer=JWT_ISSUER,
            leeway=LEEWAY,
            options={"require": ["exp", "sub"], "verify_aud": JWT_AUDIENCE is not None},
        )

    async def check(self, conn: HTTPConnection) -> tuple[int, str, str] | None:
        token, conn.state.subprotocol = token_of(conn)
        if not token:
            return 401, "no token", "no token"
        try:
            claims = await self.claims(token)
        except jwt.PyJWTError as exc:  # its message names the claim, never the token
            return 401, "invalid token", f"invalid token: {exc}"
        conn.state.user, conn.state.expires = str(claims["sub"]), float(claims["exp"])
        return None

    def subprotocol(self, ws: WebSocket) -> str | None:
        return ws.state.subprotocol

    def user(self, ws: WebSocket) -> str | None:
        return ws.state.user

    def watch(self, ws: WebSocket) -> asyncio.Task[None]:
        return asyncio.create_task(self.expire(ws))

    async def expire(self, ws: WebSocket) -> None:
        while (left := ws.state.expires + LEEWAY - time.time()) > 0:  # a refresh moves the end meanwhile
            await asyncio.sleep(left)
        if (sending := CONNECTIONS.get(ws)) is not None and not sending.done():
            await asyncio.wait([sending], timeout=TOKEN_GRACE)  # the answer in flight ends first
        log.info("closing a WebSocket whose token expired")
        await ws.close(TOKEN_EXPIRED, "token expired")

    async def refresh(self, ws: WebSocket, token: str) -> dict[str, Any]:
        try:
            claims = await self.claims(token)
        except jwt.PyJWTError as exc:
            log.info("refused a refresh: invalid token: %s", exc)
            raise BadRequest("bad_token") from None
        if str(claims["sub"]) != ws.state.user:
            raise BadRequest("other_user")
        ws.state.expires = float(claims["exp"])
        return {"type": "refreshed", "expires_at": int(claims["exp"])}


ERRORS["bad_token"] = ("invalid_request", "The token is not valid (signature, expiry, audience or issuer).")
ERRORS["other_user"] = ("invalid_request", "A refreshed token must name the same user.")
if JWT_SECRET or JWT_PUBLIC_KEY or JWT_JWKS_URL:
    GATE = TokenGate()


# --- budgets: what each user may ask a minute, and at once; without signed tokens, each key or client address;
# counted across every process in Redis with REDIS_URL, in the process otherwise

import math  # noqa: E402

import redis.exceptions  # noqa: E402 (with REDIS_URL, the Redis store's client counts them)

USER_REQUESTS_PER_MINUTE = setting("USER_REQUESTS_PER_MINUTE", positive_int, None)  # questions a user may ask
USER_TOKENS_PER_MINUTE = setting("USER_TOKENS_PER_MINUTE", positive_int, None)  # tokens a user's answers may spend
# (input + output, as Bedrock reports them)
USER_MAX_STREAMS = setting("USER_MAX_STREAMS", positive_int, None)  # a user's answers streaming at once
STREAM_LEASE = 10.0  # seconds a streaming answer's place lasts in Redis unless renewed (every third of it, by the
# process that reads it): one that dies frees its places
ERRORS["rate_limited"] = ("rate_limited", "You have asked too much for now; ask again after retry_after seconds.")
ERRORS["budget_down"] = ("unavailable", "Budgets cannot be counted right now; try again shortly.")


def waiting(full_at: float, now: float, per_minute: int | None) -> float:
    """Seconds until a bucket of `per_minute` that is full at `full_at` holds one again: 0 if it does now."""
    return 0.0 if per_minute is None else max(0.0, full_at - now - 60 + 60 / per_minute)


class Budgets(Gate):
    """The gate it wraps, with a budget for each user: a per-minute limit is a bucket that holds a minute's worth and
    refills continuously (a minute's worth may come at once, then as it refills), as Anthropic and OpenAI meter their
    own APIs. A question is admitted while its user's buckets are not empty and fewer than USER_MAX_STREAMS of its
    answers stream. What it may spend (its input, estimated, and MAX_TOKENS) leaves the tokens' bucket as it is admitted
    (so that questions asked at once cannot all pass on one token left), and what its answer did not spend comes back
    as it ends. An answer that streams is never cut: the bucket may go below empty, and the next question waits until
    it has refilled. `retry_after` is when the next question would be admitted, nothing else changing (for
    USER_MAX_STREAMS, 1 s: when an answer ends is unknown).

    A user is a signed token's `sub`; without tokens, whoever has CHAT_API_KEY (one budget for all who share it), or
    else a client address (client_of: an IPv6 one by its /64; behind a proxy, as uvicorn's FORWARDED_ALLOW_IPS lets
    its X-Forwarded-For say it)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.buckets: dict[str, list[float]] = {}  # by user: when its questions' and its tokens' buckets are full
        # (time.monotonic()); a user leaves once both are, and none of its answers streams
        self.streams: dict[str, int] = {}  # by user: its answers streaming
        self.charged: dict[Turn, tuple[str, int]] = {}  # the answers admitted and not over: their users, and the
        # tokens taken for them as they were admitted
        self.sweep_at = 1024  # users with buckets before the full ones are forgotten

    async def check(self, conn: HTTPConnection) -> tuple[int, str, str] | None:
        return await self.gate.check(conn)

    def subprotocol(self, ws: WebSocket) -> str | None:
        return self.gate.subprotocol(ws)

    def user(self, ws: WebSocket) -> str | None:
        return self.gate.user(ws)

    def watch(self, ws: WebSocket) -> asyncio.Task[None] | None:
        return self.gate.watch(ws)

    async def refresh(self, ws: WebSocket, token: str) -> dict[str, Any]:
        return await self.gate.refresh(ws, token)

    def who(self, ws: WebSocket) -> str:
        if (user := self.gate.user(ws)) is not None:
            return f"user:{digest(user).hex()}"
        return "key" if CHAT_API_KEY is not None else f"address:{client_of(ws)}"

    async def admit(self, ws: WebSocket, turn: Turn, session_id: str | None) -> None:
        await self.gate.admit(ws, turn, session_id)
        who, reserve = self.who(ws), self.estimate(turn, SESSIONS.get(session_id))
        try:
            wait = await self.take(who, turn, reserve)
        except StoreUnavailable:
            raise BadRequest("budget_down", session_id) from None
        if wait > 0:
            refused = BadRequest("rate_limited", session_id)
            refused.frame["retry_after"] = math.ceil(wait * 1000) / 1000  # seconds, to the millisecond above
            raise refused
        self.charged[turn] = who, reserve

    @staticmethod
    def estimate(turn: Turn, session: Session | None) -> int:
        """The tokens a question may spend, taken as it is admitted and settled as its answer ends: what it will send,
        estimated as request() counts them (4 characters a token), and MAX_TOKENS, the most its answer may write (as
        Anthropic and OpenAI count a request against a tokens-a-minute limit), so that answers asked at once cannot
        spend many times the limit before the first of them is counted."""
        if not USER_TOKENS_PER_MINUTE:
            return 0
        history = sum(len(m.content) for m in session.history) // 4 if session else 0
        return len(turn.question) // 4 + min(history, HISTORY_TOKENS) + MAX_TOKENS

    def spent(self, turn: Turn, usage: dict[str, int] | None) -> None:
        self.gate.spent(turn, usage)
        if (charged := self.charged.pop(turn, None)) is None:
            return
        who, reserved = charged
        if usage:
            tokens = usage["input_tokens"] + usage["output_tokens"]
        elif turn.tokens or turn.stopped:  # cut short, the model's usage never came: what it read, estimated, and
            tokens = count_tokens_approximately([*turn.context, HumanMessage(turn.question)]) + len(turn.tokens)
        else:  # the deltas it wrote; none for a question the model refused (or was never asked)
            tokens = 0
        self.give(who, turn, tokens - reserved)

    async def take(self, who: str, turn: Turn, reserve: int) -> float:
        """Seconds until `who` may ask: 0, and the question counted (with `reserve` tokens), if it may now."""
        now = time.monotonic()
        questions, tokens = (max(full_at, now) for full_at in self.buckets.get(who, (now, now)))
        wait = max(waiting(questions, now, USER_REQUESTS_PER_MINUTE), waiting(tokens, now, USER_TOKENS_PER_MINUTE))
        if USER_MAX_STREAMS and self.streams.get(who, 0) >= USER_MAX_STREAMS:
            wait = max(wait, 1.0)
        if wait > 0:
            return wait
        if USER_REQUESTS_PER_MINUTE:
            questions += 60 / USER_REQUESTS_PER_MINUTE
        if USER_TOKENS_PER_MINUTE:
            tokens += reserve * 60 / USER_TOKENS_PER_MINUTE
        if len(self.buckets) >= self.sweep_at:
            self.buckets = {u: b for u, b in self.buckets.items() if max(b) > now or self.streams.get(u)}
            self.sweep_at = max(1024, 2 * len(self.buckets))
        self.buckets[who] = [questions, tokens]
        self.streams[who] = self.streams.get(who, 0) + 1
        return 0.0

    def give(self, who: str, turn: Turn, tokens: int) -> None:
        """`turn` is over, and spent `tokens` more than were taken as it was admitted (fewer, if negative)."""
        if (streams := self.streams.pop(who) - 1) > 0:
            self.streams[who] = streams
        if USER_TOKENS_PER_MINUTE and tokens:
            bucket, now = self.buckets.setdefault(who, [0.0, 0.0]), time.monotonic()
            bucket[1] = max(max(bucket[1], now) + tokens * 60 / USER_TOKENS_PER_MINUTE, now)


class RedisBudgets(Budgets):
    """The budgets in Redis, shared by every process with the same REDIS_URL (times in microseconds, from Redis's
    clock). Questions are taken in script calls, one at a time: each call takes every question that came while the
    one before was on its way (one round trip per question at most; a burst of 200 questions, in two). The tokens of
    the answers that ended go the same way, off the questions' path. Keys:

      chat:budget:{user}   hash: q and t, when the user's questions' and tokens' buckets are full; it expires then
      chat:streams:{user}  sorted set: the user's answers streaming (turn ids), each scored with the end of its lease
      chat:call:{process}:{n}  a TAKE (its waits) or GIVE that counted, for a minute: sent again, it counts no more

    where {user} is "user:" and the SHA-256 of `sub` (never the id itself), "key", or "address:" and the address."""

    TAKE = """
        local before = redis.call('GET', KEYS[#KEYS])  -- this call's, if it ran and its reply was lost: as it was
        if before then return cjson.decode(before) end
        local now = redis.call('TIME')
        now = now[1] * 1e6 + now[2]
        local per_minute, most, lease = {tonumber(ARGV[1]), tonumber(ARGV[2])}, tonumber(ARGV[3]), tonumber(ARGV[4])
        local waits, admitted = {}, false
        for i = 1, (#KEYS - 1) / 2 do
            local budget, streams = KEYS[2 * i - 1], KEYS[2 * i]
            local bucket = redis.call('HMGET', budget, 'q', 't')
            local questions = math.max(tonumber(bucket[1]) or 0, now)
            local tokens = math.max(tonumber(bucket[2]) or 0, now)
            local wait = 0
            for j, full_at in ipairs({questions, tokens}) do
                if per_minute[j] > 0 then wait = math.max(wait, full_at - now - 60e6 + 60e6 / per_minute[j]) end
            end
            if most > 0 then
                redis.call('ZREMRANGEBYSCORE', streams, '-inf', now)  -- leases that ended: their processes died
                if redis.call('ZCARD', streams) >= most then wait = math.max(wait, 1e6) end
            end
            if wait <= 0 then
                admitted = true
                if per_minute[1] > 0 then questions = questions + 60e6 / per_minute[1] end
                if per_minute[2] > 0 then tokens = tokens + tonumber(ARGV[4 + 2 * i]) * 60e6 / per_minute[2] end
                if per_minute[1] > 0 or per_minute[2] > 0 then
                    local q, t = string.format('%.0f', questions), string.format('%.0f', tokens)
                    redis.call('HSET', budget, 'q', q, 't', t)
                    redis.call('PEXPIRE', budget, math.ceil((math.max(questions, tokens) - now) / 1000) + 1000)
                end
                if most > 0 then
                    redis.call('ZADD', streams, string.format('%.0f', now + lease * 1000), ARGV[3 + 2 * i])
                    redis.call('PEXPIRE', streams, lease)
                end
            end
            waits[i] = math.max(0, math.ceil(wait))
        end
        -- (refusals change nothing: the same call again may refuse or admit; and at maxmemory, a call that wrote
        -- nothing else could not write this: Redis refuses a script whose first write may take memory)
        if admitted then redis.call('SET', KEYS[#KEYS], cjson.encode(waits), 'PX', 60000) end
        return waits"""
    GIVE = """
        local again = redis.call('EXISTS', KEYS[#KEYS]) == 1  -- this call's, run already: its places go, not its tokens
        local now = redis.call('TIME')
        now = now[1] * 1e6 + now[2]
        local per_minute, wrote = tonumber(ARGV[1]), false
        for i = 1, (#KEYS - 1) / 2 do
            local budget, turn, tokens = KEYS[2 * i - 1], ARGV[2 * i], tonumber(ARGV[2 * i + 1])
            redis.call('ZREM', KEYS[2 * i], turn)  -- (first: at maxmemory, a script's first write may not take memory)
            if per_minute > 0 and tokens ~= 0 and not again then  -- more than was taken as it was admitted, or fewer
                wrote = true
                local bucket = redis.call('HMGET', budget, 'q', 't')
                local full_at = math.max(math.max(tonumber(bucket[2]) or 0, now) + tokens * 60e6 / per_minute, now)
                redis.call('HSET', budget, 't', string.format('%.0f', full_at))
                local ttl = math.ceil((math.max(tonumber(bucket[1]) or 0, full_at) - now) / 1000) + 1000
                redis.call('PEXPIRE', budget, ttl)
            end
        end
        if wrote then redis.call('SET', KEYS[#KEYS], '', 'PX', 60000) end
        return 0"""
    RENEW = """
        local now = redis.call('TIME')
        local lease_end = string.format('%.0f', now[1] * 1e6 + now[2] + ARGV[1] * 1000)
        for i, key in ipairs(KEYS) do
            redis.call('ZADD', key, 'XX', lease_end, ARGV[i + 1])
            redis.call('PEXPIRE', key, ARGV[1])
        end
        return 0"""

    def __init__(self, gate: Gate, client: Any) -> None:
        super().__init__(gate)
        self.scripts = {name: client.register_script(getattr(self, name)) for name in ("TAKE", "GIVE", "RENEW")}
        self.lease = int(STREAM_LEASE * 1000)  # milliseconds
        self.asking: list[tuple[str, Turn, int, asyncio.Future[float]]] = []  # questions for the next TAKE
        self.given: list[tuple[str, Turn, int]] = []  # answers over, for the next GIVE
        # by user, done when the GIVE of its answers over (queued; on its way) is: a question waits for it, so that
        # one asked here as soon as an answer ends is counted after it (a GIVE goes off the question's path)
        self.queued: dict[str, asyncio.Future[None]] = {}
        self.sending: dict[str, asyncio.Future[None]] = {}
        self.tasks: dict[str, asyncio.Task[None] | None] = dict.fromkeys(("take", "give", "renew"))
        self.healthy = True  # the last TAKE worked (one WARNING line an outage)
        self.calls = itertools.count(1)  # numbers each TAKE and GIVE (see call_key)

    @staticmethod
    def keys(who: str) -> list[str]:
        return [f"chat:budget:{who}", f"chat:streams:{who}"]

    def call_key(self) -> str:
        """A key of this call's own, its last. subtle: redis-py sends a call again when its connection fails, which it
        may do after the script ran (its reply lost, or late past socket_timeout): the key says it counted."""
        return f"chat:call:{PROCESS}:{next(self.calls)}"

    def run(self, name: str, work: Callable[[], Any]) -> None:
        """`work` in a task of its own, unless one runs already (it then finds what was added meanwhile)."""
        if (task := self.tasks[name]) is None or task.done():
            self.tasks[name] = asyncio.create_task(work())

    async def take(self, who: str, turn: Turn, reserve: int) -> float:
        if (given := self.queued.get(who) or self.sending.get(who)) is not None:
            await asyncio.wait([given], timeout=5)  # (a GIVE slower than that, Redis failing, is not waited for)
        self.asking.append((who, turn, reserve, taken := asyncio.get_running_loop().create_future()))
        self.run("take", self.take_all)
        if not (wait := await taken) and USER_MAX_STREAMS:
            self.run("renew", self.renew)
        return wait

    async def take_all(self) -> None:
        while self.asking:
            batch, self.asking = self.asking, []
            keys = [key for who, *_ in batch for key in self.keys(who)] + [self.call_key()]
            limits = [USER_REQUESTS_PER_MINUTE or 0, USER_TOKENS_PER_MINUTE or 0, USER_MAX_STREAMS or 0, self.lease]
            asked = [arg for _, turn, reserve, _ in batch for arg in (turn.id, reserve)]
            try:
                waits = await self.scripts["TAKE"](keys, [*limits, *asked])
            except Exception as exc:  # Redis failed: "unavailable"; anything else is a bug, raised for each question
                if isinstance(exc, redis.exceptions.RedisError):
                    if self.healthy:
                        log.warning("Redis fails (REDIS_URL): %s; questions get unavailable until it answers", exc)
                    self.healthy, exc = False, StoreUnavailable(f"Redis: {exc}")
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            if not self.healthy:
                log.info("Redis answers again: budgets are counted")
            self.healthy = True
            for (*_, future), wait in zip(batch, waits, strict=True):
                if not future.done():  # (its connection closed meanwhile: its place ends with its lease)
                    future.set_result(wait / 1e6)

    def give(self, who: str, turn: Turn, tokens: int) -> None:
        if USER_MAX_STREAMS or (USER_TOKENS_PER_MINUTE and tokens):
            self.given.append((who, turn, tokens))
            if who not in self.queued:
                self.queued[who] = asyncio.get_running_loop().create_future()
            self.run("give", self.give_all)

    async def give_all(self) -> None:
        try:
            while self.given:
                batch, self.given = self.given, []
                self.sending, self.queued = self.queued, {}
                keys = [key for who, _, _ in batch for key in self.keys(who)] + [self.call_key()]
                args = [arg for _, turn, tokens in batch for arg in (turn.id, tokens)]
                await self.quietly(self.scripts["GIVE"](keys, [USER_TOKENS_PER_MINUTE or 0, *args]))
                self.let_wait(self.sending)
        finally:  # (cancelled: no question waits for what is not given)
            self.let_wait(self.sending)
            self.let_wait(self.queued)

    @staticmethod
    def let_wait(given: dict[str, asyncio.Future[None]]) -> None:
        """The questions waiting for these users' GIVEs go on."""
        for future in given.values():
            if not future.done():
                future.set_result(None)
        given.clear()

    async def renew(self) -> None:
        """While answers admitted here stream, their leases, renewed every STREAM_LEASE / 3 seconds."""
        while True:
            await asyncio.sleep(STREAM_LEASE / 3)
            if not self.charged:
                return
            keys = [self.keys(who)[1] for who, _ in self.charged.values()]
            await self.quietly(self.scripts["RENEW"](keys, [self.lease, *(turn.id for turn in self.charged)]))

    async def quietly(self, call: Any) -> None:
        try:
            await call
        except redis.exceptions.RedisError as exc:  # the tokens go uncounted; a stream's place ends with its lease
            log.debug("could not write a budget to Redis: %s", exc)
        except Exception:  # a bug: it must not stop the renewals, or every later write
            log.exception("could not write a budget to Redis")


if USER_REQUESTS_PER_MINUTE or USER_TOKENS_PER_MINUTE or USER_MAX_STREAMS:
    GATE = RedisBudgets(GATE, STORE.redis) if hasattr(STORE, "redis") else Budgets(GATE)


# --- metrics and JSON logs: GET /metrics for Prometheus, named as OpenTelemetry's GenAI conventions name them; and
# LOG_FORMAT=json, every line the process writes one JSON object

import logging.config  # noqa: E402

from prometheus_client import (  # noqa: E402
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder  # noqa: E402
from starlette.responses import Response  # noqa: E402

METRICS = setting("METRICS", one_of("on", "off"), "on") == "on"  # GET /metrics for Prometheus; "off": no route
LOG_FORMAT = setting("LOG_FORMAT", one_of("text", "json"), "text")  # "json": every line one JSON object


class JSONLines(logging.Formatter):
    """LOG_FORMAT=json: a record as one line of JSON (time, level, logger, message; an answer's fields; a traceback,
    escaped into the line). ASCII only, so that no byte a client sent can break the line or its encoding."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "answer", {}),  # see Meter.answered
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


LOG_CONFIG = {  # LOG_FORMAT=json: uvicorn's LOGGING_CONFIG with JSON lines, and the root logger's (Python's warnings,
    "version": 1,  # asyncio's, botocore's) too
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": JSONLines}},
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"},
        "stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"},
    },
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
    },
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}
if LOG_FORMAT == "json":  # as the module is imported: `uvicorn chat_stream:app` set up uvicorn's text lines already
    logging.config.dictConfig(LOG_CONFIG)
    logging.captureWarnings(True)


disable_created_metrics()  # no *_created series: with WORKERS > 1 there are none, and they double the series
MULTIPROCESS = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # with WORKERS > 1 (see serve): where each worker writes
REGISTRY = CollectorRegistry()  # subtle: not prometheus-client's global one, as a worker imports this module twice
if MULTIPROCESS:
    SCRAPED = CollectorRegistry()
    multiprocess.MultiProcessCollector(SCRAPED)  # every worker's files, read at each scrape
else:
    SCRAPED = REGISTRY
    ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds
MODEL_LABEL = "gen_ai_request_model"
DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "Whole answers, from the question to the final frame, whatever their outcome.",
    [MODEL_LABEL, "outcome"],
    buckets=(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92),  # the GenAI
    registry=REGISTRY,  # conventions' boundaries, as for the next two
)
FIRST_CHUNK = Histogram(
    "gen_ai_client_time_to_first_chunk_seconds",
    "From the question to the answer's first token, for answers that streamed one.",
    [MODEL_LABEL],
    buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0),
    registry=REGISTRY,
)
TOKENS = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per answer, as the model reported them (answers with no usage from the model are not counted).",
    [MODEL_LABEL, "gen_ai_token_type"],
    buckets=tuple(4.0**k for k in range(14)),  # 1, 4, 16, ... 67108864
    registry=REGISTRY,
)
TOKEN_TYPES = {  # the usage an answer reports, and the token types the GenAI conventions name
    "input_tokens": "input",
    "output_tokens": "output",
    "cache_read_input_tokens": "cache_read",
    "cache_write_input_tokens": "cache_write",
}
ANSWERS = Counter(
    "chat_stream_answers",
    "Answers, by how each ended: end, cancelled, disconnected or an error code.",
    ["outcome"],
    registry=REGISTRY,
)
REFUSALS = Counter(
    "chat_stream_refusals",
    "Error frames that end no answer (busy, not_found, ...), by code.",
    ["code"],
    registry=REGISTRY,
)
REASONING_CHARS = Counter(
    "chat_stream_reasoning_chars",
    "Characters of the model's reasoning streamed to clients (reasoning frames), over all answers.",
    [MODEL_LABEL],
    registry=REGISTRY,
)
USER_LABELS = 100  # users a process's metrics name (by user_hash); answers of any more count as "other"
USER_TOKENS = Counter(
    "chat_stream_user_tokens",
    f"Tokens per user (with signed tokens: a short hash of sub, for the first {USER_LABELS}; then other), as the model"
    " reported them.",
    ["user", "gen_ai_token_type"],
    registry=REGISTRY,
)
UPSTREAM_RETRIES = Counter(
    "chat_stream_upstream_retries",
    "Bedrock requests botocore sent again (throttling, 5xx, connection errors).",
    registry=REGISTRY,
)
GAUGES = [  # /healthz's counts (see sample)
    (Gauge(name, what, multiprocess_mode="livesum", registry=REGISTRY), counted)
    for name, what, counted in (
        ("chat_stream_connections", "Open chat WebSockets.", "connections"),
        ("chat_stream_sessions", "Sessions held, attached or waiting for a resume.", "sessions"),
        ("chat_stream_streams", "Bedrock streams open, detached answers included.", "streams"),
        (
            "chat_stream_session_bytes",
            "What sessions hold, as stored (MAX_SESSION_MEMORY_MB is its bound).",
            "session_bytes",
        ),
    )
]
OUTCOMES = ("end", "cancelled", "disconnected", "throttled", "access_denied", "model_error", "unavailable", "timeout")
OUTCOMES += ("internal", "too_large", "session_in_use")  # (the last: another process took the session as it began)
for outcome in OUTCOMES:  # every way an answer can end, at 0 from the start, so that a rate over them is defined
    ANSWERS.labels(outcome)
for code in ("invalid_request", "too_large", "busy", "session_in_use", "not_found", "unavailable", "rate_limited"):
    REFUSALS.labels(code)


class PrometheusMeter(Meter):
    """The reference's meter, feeding Prometheus from the same calls: the log line and the metrics cannot disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.users: set[str] = set()  # the users named in USER_TOKENS, at most USER_LABELS

    def answered(
        self, session: Session, turn: Turn, outcome: str, took: float, first: float | None, usage: dict, reported: bool
    ) -> None:
        super().answered(session, turn, outcome, took, first, usage, reported)
        ANSWERS.labels(outcome).inc()
        DURATION.labels(BEDROCK_MODEL_ID, outcome).observe(took)
        if first is not None:
            FIRST_CHUNK.labels(BEDROCK_MODEL_ID).observe(first)
        for key, kind in TOKEN_TYPES.items():
            if reported and key in usage:
                TOKENS.labels(BEDROCK_MODEL_ID, kind).observe(usage[key])
        REASONING_CHARS.labels(BEDROCK_MODEL_ID).inc(reasoning_chars(turn))
        if session.user is not None and reported:
            user = user_hash(session.user)
            if user not in self.users and len(self.users) < USER_LABELS:
                self.users.add(user)
            for key in ("input_tokens", "output_tokens"):
                USER_TOKENS.labels(user if user in self.users else "other", TOKEN_TYPES[key]).inc(usage[key])

    def refused(self, code: str) -> None:
        super().refused(code)
        REFUSALS.labels(code).inc()

    def retried(self) -> None:
        super().retried()
        UPSTREAM_RETRIES.inc()


def sample() -> None:
    """The gauges, from what they count. With WORKERS > 1 each worker samples its own every second (see lifespan),
    and a scrape sums those of the workers alive."""
    now = counts()
    for gauge, counted in GAUGES:
        gauge.set(now[counted])


async def sample_every_second() -> None:
    while True:
        sample()
        await asyncio.sleep(1)


def forget_dead_workers() -> None:
    """A worker that died (killed, say: uvicorn starts another) leaves its gauges' file: they no longer count."""
    for path in Path(MULTIPROCESS).glob("gauge_live*_*.db"):  # prometheus-client's own name for them
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, MULTIPROCESS)
        except PermissionError:
            pass  # alive, another user's: not one of ours, but not dead


SNAPSHOT_SECONDS = 0.25  # /metrics answers from a snapshot at most this old: a flood of scrapes renders 4 a second
SNAPSHOTS: dict[str, tuple[float, bytes]] = {}  # by content type: when each was rendered (time.time()), and its text


async def metrics(request: Request) -> Response:
    """Prometheus's scrape: this process's metrics, or with WORKERS > 1 those of all the workers; from a snapshot at
    most SNAPSHOT_SECONDS old (rendering costs ~0.6 ms), its time in the X-Snapshot-Time header."""
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))  # OpenMetrics if Prometheus asks
    taken_at, body = SNAPSHOTS.get(content_type, (0.0, b""))
    if time.time() - taken_at >= SNAPSHOT_SECONDS:
        sample()
        if MULTIPROCESS:
            forget_dead_workers()
        taken_at, body = SNAPSHOTS[content_type] = time.time(), encoder(SCRAPED)
    return Response(body, media_type=content_type, headers={"X-Snapshot-Time": f"{taken_at:.6f}"})


def sampling(lifespan: Callable[[Starlette], Any]) -> Callable[[Starlette], Any]:
    """`lifespan`, with this worker's gauges sampled every second while it runs (WORKERS > 1)."""

    @asynccontextmanager
    async def sampled(app: Starlette) -> AsyncIterator[None]:
        async with lifespan(app):
            task = asyncio.create_task(sample_every_second())
            yield
            task.cancel()

    return sampled


if METRICS:
    METER = PrometheusMeter()
    app.router.routes.append(Route("/metrics", metrics))
    if MULTIPROCESS:
        app.router.lifespan_context = sampling(app.router.lifespan_context)


# --- the chat page: GET /, a small self-contained client of the protocol (no CDN, no build step)

import base64  # noqa: E402

from starlette.responses import HTMLResponse  # noqa: E402


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE, headers=PAGE_HEADERS)


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>chat-stream</title>
<style>
  :root { color-scheme: light dark; --accent: #1756a9; --muted: #666; font: 16px/1.5 system-ui, sans-serif; }
  body { margin: 0 auto; max-width: 46rem; height: 100dvh; display: flex; flex-direction: column; padding: 0 1rem;
    box-sizing: border-box; }
  header { display: flex; gap: 1rem; align-items: center; padding: .75rem 0; border-bottom: 1px solid #8884; }
  h1 { font-size: 1.1rem; margin: 0; flex: 1; white-space: nowrap; }
  #state { font-size: .85rem; color: var(--muted); } #state.connected { color: #1a7f37; }
  #state.refused { color: #c62828; }
  #log { flex: 1; min-height: 0; overflow-y: auto; padding: 1rem 0; }
  .msg { overflow-wrap: anywhere; margin: .5rem 0; padding: .5rem .75rem; border-radius: .5rem; }
  .user, .note, .error, .bot p, .bot li, .bot td, .bot th { white-space: pre-wrap; }
  .user { background: #1756a91a; margin-left: 15%; } .bot { background: #8881; margin-right: 15%; }
  .error { border: 1px solid #c62828; color: #c62828; } .note { color: var(--muted); font-size: .85rem; }
  .bot > :first-child { margin-top: 0; } .bot > :last-child { margin-bottom: 0; } .bot p { margin: .5em 0; }
  .bot h1, .bot h2, .bot h3, .bot h4, .bot h5, .bot h6 { font-size: 1.05em; margin: .8em 0 .3em; }
  .bot ul, .bot ol { margin: .5em 0; padding-left: 1.5em; }
  .bot pre { overflow-x: auto; padding: .5rem .75rem; background: #8882; border-radius: .3rem; }
  .bot code { font: .9em/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
  .bot :not(pre) > code { background: #8882; padding: 0 .25em; border-radius: .2em; }
  .bot blockquote { margin: .5em 0; padding-left: .75em; border-left: 3px solid #8886; color: var(--muted); }
  .bot table { border-collapse: collapse; display: block; overflow-x: auto; margin: .5em 0; }
  .bot th, .bot td { border: 1px solid #8886; padding: .2em .5em; overflow-wrap: normal; }
  @media (max-width: 600px) { .user { margin-left: 8%; } .bot { margin-right: 0; } }
  .bot a { color: var(--accent); }
  .thinking { color: var(--muted); font-size: .85rem; margin-right: 15%; padding: .25rem .75rem; }
  .thinking summary { cursor: pointer; } .thinking div { white-space: pre-wrap; max-height: 12rem; overflow-y: auto; }
  form { display: flex; gap: .5rem; padding: .75rem 0; }
  textarea { flex: 1; font: inherit; padding: .5rem; resize: vertical; min-height: 2.5rem; }
  button { font: inherit; padding: .4rem .9rem; border-radius: .4rem; border: 1px solid var(--accent); }
  #send { background: var(--accent); color: #fff; } button:disabled { opacity: .5; }
  :focus-visible { outline: 3px solid #f0a500; }
</style></head>
<body>
<header><h1>chat-stream</h1><span id="state" role="status">connecting…</span>
  <button id="new" type="button">New conversation</button></header>
<main id="log" aria-live="polite"></main>
<form id="ask"><textarea id="question" rows="2" aria-label="Your question"
  placeholder="Ask something. Enter sends, Shift+Enter adds a line." autofocus></textarea>
  <button id="send">Send</button></form>
<script>
const $ = (id) => document.getElementById(id);
const log = $("log");
const token = new URLSearchParams(location.search).get("token");
const url = new URL("ws/chat/completions", location.href);  // beside the page, wherever the app is mounted
url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
const signed = /^[\w-]+\.[\w-]+\.[\w-]+$/.test(token || "");  // a JWT goes as a subprotocol, out of URLs and logs
url.search = token && !signed ? `?token=${encodeURIComponent(token)}` : "";
const saved = sessionStorage;  // this tab's conversation: it survives a refresh, and no other tab sees it
let ws, answer = null, turnId = null, seq = 0, streaming = false, retries = 0, following = true, drawing = 0;
let asked = null;  // the question of the turn in progress
let thinking = null;  // its reasoning, if the model thinks aloud: {block, chars, answered}

// Markdown, as models write it, built as DOM nodes: text only ever goes in as text (no HTML string is parsed),
// links only to http(s) and mailto, and images become links (a markdown image is a way to leak a conversation).
function node(tag, children = [], props = {}) {
  const el = Object.assign(document.createElement(tag), props);
  for (const child of typeof children === "string" ? [children] : children) el.append(child);  // subtle: a loop, not
  // a spread: an answer of 100,000 escaped characters would overflow the call stack
  return el;
}
function safeUrl(raw) {
  if (!/^(https?:\/\/|mailto:)/i.test(raw)) return null;
  try { return new URL(raw).href; } catch { return null; }
}
function link(href, children) {
  return node("a", children, { href, target: "_blank", rel: "noopener noreferrer" });
}
const INLINE = new RegExp([
  "(?<!(?<!\\\\)`)(?<ticks>`+)(?<code>[^`]|[^`][\\s\\S]*?[^`])\\k<ticks>(?!`)",  // only where a run of ticks begins
  "(?<bang>!?)\\[(?<label>[^\\]\\n]*)\\]\\((?<href>[^\\s()]*)(?:\\s+\"[^\"\\n]*\")?\\)",
  "<(?<auto>(?:https?://|mailto:)[^\\s<>]+)>",
  "(?<se>\\*\\*\\*)(?<seText>\\S(?:[^\\n]{0,500}?\\S)??)\\*\\*\\*",
  "\\*\\*(?<sText>\\S(?:[^\\n]{0,500}?\\S)??)\\*\\*",
  "(?<!\\w)__(?<uText>\\S(?:[^\\n]{0,500}?\\S)??)__(?!\\w)",
  "\\*(?<eText>\\S(?:[^\\n]{0,500}?\\S)??)\\*",
  "(?<!\\w)_(?<fText>\\S(?:[^\\n]{0,500}?\\S)??)_(?!\\w)",
  "~~(?<dText>\\S(?:[^\\n]{0,500}?\\S)??)~~",
  "\\\\(?<esc>[!-/:-@\\[-`{-~])",
  "(?<bare>https?://[^\\s<>]*[^\\s<>.,;:!?'\")\\]*_~])",
].join("|"), "g");
function inline(text, depth = 0, inLink = false) {  // inLink: a link's label, in which no link starts
  if (depth > 8) return [text];
  const out = [];
  let at = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > at) out.push(text.slice(at, m.index));
    at = m.index + m[0].length;
    const g = m.groups, deeper = (t, label = inLink) => inline(t, depth + 1, label);
    if (inLink && (g.label !== undefined || g.auto || g.bare)) { out.push(m[0]); continue; }
    if (g.ticks) out.push(node("code", g.code.replace(/^ (.+) $/, "$1")));
    else if (g.label !== undefined) {
      const href = safeUrl(g.href);
      if (g.bang) out.push(href ? link(href, `[image: ${g.label || "untitled"}]`) : g.label);
      else if (href) out.push(link(href, deeper(g.label, true)));
      else for (const child of deeper(g.label)) out.push(child);
    } else if (g.auto) out.push(safeUrl(g.auto) ? link(safeUrl(g.auto), g.auto) : g.auto);
    else if (g.seText) out.push(node("strong", [node("em", deeper(g.seText))]));
    else if (g.sText || g.uText) out.push(node("strong", deeper(g.sText || g.uText)));
    else if (g.eText || g.fText) out.push(node("em", deeper(g.eText || g.fText)));
    else if (g.dText) out.push(node("del", deeper(g.dText)));
    else if (g.esc) out.push(g.esc);
    else if (g.bare) out.push(safeUrl(g.bare) ? link(safeUrl(g.bare), g.bare) : g.bare);
  }
  if (at < text.length) out.push(text.slice(at));
  return out;
}
// subtle: patterns that cannot backtrack far (a heading of spaces and a \r took seconds with `(.*?)...$`)
const FENCE = /^ {0,3}(`{3,}|~{3,})/, HEADING = /^ {0,3}(#{1,6})(?:[ \t]+([^]*))?$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/, QUOTE = /^ {0,3}> ?/;
const ITEM = /^( {0,12})([-*+]|\d{1,9}[.)])[ \t]+([^]*)$/, ROW = /\|/;
const divider = (line) => /^\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?$/.test(line.trim());
function heading(text) {  // without its closing #s
  const body = text.trim().replace(/#+$/, "");
  return !body || /[ \t]$/.test(body) ? body.trim() : text.trim();
}
const starts = (line) => [FENCE, HEADING, RULE, QUOTE, ITEM].some((block) => block.test(line));  // ends a paragraph
const cells = (line) => line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((cell) => cell.trim());
function blocks(lines, depth = 0) {
  const out = [];
  for (let i = 0; i < lines.length;) {
    const line = lines[i];
    let m;
    if (!line.trim()) i++;
    else if (depth > 8) { out.push(node("p", lines.slice(i).join("\n"))); break; }
    else if ((m = FENCE.exec(line))) {  // to its closing fence, or to the end while the answer streams
      const code = [], close = new RegExp(`^ {0,3}${m[1][0] === "`" ? "`" : "~"}{${m[1].length},}[ \\t]*$`);
      for (i++; i < lines.length && !close.test(lines[i]); i++) code.push(lines[i]);
      out.push(node("pre", [node("code", code.join("\n"))]));
      i++;
    } else if ((m = HEADING.exec(line))) { out.push(node(`h${m[1].length}`, inline(heading(m[2] ?? "")))); i++; }
    else if (RULE.test(line)) { out.push(node("hr")); i++; }
    else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) quoted.push(lines[i].replace(QUOTE, ""));
      out.push(node("blockquote", blocks(quoted, depth + 1)));
    } else if ((m = ITEM.exec(line))) {
      const indent = m[1].length, ordered = /\d/.test(m[2]), list = node(ordered ? "ol" : "ul");
      if (ordered && parseInt(m[2], 10) !== 1) list.start = parseInt(m[2], 10);
      const within = (next) => next.trim() !== "" && next.slice(0, indent + 2).trim() === "";  // under the item
      while (i < lines.length && (m = ITEM.exec(lines[i])) && m[1].length === indent && /\d/.test(m[2]) === ordered) {
        const item = [m[3]];
        for (i++; i < lines.length; i++) {
          const next = lines[i];
          if (within(next)) item.push(next.slice(indent + 2));
          else if (!next.trim() && i + 1 < lines.length && within(lines[i + 1])) item.push("");
          else if (next.trim() && !starts(next) && item[item.length - 1].trim()) item.push(next.trim());  // lazy line
          else break;
        }
        const content = blocks(item, depth + 1), tight = !item.includes("");  // no blank line: no paragraphs
        list.append(node("li", content.flatMap((el) => (tight && el.tagName === "P" ? [...el.childNodes] : [el]))));
      }
      out.push(list);
    } else if (ROW.test(line) && i + 1 < lines.length && divider(lines[i + 1])) {
      const head = cells(line), rows = [];
      for (i += 2; i < lines.length && ROW.test(lines[i]) && lines[i].trim(); i++) rows.push(cells(lines[i]));
      const row = (tag, values) => node("tr", values.slice(0, head.length).map((value) => node(tag, inline(value))));
      out.push(node("table", [node("thead", [row("th", head)]), node("tbody", rows.map((r) => row("td", r)))]));
    } else {
      const paragraph = [line];
      for (i++; i < lines.length && lines[i].trim() && !starts(lines[i]); i++) paragraph.push(lines[i]);
      out.push(node("p", inline(paragraph.join("\n"))));
    }
  }
  return out;
}
function markdown(el, text) {
  el.replaceChildren();
  for (const block of blocks(text.replace(/\r\n?/g, "\n").split("\n"))) el.append(block);
}

function follow() { if (following) log.scrollTop = log.scrollHeight; }  // the newest text in view, unless the
log.onscroll = () => { following = log.scrollHeight - log.scrollTop - log.clientHeight < 32; };  // user scrolled up
function show(kind, text) {  // the model's answers as markdown; everything else as plain text
  const el = document.createElement("div");
  el.className = `msg ${kind}`;
  el.source = text;
  if (kind === "bot") markdown(el, text); else el.textContent = text;
  log.append(el);
  follow();
  return el;
}
function draw() {  // an answer's markdown again, at most once a frame while it streams
  drawing = 0;
  if (answer) { markdown(answer, answer.source); follow(); }
}
function setStreaming(on) { streaming = on; $("send").textContent = on ? "Stop" : "Send"; $("new").disabled = on; }
function setState(text, cls = "") { $("state").textContent = text; $("state").className = cls; }
function forget() {
  for (const key of ["session_id", "resume_token", "notes", "answers"]) saved.removeItem(key);
  answer = turnId = null;
}
function answers() { return Number(saved.getItem("answers") || 0); }  // answers in the conversation so far
function notes() { return JSON.parse(saved.getItem("notes") || "[]"); }
function note(kind, text, keep = true, question = null) {  // kept with the number of answers before it, for a
  show(kind, text);  // refresh, and with its question when the server keeps no trace of that turn
  if (keep) saved.setItem("notes", JSON.stringify([...notes(), { at: answers(), kind, text, question }]));
}

function thought(frame) {  // the model's reasoning, as text, in a muted block above its answer
  if (!thinking) {
    const block = node("details", [node("summary"), node("div")], { className: "msg thinking", open: true });
    thinking = { block, chars: 0, answered: false };
    log.insertBefore(block, answer);
  }
  thinking.block.lastChild.append(frame.redacted ? "[redacted]" : frame.text);
  thinking.chars += frame.redacted ? 0 : [...frame.text].length;  // in characters, as reasoning_chars counts them
  summarize();
  follow();
}
function summarize(done = false) {  // collapsed once the answer starts (or the turn ends), with its length
  const answering = done || !!(answer && answer.source);
  if (answering && !thinking.answered) [thinking.answered, thinking.block.open] = [true, false];
  thinking.block.firstChild.textContent = `${answering ? "Thought" : "Thinking…"} (${thinking.chars} characters)`;
}

function resumed(frame) {  // redraw the conversation as the server holds it; carry on its pending turn
  const keep = frame.pending && frame.pending.turn_id === turnId ? answer : null;  // tokens up to `seq` are shown
  const keptThinking = keep && thinking;
  log.replaceChildren();
  const kept = notes(), held = frame.history.filter((turn) => turn.role === "assistant").length;
  const offset = Math.max(0, answers() - held);  // the oldest answers, which the server no longer holds
  saved.setItem("answers", held + offset);
  const redraw = (at) => kept.filter((n) => n.at - offset === at).forEach((n) => {
    if (n.question) show("user", n.question);
    show(n.kind, n.text);
  });
  let shown = 0;
  redraw(0);
  for (const turn of frame.history) {
    show(turn.role === "user" ? "user" : "bot", turn.text);
    if (turn.role === "assistant") redraw(++shown);
  }
  answer = null;
  asked = frame.pending && frame.pending.question;
  if (frame.pending) {
    show("user", frame.pending.question);
    if (keptThinking) log.append(keptThinking.block);
    answer = keep ? log.appendChild(keep) : show("bot", "");
    if (!keep) [turnId, seq, thinking] = [frame.pending.turn_id, 0, null];  // all of it again, thinking included
  }
  setStreaming(!!frame.pending);
  following = true;
  follow();
}

const REFUSED = {  // a handshake refused for a reason that retrying cannot fix (see refused)
  "no key": "refused: this server needs a key; open this page as /?token=<key>",
  "wrong key": "refused: the key in ?token= is not this server's",
  origin: "refused: this page's origin is not allowed (ALLOWED_ORIGINS)",
  "no token": "refused: this server needs a signed token; open this page as /?token=<jwt>",
  "invalid token": "refused: the token in ?token= is not valid (expired, or not this server's)",
};
async function refused() {  // the handshake failed: ask the server why (a refusal), or find it down (null)
  try {
    const headers = signed ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch(url.href.replace(/^ws/, "http"), { cache: "no-store", headers });
    return response.ok ? "" : (await response.json()).reason || "";
  } catch { return null; }
}
function connect() {
  setState("connecting…");
  let opened = false;
  ws = signed ? new WebSocket(url, ["bearer", token]) : new WebSocket(url);
  ws.onopen = () => {
    opened = true; retries = 0; setState("connected", "connected");
    const [session_id, resume_token] = [saved.getItem("session_id"), saved.getItem("resume_token")];
    if (session_id && resume_token)  // after a drop or a refresh: pick up where this tab left off
      ws.send(JSON.stringify({ type: "resume", session_id, resume_token, turn_id: turnId, after: seq }));
    else if (streaming) { setStreaming(false); note("note", "The connection dropped before the answer began."); }
  };
  ws.onclose = async (event) => {
    if (event.code === 4401)  // the token expired: only the app that signs them can give a new one
      return setState("signed out: the token expired; open this page with a new ?token=", "refused");
    const why = opened ? "" : await refused();
    if (why && REFUSED[why]) return setState(REFUSED[why], "refused");  // no retry: a person must act
    const wait = Math.min(500 * 2 ** retries++, 8000);
    setState(`${why ? `refused (${why})` : "disconnected"}, retrying in ${wait / 1000}s`);
    setTimeout(connect, wait);
  };
  ws.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    if (frame.type === "start") {
      saved.setItem("session_id", frame.session_id); saved.setItem("resume_token", frame.resume_token);
      [turnId, seq, thinking] = [frame.turn_id, 0, null];
      answer = show("bot", "");
    } else if (frame.type === "token" || frame.type === "reasoning") {
      if (frame.seq !== seq + 1 || !answer) return;  // never shown twice
      seq = frame.seq;
      if (frame.type === "reasoning") return thought(frame);
      answer.source += frame.text;
      if (thinking) summarize();
      drawing = drawing || requestAnimationFrame(draw);
    } else if (frame.type === "resumed") resumed(frame);
    else if (frame.type === "error" && frame.code === "not_found") {
      forget(); setStreaming(false);
      note("note", "The server no longer has this conversation; a new one starts with your next question.", false);
    } else {  // end or error
      cancelAnimationFrame(drawing); draw();
      if (thinking) summarize(true);
      const kept = frame.type === "end" && !!answer && !!answer.source;  // the server keeps the turn
      if (answer && !answer.source) answer.remove();
      else if (kept) saved.setItem("answers", answers() + 1);
      const wait = frame.retry_after ? ` Ask again in ${Math.ceil(frame.retry_after)} s.` : "";  // rate_limited
      if (frame.type === "error") note("error", `${frame.message} (${frame.code})${wait}`, true, kept ? null : asked);
      else if (frame.stop_reason === "cancelled") note("note", "Stopped.", true, kept ? null : asked);
      asked = null;
      if (frame.history_trimmed)  // the model no longer sees the start of the conversation: say so
        note("note", `The model no longer sees the ${frame.history_trimmed} oldest exchange(s) of this conversation.`);
      answer = thinking = null;
      setStreaming(false);
    }
  };
}

$("ask").onsubmit = (event) => {
  event.preventDefault();
  if (ws.readyState !== WebSocket.OPEN) return;
  if (streaming) return ws.send(JSON.stringify({ type: "cancel" }));
  const question = $("question").value;
  if (!question.trim()) return;
  following = true;
  show("user", (asked = question));
  ws.send(JSON.stringify({ question, session_id: saved.getItem("session_id") }));  // none yet: the server mints one
  $("question").value = "";
  setStreaming(true);
};
$("question").onkeydown = (event) => {
  if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
  event.preventDefault();
  if (!streaming) $("ask").requestSubmit();  // Enter never stops an answer; the Stop button does
};
$("new").onclick = () => {  // the server forgets the old conversation at once
  const session_id = saved.getItem("session_id");
  if (session_id && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "end_session", session_id }));
  forget(); log.replaceChildren(); $("question").focus();
};
connect();
</script>
</body></html>
"""


def inline_hash(tag: str) -> str:
    """The CSP source for the page's one inline <tag> element, so that no other inline code can run."""
    body = re.search(f"<{tag}>(.*?)</{tag}>", PAGE, re.DOTALL).group(1)
    return f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"


PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {inline_hash('script')}; style-src "
    f"{inline_hash('style')}; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the page's URL may hold ?token=
    "X-DNS-Prefetch-Control": "off",  # a link in an answer names a host: no lookup until it is followed
}


async def handshake_check(request: Request) -> JSONResponse:
    """GET on the chat route's path: would this page's handshake be accepted, and if not, why ("no key", "wrong key",
    "origin", or the 503's reason)? The page asks when its WebSocket fails to open, to tell a refusal a person must
    fix from a server that is down; it learns no more than the handshake's own status says."""
    if refused := await refusal(request):
        return JSONResponse({"accepted": False, "reason": refused[1]}, status_code=refused[0])
    return JSONResponse({"accepted": True})


app.router.routes.append(Route("/", page))
app.router.routes.append(Route("/ws/chat/completions", handshake_check))


# --- the server: uvicorn with its own protocols and the limits a service on a network needs, the drain on SIGTERM,
# workers, and main

import gc  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402

import uvicorn  # noqa: E402
from dotenv import load_dotenv  # noqa: E402
from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol  # noqa: E402


def port_number(raw: str) -> int:
    if not 1 <= (value := int(raw)) <= 65535:  # subtle: asyncio takes 70000, and listens on 70000 - 65536 instead
        raise ValueError(raw)
    return value


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


HOST = setting("HOST", str, "127.0.0.1")  # where `python chat_stream.py` listens
PORT = setting("PORT", port_number, 8000)
WORKERS = setting("WORKERS", positive_int, 1)  # uvicorn worker processes; sessions cross them with REDIS_URL only
SEND_TIMEOUT = setting("SEND_TIMEOUT", positive_number, 20.0)  # seconds a client may leave a frame unread
DRAIN_TIMEOUT = setting("DRAIN_TIMEOUT", positive_number, 20.0)  # seconds SIGTERM lets answers in flight finish
MAX_FRAMES_PER_SECOND = setting("MAX_FRAMES_PER_SECOND", positive_int, 20)  # per connection; over it: close 1008
MAX_FRAME_BYTES = 12 * (MAX_QUESTION_CHARS + MAX_SESSION_ID_CHARS) + 1024  # larger: closed with 1009 by uvicorn
# subtle: 12 bytes a character is the worst valid encoding, an astral character escaped as a surrogate pair
REQUEST_TIMEOUT = 5  # seconds for a whole HTTP request, from the connection or the last response
SEND_BUFFER = 64 * 1024  # bytes of a WebSocket's kernel send buffer (Linux doubles it, and no longer autotunes it to
# megabytes): what a client that reads nothing leaves in the kernel, before SEND_TIMEOUT runs
FRAME_UNIT = 32 * 1024  # bytes (characters, in a text frame sent) that cost a frame's time of the budget
load_dotenv(Path(__file__).with_name(".env"))  # as a program, the .env is its environment: AWS_* in it reach boto3
if not environment("ALLOWED_HOSTS").strip() and not is_address(HOST):
    ALLOWED_HOSTS.append(HOST.lower())  # the default: localhost, and HOST when it is a name (read at each request)


class HideToken(logging.Filter):
    """uvicorn logs each path with its query string: mask every `token=` value, right or wrong, however encoded."""

    pattern = re.compile(r"([?&]token=)[^&#\s\"]*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.pattern.sub(r"\1***", record.msg)
        if isinstance(record.args, tuple):  # subtle: keep the tuple's shape, uvicorn's access formatter unpacks it
            record.args = tuple(self.pattern.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


for name in ("uvicorn.error", "uvicorn.access"):
    logging.getLogger(name).addFilter(HideToken())


def tuned(lifespan: Callable[[Starlette], Any]) -> Callable[[Starlette], Any]:
    """`lifespan`, with the garbage collector tuned once the app has started. subtle: LangChain allocates several
    objects per token. Freezing the ~200k objects of the imported libraries keeps full collections from scanning
    them all, and a larger young generation collects ~70x less often; at 200 streams that saved ~15% of CPU per
    token and halved the p99 gap between tokens."""

    @asynccontextmanager
    async def tuned_lifespan(app: Starlette) -> AsyncIterator[None]:
        async with lifespan(app):
            gc.freeze()
            gc.set_threshold(50_000, 20, 20)
            if CHAT_API_KEY is None and HOST not in ("127.0.0.1", "localhost", "::1"):
                log.warning("listening on %s without CHAT_API_KEY: anyone who reaches this port uses the model", HOST)
            if isinstance(MODEL, BedrockChat) and (missing := await no_credentials()):
                log.warning(
                    "%s: give them (AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a role), or run "
                    "with BEDROCK_MODEL_ID=offline; every question gets access_denied meanwhile",
                    missing,
                )
            if WORKERS > 1:  # each worker starts on the socket its supervisor listens on
                log.info(ready_line())
            yield

    return tuned_lifespan


app.router.lifespan_context = tuned(app.router.lifespan_context)


class HTTPProtocol(H11Protocol):
    """h11, not httptools: h11 stops reading while a response is pending, so pipelined requests cannot pile up.
    Each request must arrive whole within REQUEST_TIMEOUT seconds of the connection or of the last response;
    subtle: uvicorn's keep-alive timer restarts on every byte, so a client sending one now and then kept it open."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.request_deadline = self.loop.call_later(REQUEST_TIMEOUT, transport.close)

    def handle_events(self) -> None:
        scope = self.scope
        super().handle_events()
        if self.scope is not scope:  # a whole request arrived (a WebSocket upgrade included)
            self.request_deadline.cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.request_deadline.cancel()
        self.request_deadline = self.loop.call_later(REQUEST_TIMEOUT, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.request_deadline.cancel()
        super().connection_lost(exc)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol with a budget of MAX_FRAMES_PER_SECOND frames (pings included; over it: close
    1008), where a large frame, the client's or one sent to it (a resume of a long conversation), costs a frame's
    time for each FRAME_UNIT it holds: the client's next frame waits; a SEND_TIMEOUT for clients that stop reading,
    with a small kernel send buffer so that it runs; and one log line, not a traceback, for invalid UTF-8."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.allowance, self.checked_at = 2.0 * MAX_FRAMES_PER_SECOND, self.loop.time()  # a burst of two seconds' worth
        self.owed_until = 0.0  # (loop time) until when the frames we sent for the client cost its budget
        self.sent = 0  # frames sent to it
        self.partial: asyncio.TimerHandle | None = None  # runs out if a message's frames do not complete in time
        self.stalled: asyncio.TimerHandle | None = None  # runs out if the write buffer stays full
        self.gone = asyncio.Event()  # set when the connection is lost
        if (sock := transport.get_extra_info("socket")) is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.stalled, self.partial):
            if timer:
                timer.cancel()
        self.gone.set()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        now, rate = self.loop.time(), MAX_FRAMES_PER_SECOND  # a token bucket, refilled at `rate` frames a second
        self.allowance = min(2.0 * rate, self.allowance + (now - self.checked_at) * rate) - len(self.conn.events)
        self.owe(sum(len(getattr(event, "data", b"")) for event in self.conn.events) // FRAME_UNIT)
        self.checked_at = now
        if self.allowance < 0 and self.handshake_complete and not self.close_sent:
            log.warning("closing a WebSocket that sent over MAX_FRAMES_PER_SECOND=%d frames", MAX_FRAMES_PER_SECOND)
            self.conn.events_received()  # dropped unread
            self.fail(1008, "too many frames")
            return
        super().handle_events()
        if self.frames and self.partial is None:  # a message begun in fragments must end within SEND_TIMEOUT
            self.partial = self.loop.call_later(SEND_TIMEOUT, self.too_slow)
        elif not self.frames and self.partial is not None:
            self.partial.cancel()
            self.partial = None

    def too_slow(self) -> None:
        if not self.close_sent:
            log.warning("closing a WebSocket whose message did not end within SEND_TIMEOUT=%gs", SEND_TIMEOUT)
            self.fail(1008, "message too slow")

    def owe(self, units: int) -> None:
        """Work done for the client: its next frames wait a frame's time for each unit (see send, handle_events)."""
        if units:
            self.owed_until = max(self.owed_until, self.loop.time()) + units / MAX_FRAMES_PER_SECOND

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.send":  # a unit for each FRAME_UNIT (characters, of text) and each 64 frames:
            self.sent += 1  # streaming never reaches that rate (1,280 frames a second); a replay of thousands does
            self.owe(len(message.get("text") or message.get("bytes") or "") // FRAME_UNIT + (self.sent % 64 == 0))
        elif message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True  # subtle: answered with a denial response (400, 503): uvicorn 0.54 would
            # log "ASGI callable returned without completing handshake" as an ERROR after each one

    async def receive(self) -> Any:
        """The app's next message, once the large frames before it have been paid for (uvicorn reads at most one more
        of the client's frames meanwhile), or at once when the client is gone: its connection and sessions are let go
        then, not seconds after a large frame (subtle: unless it sent that one more frame: uvicorn stops reading then,
        and sees the client leave only when the wait is over)."""
        if (owed := self.owed_until - self.loop.time()) > 0:
            try:
                await asyncio.wait_for(self.gone.wait(), owed)
            except TimeoutError:
                pass
        return await super().receive()

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not is_utf8(self.frames):
            log.info("closing a WebSocket that sent a text frame that is not UTF-8")
            self.frames = []
            self.fail(1007, "invalid UTF-8")
            return
        super().send_receive_event_to_app()

    def fail(self, code: int, reason: str) -> None:
        """Close with `code`, like uvicorn on a protocol error, but give the close frame a second to arrive: subtle:
        closing a socket with unread input resets it, and the reset can destroy the frame in flight. Reading stops
        at once (draining a flood would cost a core), so the client's own close is not awaited."""
        self.conn.fail(code, reason)
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.write_eof()
        self.close_sent, self.read_paused = True, False  # uvicorn must not resume reading when the app reads on
        self.transport.pause_reading()
        self.close_timer = self.loop.call_later(1.0, self.transport.close)

    def pause_writing(self) -> None:  # the client is not reading: wait for it, but not for ever
        super().pause_writing()
        self.stalled = self.loop.call_later(SEND_TIMEOUT, self.stall_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.stalled:
            self.stalled.cancel()

    def stall_timeout(self) -> None:
        log.warning("closing a WebSocket that read nothing for SEND_TIMEOUT=%gs", SEND_TIMEOUT)
        self.transport.abort()  # uvicorn then wakes the send that waits, which fails: the answer ends "disconnected"


def is_utf8(frames: list[bytes]) -> bool:
    try:
        b"".join(frames).decode()
        return True
    except UnicodeDecodeError:
        return False


async def drain() -> None:
    """SIGTERM's first step, while the listeners still answer: idle connections are closed with 1012 at once,
    answers in flight run to their end (then 1012), and whatever still streams after DRAIN_TIMEOUT is cut. With
    a shared store, answers read here for a connection elsewhere (or none yet) are in flight too: their clients
    resume on another process."""
    DRAINING.set()
    if not STORE.shared:
        for session in list(DETACHED.values()):
            drop(session)  # no one can resume it now: its answer stops
    log.info("draining: %d answers in flight, for up to DRAIN_TIMEOUT=%gs", len(STREAMS), DRAIN_TIMEOUT)

    async def finish(ws: WebSocket, sending: asyncio.Task[None] | None) -> None:
        if sending is not None:
            await asyncio.wait([sending], timeout=DRAIN_TIMEOUT)  # all start now: one deadline for all
            sending.cancel()  # a no-op when its answer was delivered
        await ws.close(1012)  # service restart: reconnect

    finishing = [finish(ws, task) for ws, task in list(CONNECTIONS.items())]
    if STORE.shared and STREAMS:  # answers read for no connection here: their clients may resume elsewhere
        finishing.append(asyncio.wait([turn.task for turn in STREAMS], timeout=DRAIN_TIMEOUT))
    await asyncio.gather(*finishing, return_exceptions=True)
    for turn in list(STREAMS):  # cut what is left: answers past the deadline, or whose client left during the drain
        halt(turn, "disconnected")
        turn.task.cancel()  # even one stopped already, whose own cancel is still on its way
    await asyncio.gather(*(turn.task for turn in STREAMS), return_exceptions=True)


async def no_credentials() -> str | None:
    """Why the model will find no AWS credentials, if it will not (botocore's chain: the environment, AWS_PROFILE or the
    shared files, SSO, the container's or the instance's role)."""
    try:
        found = await AioSession(profile=AWS_PROFILE).get_credentials()
    except BotoCoreError as exc:
        return f"no AWS credentials for {BEDROCK_MODEL_ID}: {exc}"
    return None if found else f"no AWS credentials found for {BEDROCK_MODEL_ID}"


def ready_line() -> str:
    return f"chat-stream ready on http://{HOST}:{PORT}/ (model={BEDROCK_MODEL_ID}, sessions {STORE.where})"


class Server(uvicorn.Server):
    """uvicorn's server, saying it is ready once it listens, and draining before its own shutdown (which fails every
    WebSocket with 1012 at once)."""

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info(ready_line())

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        await drain()
        await super().shutdown(sockets)


def serve() -> None:
    """`python chat_stream.py`: uvicorn with the protocols above and the limits from the settings."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = MAX_CONNECTIONS + MAX_CONCURRENT_STREAMS + 64  # client sockets, Bedrock sockets, the rest
    needed += STORE.sockets  # a shared store's connections
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    if hard < needed:
        print(early_line(f"open-file limit {hard} < {needed} needed at MAX_CONNECTIONS", "WARNING"), file=sys.stderr)
    if WORKERS > 1 and not STORE.shared:
        warning = f"WORKERS={WORKERS} without REDIS_URL: a resume finds its session only on the worker that holds it"
        print(early_line(f"{warning} (set REDIS_URL, or make connections sticky)", "WARNING"), file=sys.stderr)
    try:  # subtle: uvicorn would start the app, say its startup is complete, and only then fail to listen
        with socket.create_server((HOST, PORT), family=socket.AF_INET6 if ":" in HOST else socket.AF_INET) as probe:
            probe.close()
    except OSError as exc:
        sys.exit(
            early_line(f"cannot listen on {HOST}:{PORT} (HOST, PORT): {os.strerror(exc.errno) if exc.errno else exc}")
        )
    options = {
        "host": HOST,
        "port": PORT,
        "ws_max_size": MAX_FRAME_BYTES,
        "ws_per_message_deflate": False,  # token frames are tiny: compressing them costs CPU and saves nothing
        "timeout_graceful_shutdown": 5,  # after the drain: whatever is left gets close code 1012
    }
    if logging.getLogger("uvicorn").handlers:  # the process's logging is set up already (LOG_FORMAT=json): kept
        options["log_config"] = None
    if WORKERS > 1:  # workers import the app by name, and run uvicorn's own Server: no drain; subtle: the
        # supervisor kills a worker that has not answered its ping within timeout_worker_healthcheck, and a new one
        # answers only once it has imported the libraries (~3 s of CPU): at uvicorn's 5 s, on a slow or shared CPU,
        # every worker was killed while starting and replaced, forever
        ws, http = "chat_stream:WebSocketProtocol", "chat_stream:HTTPProtocol"
        with tempfile.TemporaryDirectory(prefix="chat-stream-metrics-") as metrics_dir:  # removed when all have exited
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # where prometheus-client's multiprocess mode keeps
            # each worker's metrics, summed by a scrape
            uvicorn.run("chat_stream:app", http=http, ws=ws, workers=WORKERS, timeout_worker_healthcheck=30, **options)
        return
    server = Server(uvicorn.Config(app, http=HTTPProtocol, ws=WebSocketProtocol, **options))  # subtle: these
    server.run()  # objects, not names, so that the module is not imported a second time
    if not server.started:
        sys.exit(3)  # as uvicorn.run does when start-up fails


if __name__ == "__main__":
    serve()

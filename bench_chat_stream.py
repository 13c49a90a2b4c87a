"""Benchmark: many concurrent WebSocket streams through chat_stream.py, against the local Bedrock stand-in.

Run: .venv/bin/python bench_chat_stream.py            (a few minutes on two cores)
     .venv/bin/python bench_chat_stream.py -n 1 100 --rounds 2 --no-baseline

The stand-in answers every question after 300 ms with 50 text deltas 20 ms apart, so the ideal answer takes
1.28 s at any concurrency. For each N, N clients connect, then ask at the same moment; the benchmark reports
streams answered exactly, time to first token and answer time (p50/p99), the p99 gap between tokens, and the
server's CPU time per streamed token (user + system, all its processes). The same load runs against a
baseline: a minimal native-async server (aiobotocore straight to the socket, no LangChain), the floor that
chat_stream.py is measured against. Then 200 clients that lost their connection after 10 tokens resume at the same
moment: the time from the resume frame to the first replayed token (p50/p99), every stream checked exact.
The same again with sessions on Redis (REDIS_URL, one local redis-server, whose CPU counts too): "redis" is one
chat_stream process; "redis x2" is two, each client asking one of them and resuming on the other. And the same
load against "plain": a server written the way langchain-aws's documentation leads to (ChatBedrockConverse.astream
forwarded to the socket, the library's defaults). What the metrics cost: chat_stream with them and with METRICS=off,
both running, their rounds at N=200 taken in turn. What a hostile client costs the others: 20 victims' token gaps
while 8 clients scrape /metrics in a loop, or 12 resume a long conversation in a loop. A round that needs more
than ROUND_LIMIT seconds is stopped.
Writes a table to stdout, and docs/bench.json and docs/bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import websockets

from bedrock_stand_in import FakeBedrock, RedisServer, Reply, echo, free_port, healthy, server_env, think, wait_for

HERE = Path(__file__).parent
FIRST_DELAY, DELTAS, GAP = 0.3, 50, 0.02
THOUGHTS = 200  # the reasoning profile: this many reasoning deltas, then DELTAS text deltas
IDEAL = FIRST_DELAY + (DELTAS - 1) * GAP
SEEN = 10  # tokens a resuming client had read before its connection dropped
ROUND_LIMIT = 60.0  # seconds a round may take; a server that needs longer is stopped there, and shown so


# --- the Bedrock stand-in, in a process of its own so that it does not share the clients' event loop


def serve_bedrock(pipe: Any, thinking: bool = False) -> None:
    """The stand-in; with `thinking`, every answer is THOUGHTS reasoning deltas, then DELTAS text deltas."""
    thoughts = [think(f" t{k}") for k in range(THOUGHTS)] + [f" a{k}" for k in range(DELTAS)]
    bedrock = FakeBedrock(default=Reply(tokens=thoughts if thinking else None, first_delay=FIRST_DELAY, delay=GAP))
    pipe.send(bedrock.url)
    pipe.recv()  # until the benchmark is done


# --- the two other servers, each a few lines in the same minimal WebSocket app: same protocol, no memory, no checks


def minimal_app(texts: Callable[[str], AsyncIterator[str]], lifespan: Any = None) -> Any:
    """A WebSocket server that streams `texts(question)` as token frames, between start and end."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    async def chat(ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                request = json.loads(await ws.receive_text())
                session_id = request.get("session_id") or "new"
                await ws.send_text(json.dumps({"type": "start", "session_id": session_id}))
                parts: list[str] = []
                async for text in texts(request["question"]):
                    parts.append(text)
                    await ws.send_text(json.dumps({"type": "token", "text": text}))
                end = {"type": "end", "session_id": session_id, "full_text": "".join(parts), "stop_reason": "end_turn"}
                await ws.send_text(json.dumps(end))
        except WebSocketDisconnect:
            pass

    async def healthz(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    routes = [Route("/healthz", healthz), WebSocketRoute("/ws/chat/completions", chat)]
    return Starlette(routes=routes, lifespan=lifespan)


def baseline_app() -> Any:
    """The floor: native async Bedrock calls (aiobotocore) written straight to the socket, no LangChain."""
    from contextlib import asynccontextmanager

    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession

    clients: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        config = AioConfig(max_pool_connections=1024)
        endpoint = os.environ["BEDROCK_ENDPOINT_URL"]
        client = AioSession().create_client("bedrock-runtime", "us-east-1", endpoint_url=endpoint, config=config)
        async with client as c:
            clients["bedrock"] = c
            yield

    async def texts(question: str) -> AsyncIterator[str]:
        response = await clients["bedrock"].converse_stream(
            modelId="amazon.nova-micro-v1:0", messages=[{"role": "user", "content": [{"text": question}]}]
        )
        async for event in response["stream"]:
            if text := event.get("contentBlockDelta", {}).get("delta", {}).get("text"):
                yield text

    return minimal_app(texts, lifespan)


def plain_app() -> Any:
    """The plain langchain-aws way, as its documentation leads to: one ChatBedrockConverse for the process, its
    `astream` forwarded to the socket, the library's defaults (its async stream runs each chunk's blocking read in
    the event loop's default thread pool)."""
    from langchain_aws import ChatBedrockConverse

    endpoint = os.environ["BEDROCK_ENDPOINT_URL"]
    model = ChatBedrockConverse(model="amazon.nova-micro-v1:0", region_name="us-east-1", endpoint_url=endpoint)

    async def texts(question: str) -> AsyncIterator[str]:
        async for chunk in model.astream(question):
            if text := chunk.text:
                yield text

    return minimal_app(texts)


# --- servers, CPU accounting


def start_server(kind: str, bedrock_url: str, **settings: Any) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = server_env(PORT=port, BEDROCK_ENDPOINT_URL=bedrock_url, **settings)
    if kind not in ("baseline", "plain"):  # chat_stream, however set
        command = [sys.executable, "chat_stream.py"]  # as users start it
    else:
        app, flags = f"bench_chat_stream:{kind}_app", ["--ws-per-message-deflate", "false", "--log-level", "warning"]
        command = [sys.executable, "-m", "uvicorn", "--factory", app, "--port", str(port), *flags]
    process = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: process.poll() is not None or healthy(f"http://127.0.0.1:{port}"), 60, f"{kind} to start")
    assert process.poll() is None, f"{kind} did not start"
    return process, port


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of processes and all their descendants, from /proc."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, list(pids)
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / os.sysconf("SC_CLK_TCK")
        todo += children.get(p, [])
    return total


# --- the load


async def one_client(
    url: str, i: int, go: asyncio.Event, ready: asyncio.Queue, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    question = " ".join(f"c{i}w{j}" for j in range(DELTAS - 1))  # echoed as exactly DELTAS tokens
    connecting = websockets.connect(url, compression=None, max_size=None, open_timeout=60, additional_headers=headers)
    async with connecting as ws:
        ready.put_nowait(i)
        await go.wait()
        sent = time.perf_counter()
        await ws.send(json.dumps({"question": question}))  # a new session each time
        tokens, thoughts, times = [], [], []
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            now = time.perf_counter()
            if frame["type"] in ("token", "reasoning"):
                (tokens if frame["type"] == "token" else thoughts).append(frame["text"])
                times.append(now)
            elif frame["type"] in ("end", "error"):
                break
    exact = frame["type"] == "end" and "".join(tokens) == frame["full_text"]
    if thoughts:  # the reasoning profile: every thought, then the text, counted in seq
        exact = exact and len(thoughts) == THOUGHTS and frame["reasoning_chars"] == len("".join(thoughts))
    else:
        exact = exact and frame["full_text"] == echo(question)
    return {
        "exact": exact,
        "busy": frame.get("code") == "busy",
        "error": frame.get("code"),
        "ttft": times[0] - sent if times else None,
        "total": now - sent,
        "gaps": [b - a for a, b in zip(times, times[1:], strict=False)],
        "tokens": len(tokens) + len(thoughts),
        "cut": False,
    }


async def one_round(
    urls: list[str], n: int, pids: list[int], headers: Callable[[int], dict[str, str]] | None = None
) -> tuple[list[dict[str, Any]], float]:
    """N clients (client i with `headers(i)`, if given) connect, then ask at once; their results, and the CPU spent."""
    go, ready = asyncio.Event(), asyncio.Queue()
    clients = [
        asyncio.create_task(one_client(urls[i % len(urls)], i, go, ready, headers and headers(i))) for i in range(n)
    ]
    for _ in range(n):
        await ready.get()
    cpu = cpu_seconds(pids)
    go.set()
    done, cut = await asyncio.wait(clients, timeout=ROUND_LIMIT)
    spent = cpu_seconds(pids) - cpu
    for client in cut:
        client.cancel()
    await asyncio.gather(*cut, return_exceptions=True)
    unfinished = {"exact": False, "busy": False, "error": None, "ttft": None, "gaps": [], "tokens": 0, "cut": True}
    return [client.result() for client in done] + [unfinished] * len(cut), spent


async def one_resume(urls: list[str], i: int, go: asyncio.Event, ready: asyncio.Queue) -> dict[str, Any]:
    """Ask, read the start and SEEN tokens, drop the connection; then, on a new one (to the next server, if there
    are two), resume when told to."""
    question = " ".join(f"r{i}w{j}" for j in range(DELTAS - 1))
    async with websockets.connect(urls[i % len(urls)], compression=None, open_timeout=60) as ws:
        await ws.send(json.dumps({"question": question}))
        start = json.loads(await asyncio.wait_for(ws.recv(), 60))
        seen = [json.loads(await asyncio.wait_for(ws.recv(), 60))["text"] for _ in range(SEEN)]
    async with websockets.connect(urls[(i + 1) % len(urls)], compression=None, open_timeout=60) as ws:
        ready.put_nowait(i)
        await go.wait()
        sent = time.perf_counter()
        resume = {"type": "resume", "session_id": start["session_id"], "resume_token": start["resume_token"]}
        await ws.send(json.dumps({**resume, "turn_id": start["turn_id"], "after": SEEN}))
        frames, first_token = [], None
        while not frames or frames[-1]["type"] not in ("end", "error"):
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            if len(frames) == 2:
                first_token = time.perf_counter() - sent
    tokens = [f for f in frames if f["type"] == "token"]
    in_order = [f["seq"] for f in tokens] == list(range(SEEN + 1, DELTAS + 1))
    exact = in_order and frames[-1].get("full_text") == "".join(seen + [f["text"] for f in tokens]) == echo(question)
    return {"exact": exact, "first_token": first_token}


async def resume_round(urls: list[str], n: int) -> list[dict[str, Any]]:
    go, ready = asyncio.Event(), asyncio.Queue()
    clients = [asyncio.create_task(one_resume(urls, i, go, ready)) for i in range(n)]
    for _ in range(n):
        await ready.get()
    go.set()
    return await asyncio.gather(*clients)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def row_of(kind: str, n: int, results: list[dict[str, Any]], cpu: float) -> dict[str, Any]:
    """One row of the table: N clients at once, over one or more rounds."""
    answered = [r for r in results if not r["busy"] and not r["cut"]]
    tokens, cut = sum(r["tokens"] for r in results), sum(r["cut"] for r in results)
    row = {
        "server": kind,
        "n": n,
        "streams": len(results),
        "exact": sum(r["exact"] for r in results),
        "busy": sum(r["busy"] for r in results),
        "errors": sorted({r["error"] for r in results if r["error"] and not r["busy"]}),
        "busy_p99_s": percentile([r["total"] for r in results if r["busy"]], 99),
        "ttft_p50_s": percentile([r["ttft"] for r in answered if r["ttft"] is not None], 50),
        "ttft_p99_s": percentile([r["ttft"] for r in answered if r["ttft"] is not None], 99),
        "answer_p50_s": percentile([r["total"] for r in answered], 50),
        "answer_p99_s": percentile([r["total"] for r in answered], 99),
        "gap_p99_ms": 1000 * (percentile([g for r in answered for g in r["gaps"]], 99) or 0),
        "cpu_per_token_us": 1e6 * cpu / tokens if tokens else None,
        "cut": cut,  # streams unfinished when the round was stopped at ROUND_LIMIT
    }
    if cut:  # the slowest answers are the ones cut: the percentiles of the others would flatter it
        row |= {"answer_p50_s": None, "answer_p99_s": None, "stopped_after_s": ROUND_LIMIT}
    return row


def in_turn(
    servers: dict[str, tuple[subprocess.Popen, int]],
    n: int,
    rounds: int,
    also: tuple[int, ...] = (),
    headers: Any = None,
) -> list[dict[str, Any]]:
    """A row for each of these servers, running at once, their rounds taken in turn (one, the other, one, ...) so
    that the machine's drift falls on all alike; `also`: more processes whose CPU counts (a redis-server they
    share); `headers`: for each kind, each client's handshake headers (or None)."""
    urls = {kind: [f"ws://127.0.0.1:{port}/ws/chat/completions"] for kind, (_, port) in servers.items()}
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in servers}
    cpu = dict.fromkeys(servers, 0.0)
    for kind, (process, _) in servers.items():
        asyncio.run(one_round(urls[kind], 10, [process.pid], (headers or {}).get(kind)))  # warm up
    for _ in range(rounds):
        for kind, (process, _) in servers.items():
            r, c = asyncio.run(one_round(urls[kind], n, [process.pid, *also], (headers or {}).get(kind)))
            results[kind] += r
            cpu[kind] += c
    rows = [row_of(kind, n, results[kind], cpu[kind]) for kind in servers]
    for row in rows:
        print(format_row(row), flush=True)
    return rows


def metrics_cost(bedrock_url: str, n: int, rounds: int) -> list[dict[str, Any]]:
    """chat_stream with its metrics and with METRICS=off, in turn; then what one scrape of /metrics costs."""
    servers = {kind: start_server(kind, bedrock_url, METRICS=m) for kind, m in METRICS_KINDS.items()}
    try:
        rows = in_turn(servers, n, rounds)
        process, port = servers["metrics on"]
        before = cpu_seconds([process.pid])
        for _ in range(100):
            scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
        scrape_ms = 1000 * (cpu_seconds([process.pid]) - before) / 100
        rows[0] |= {"scrape_cpu_ms": scrape_ms, "scrape_bytes": len(scraped)}
        print(f"one scrape of /metrics: {len(scraped)} bytes, {scrape_ms:.1f} ms of server CPU", flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()
    return rows


METRICS_KINDS = {"metrics on": "on", "metrics off": "off"}  # chat_stream, with METRICS set so


def budgets_cost(bedrock_url: str, n: int, rounds: int) -> list[dict[str, Any]]:
    """chat_stream on one redis-server with signed tokens and every budget on (limits no client reaches: each client
    is a user of its own), with signed tokens alone, and without either, in turn; the redis-server's CPU counts for
    each."""
    store = RedisServer()
    limits = {"USER_REQUESTS_PER_MINUTE": 1000, "USER_TOKENS_PER_MINUTE": 10**7, "USER_MAX_STREAMS": 100}
    kinds = {
        "budgets on": {"JWT_SECRET": BENCH_SECRET, **limits},
        "tokens only": {"JWT_SECRET": BENCH_SECRET},
        "budgets off": {},
    }
    servers = {kind: start_server(kind, bedrock_url, REDIS_URL=store.url, **s) for kind, s in kinds.items()}
    tokens = [jwt.encode({"sub": f"user{i}", "exp": int(time.time()) + 3600}, BENCH_SECRET) for i in range(n)]
    headers = {k: (lambda i: {"Authorization": f"Bearer {tokens[i % n]}"}) for k in ("budgets on", "tokens only")}
    try:
        return in_turn(servers, n, rounds, (store.process.pid,), headers)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()
        store.close()


BENCH_SECRET = "the-benchmark-s-secret-of-32-bytes"


# --- what a hostile client costs the others: a victim's token gaps while 8 clients scrape /metrics in a loop, or 12
# resume a long conversation in a loop (each within MAX_FRAMES_PER_SECOND)


def scrape_flood(port: int, seconds: float) -> None:
    """One scraper, in a process of its own: GET /metrics over one kept-alive connection, as fast as answered."""
    import http.client

    connection, deadline = http.client.HTTPConnection("127.0.0.1", port), time.monotonic() + seconds
    while time.monotonic() < deadline:
        connection.request("GET", "/metrics")
        connection.getresponse().read()


async def resume_flood(url: str, start: dict[str, Any], seconds: float) -> int:
    """One client resuming the session `start` opened, 19 times a second, reading every reply; returns the replies."""
    frame = json.dumps({"type": "resume", "session_id": start["session_id"], "resume_token": start["resume_token"]})
    replies, deadline = 0, time.monotonic() + seconds
    async with websockets.connect(url, compression=None, max_size=None) as ws:

        async def read() -> None:
            nonlocal replies
            async for _ in ws:
                replies += 1

        reader = asyncio.create_task(read())
        while time.monotonic() < deadline:
            await ws.send(frame)
            await asyncio.sleep(1 / 19)
        reader.cancel()
    return replies


async def long_conversation(url: str) -> dict[str, Any]:
    """A session of 8 turns of 30,000 four-byte characters each way: its resumed frame is ~1.9 MB."""
    starts = []
    async with websockets.connect(url, compression=None, max_size=None) as ws:
        for i in range(8):
            await ws.send(json.dumps({"question": chr(0x1F300 + i) * 30_000, "session_id": "long"}))
            starts.append(json.loads(await ws.recv()))
            while json.loads(await ws.recv())["type"] not in ("end", "error"):
                pass
    return starts[0]


def abuse_cost(bedrock_url: str, n: int, rounds: int) -> list[dict[str, Any]]:
    """Rows of `n` victims' answers (and the server's CPU per token) quiet, under a scrape flood, under a resume
    flood."""
    process, port = start_server("chat_stream", bedrock_url, SESSION_TTL=60)
    url = f"ws://127.0.0.1:{port}/ws/chat/completions"
    rows = []
    try:
        asyncio.run(one_round([url], 10, [process.pid]))  # warm up
        start = asyncio.run(long_conversation(url))
        for kind in ("quiet", "8 scrapers", "12 resumers"):
            results, cpu, extra = [], 0.0, ""
            for _ in range(rounds):
                if kind == "8 scrapers":
                    spawn = multiprocessing.get_context("spawn")
                    flood = [spawn.Process(target=scrape_flood, args=(port, 2.5)) for _ in range(8)]
                    for p in flood:
                        p.start()
                    time.sleep(0.5)  # scraping at full speed
                    r, c = asyncio.run(one_round([url], n, [process.pid]))
                    for p in flood:
                        p.join()
                elif kind == "12 resumers":

                    async def both() -> tuple[Any, list[int]]:
                        floods = [asyncio.create_task(resume_flood(url, start, 2.5)) for _ in range(12)]
                        await asyncio.sleep(0.5)
                        return await one_round([url], n, [process.pid]), await asyncio.gather(*floods)

                    (r, c), replies = asyncio.run(both())
                    extra = f"; {sum(replies) / 2.5:.0f} resumed frames a second answered"
                else:
                    r, c = asyncio.run(one_round([url], n, [process.pid]))
                results += r
                cpu += c
            rows.append(row_of(f"abuse: {kind}", n, results, cpu))
            print(format_row(rows[-1]) + extra, flush=True)
    finally:
        process.terminate()
        process.wait()
    return rows


def measure(
    kind: str, bedrock_url: str, ns: list[int], rounds: int, resumes: int = 0, servers: int = 1
) -> list[dict[str, Any]]:
    """Rows for one kind of server: chat_stream, baseline, plain, or chat_stream on Redis ("redis", "redis x2":
    with `servers` processes sharing one redis-server). A round that takes ROUND_LIMIT is stopped there: its row
    says how many streams were cut, the rest of its rounds are skipped, and each larger N runs one round."""
    store = RedisServer() if kind.startswith("redis") else None
    settings = {"REDIS_URL": store.url} if store else {}
    started = [start_server(kind, bedrock_url, **settings) for _ in range(servers)]
    urls = [f"ws://127.0.0.1:{port}/ws/chat/completions" for _, port in started]
    pids = [process.pid for process, _ in started] + ([store.process.pid] if store else [])
    rows = []
    try:
        asyncio.run(one_round(urls, 10, pids))  # warm up: imports, pools, caches
        stopped = False
        for n in ns:
            results, cpu = [], 0.0
            for _ in range(1 if stopped else rounds if n > 1 else rounds * 5):
                r, c = asyncio.run(one_round(urls, n, pids))
                results += r
                cpu += c
                if any(x["cut"] for x in r):
                    stopped = True
                    break
            rows.append(row_of(kind, n, results, cpu))
            print(format_row(rows[-1]), flush=True)
        if resumes:  # clients that lost their connection mid-answer, all resuming at the same moment
            results = [r for _ in range(rounds) for r in asyncio.run(resume_round(urls, resumes))]
            waits = [r["first_token"] for r in results if r["first_token"] is not None]
            row = {
                "server": kind,
                "resuming": resumes,
                "streams": len(results),
                "exact": sum(r["exact"] for r in results),
            }
            row |= {"resume_p50_ms": 1000 * percentile(waits, 50), "resume_p99_ms": 1000 * percentile(waits, 99)}
            rows.append(row)
            print(
                f"{kind}: {resumes} clients resuming at once: {row['exact']}/{row['streams']} exact; resume frame to "
                f"first replayed token p50 {row['resume_p50_ms']:.0f} ms, p99 {row['resume_p99_ms']:.0f} ms",
                flush=True,
            )
    finally:
        for process, _ in started:
            process.terminate()
            process.wait()
        if store:
            store.close()
    return rows


# --- report


HEADER = (
    f"{'server':<12} {'N':>4} {'exact':>9} {'busy':>5} {'ttft p50':>9} {'ttft p99':>9} "
    f"{'answer p50':>11} {'answer p99':>11} {'gap p99':>8} {'CPU/token':>10} {'busy p99':>9}"
)


def format_row(row: dict[str, Any]) -> str:
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}s"

    cpu = "-" if row["cpu_per_token_us"] is None else f"{row['cpu_per_token_us']:.0f}us"
    exact = f"{row['exact']}/{row['streams'] - row['busy']}"
    p50, p99 = (f">{ROUND_LIMIT:.0f}s", "stopped") if row["cut"] else (s(row["answer_p50_s"]), s(row["answer_p99_s"]))
    cut = f"  ({row['cut']} streams unfinished at {ROUND_LIMIT:.0f} s: stopped)" if row["cut"] else ""
    return (
        f"{row['server']:<12} {row['n']:>4} {exact:>9} {row['busy']:>5} {s(row['ttft_p50_s']):>9} "
        f"{s(row['ttft_p99_s']):>9} {p50:>11} {p99:>11} "
        f"{row['gap_p99_ms']:>6.0f}ms {cpu:>10} {s(row['busy_p99_s']):>9}{cut}"
    )


KINDS = {  # each kind of server in the chart: its label and colour
    "chat_stream": ("chat_stream", "tab:blue"),
    "redis": ("chat_stream, sessions on Redis", "tab:orange"),
    "redis x2": ("chat_stream on Redis, two processes", "tab:red"),
    "baseline": ("native-async baseline", "tab:gray"),
    "plain": ("plain langchain-aws (astream)", "tab:purple"),
}


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels: p99 answer time against N (log scale; a stopped row is an x at ROUND_LIMIT), CPU per token (N = 1
    is off the chart: the idle event loop spread over few tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, (times, cpu) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=120)
    for kind, (label, color) in KINDS.items():
        mine = [r for r in rows if r["server"] == kind and "n" in r]
        if not mine:
            continue
        done = [r for r in mine if not r["cut"]]
        times.plot([r["n"] for r in done], [r["answer_p99_s"] for r in done], "o-", color=color, label=label)
        for r in mine:
            if r["cut"]:
                times.plot(r["n"], ROUND_LIMIT, "x", color=color, markersize=10, markeredgewidth=2)
                times.annotate(
                    f"stopped at {ROUND_LIMIT:.0f} s",
                    (r["n"], ROUND_LIMIT),
                    xytext=(-80, -18),
                    textcoords="offset points",
                    fontsize=8,
                    color=color,
                )
            elif r["busy"]:
                times.annotate(
                    f"{r['busy'] // (r['streams'] // r['n'])} of {r['n']} told busy",
                    (r["n"], r["answer_p99_s"]),
                    xytext=(-110, -24),
                    textcoords="offset points",
                    fontsize=8,
                    color=color,
                )
        many = [r for r in mine if r["n"] > 1]
        cpu.plot([r["n"] for r in many], [r["cpu_per_token_us"] for r in many], "o-", color=color, label=label)
    times.axhline(IDEAL, color="tab:green", linestyle=":", label=f"ideal ({IDEAL:.2f} s)")
    times.set(xlabel="concurrent streams (N)", ylabel="p99 answer time (s, log scale)", yscale="log")
    times.set_title("p99 answer time vs concurrency (2 cores)")
    times.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    times.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    cpu.set(xlabel="concurrent streams (N)", ylabel="CPU per token (µs)", ylim=(0, None))
    cpu.set_title("Server CPU per streamed token (Redis's included)")
    for ax in (times, cpu):
        ax.grid(alpha=0.3, which="both")
    times.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, nargs="+", default=[1, 50, 100, 200, 400], help="concurrencies")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per N (N=1 runs five times as many)")
    parser.add_argument("--resuming", type=int, default=200, help="clients resuming at once (0: skip)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the native-async baseline server")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain langchain-aws server")
    parser.add_argument("--redis", type=int, nargs="*", default=[1, 50, 100, 200], help="concurrencies on Redis")
    parser.add_argument("--redis-x2", type=int, nargs="*", default=[200, 400], help="the same, on two processes")
    parser.add_argument("--metrics-cost", type=int, default=200, help="N for metrics on vs METRICS=off (0: skip)")
    parser.add_argument("--abuse", type=int, default=20, help="victims under a scrape and a resume flood (0: skip)")
    parser.add_argument("--reasoning", type=int, default=200, help="N for the reasoning profile's row (0: skip)")
    parser.add_argument("--budgets-cost", type=int, default=200, help="N for tokens and budgets on vs off (0: skip)")
    parser.add_argument("--out", type=Path, default=HERE / "docs", help="folder for bench.json and bench.png")
    args = parser.parse_args()

    parent, child = multiprocessing.get_context("spawn").Pipe()
    bedrock = multiprocessing.get_context("spawn").Process(target=serve_bedrock, args=(child,), daemon=True)
    bedrock.start()
    bedrock_url = parent.recv()
    print(HEADER)
    rows = measure("chat_stream", bedrock_url, args.n, args.rounds, args.resuming)
    if args.redis:
        rows += measure("redis", bedrock_url, args.redis, args.rounds, args.resuming)
    if args.redis_x2:
        rows += measure("redis x2", bedrock_url, args.redis_x2, args.rounds, args.resuming, servers=2)
    if args.metrics_cost:
        rows += metrics_cost(bedrock_url, args.metrics_cost, args.rounds + 2)
    if args.abuse:
        rows += abuse_cost(bedrock_url, args.abuse, args.rounds)
    if args.budgets_cost:
        rows += budgets_cost(bedrock_url, args.budgets_cost, args.rounds + 2)
    if args.reasoning:  # answers that think first: another stand-in, whose every answer does
        parent2, child2 = multiprocessing.get_context("spawn").Pipe()
        thinker = multiprocessing.get_context("spawn").Process(target=serve_bedrock, args=(child2, True), daemon=True)
        thinker.start()
        rows += measure("reasoning", parent2.recv(), [args.reasoning], args.rounds)
        parent2.send("done")
        thinker.join(5)
    if not args.no_baseline:
        rows += measure("baseline", bedrock_url, args.n, args.rounds)
    if not args.no_plain:
        rows += measure("plain", bedrock_url, args.n, args.rounds)
    parent.send("done")
    bedrock.join(5)

    args.out.mkdir(exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps({"ideal_s": IDEAL, "rows": rows}, indent=1) + "\n")
    chart(rows, args.out / "bench.png")
    base = {r["n"]: r for r in rows if r["server"] == "baseline"}
    for kind in ("chat_stream", "redis", "redis x2", "plain"):
        mine = {r["n"]: r for r in rows if r["server"] == kind and "n" in r}
        for n in sorted(mine.keys() & base.keys()):
            if mine[n]["cut"]:
                print(f"{kind} N={n}: stopped at {ROUND_LIMIT:.0f} s ({mine[n]['cut']} streams unfinished)")
                continue
            p99 = mine[n]["answer_p99_s"] / base[n]["answer_p99_s"]
            cpu = mine[n]["cpu_per_token_us"] / base[n]["cpu_per_token_us"]
            print(f"{kind} N={n}: answer p99 {p99:.2f}x baseline, CPU per token {cpu:.2f}x baseline")
    on, off = ({r["n"]: r for r in rows if r["server"] == k} for k in METRICS_KINDS)
    for n in sorted(on.keys() & off.keys()):
        cpu = on[n]["cpu_per_token_us"] / off[n]["cpu_per_token_us"] - 1
        p99 = on[n]["answer_p99_s"] / off[n]["answer_p99_s"] - 1
        print(f"N={n}: metrics cost {cpu:+.1%} CPU per token, {p99:+.1%} answer p99 (on vs METRICS=off, in turn)")
    on, off = ({r["n"]: r for r in rows if r["server"] == k} for k in ("budgets on", "budgets off"))
    for n in sorted(on.keys() & off.keys()):
        cpu = on[n]["cpu_per_token_us"] / off[n]["cpu_per_token_us"]
        p99 = on[n]["answer_p99_s"] / off[n]["answer_p99_s"]
        print(f"N={n}: signed tokens and budgets on (Redis): {p99:.3f}x answer p99, {cpu:.3f}x CPU per token")
    mine, plain = ({r["n"]: r for r in rows if r["server"] == k and "n" in r} for k in ("chat_stream", "plain"))
    for n in sorted(n for n in mine.keys() & plain.keys() if not plain[n]["cut"]):
        p99 = plain[n]["answer_p99_s"] / mine[n]["answer_p99_s"]
        print(f"N={n}: the plain langchain-aws server's p99 answer time is {p99:.1f}x chat_stream's")
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")


if __name__ == "__main__":
    main()

"""An LLM judge as a labeler: each (prompt, output) goes to a model behind any OpenAI-compatible
chat-completions API (OpenAI, vLLM, Ollama, ...) with a rubric, and the reply's `Final Score: X` (1-10)
becomes the reward.

Why it is built this way:
- A small async HTTP/1.1 client on the standard library (asyncio streams), so that the timeouts, the
  retries and what gets logged are ours. A call is retried with exponential backoff and jitter on 429, 5xx,
  timeouts and dropped connections, honouring `Retry-After`; after the last try the sample gets
  `reward: null` and a `label_error`, is counted, and is left out of feedback - never scored 0.
- Concurrency is bounded by a semaphore, so a batch fans out without flooding the server.
- Every answer received is appended to a cache in the run directory, keyed by the model and the exact
  messages, so a resumed or repeated run does not pay twice. API failures are not cached.
- The API key is read from the environment variable the config names, sent only as a Bearer header, and
  never stored in records, cache, manifest or error messages.
- Parsing is strict: a reply without a clear score in 1-10 is a parse failure, not a guess.
- The judge can start before labeling does (`JudgePrefetch`): each prompt's samples are judged while the
  sampler makes the next ones, and the label stage then finds the answers in the cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import hashlib
import json
import os
import random
import re
import ssl
import threading
from pathlib import Path
from urllib.parse import urlsplit

from ..config import JudgeConfig
from . import Score

SCALE = (1.0, 10.0)


# ---------------------------------------------------------------------------------------------- parsing

_FINAL_SCORE = re.compile(r"final\s+score\s*\**\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE_SCORE = re.compile(r"(?:score\s*[:=]\s*)?(-?\d+(?:\.\d+)?)(?:\s*/\s*10)?\.?", re.IGNORECASE)
_FINAL_VERDICT = re.compile(r"(?i:final\s+verdict)\s*\**\s*[:=]\s*\**\s*\[*\s*([AB])\b")
_BARE_VERDICT = re.compile(r"\[*\s*([AB])\s*\]*\.?")


def _last_line(text: str) -> str:
    lines = [line.strip().strip("*`").strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def parse_score(text: str | None) -> tuple[float | None, str | None]:
    """(score, None) or (None, why). The last `Final Score: X` counts; failing that, one strict fallback:
    the reply's last line is nothing but the score (`7`, `7/10`, `Score: 7`). A score off the 1-10 scale is
    a failure too: a guessed number would be noise in the rewards."""
    text = text or ""
    found = _FINAL_SCORE.findall(text)
    if found:
        value = found[-1]
    elif m := _BARE_SCORE.fullmatch(_last_line(text)):
        value = m.group(1)
    else:
        return None, "no 'Final Score: X' in the judge's reply"
    score = float(value)
    if not SCALE[0] <= score <= SCALE[1]:
        return None, f"judge score {value} is outside {SCALE[0]:g}-{SCALE[1]:g}"
    return score, None


def parse_verdict(text: str | None) -> tuple[str | None, str | None]:
    """('A' | 'B', None) or (None, why): the last `Final Verdict: A|B`, else a last line that is just A or B."""
    text = text or ""
    found = _FINAL_VERDICT.findall(text)
    if found:
        return found[-1], None
    if m := _BARE_VERDICT.fullmatch(_last_line(text)):
        return m.group(1), None
    return None, "no 'Final Verdict: A|B' in the judge's reply"


def render_prompt(prompt) -> str:
    """A prompt as the judge reads it: one user turn as its text, a conversation as `role: text` blocks."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{turn['role']}: {turn['content']}" for turn in prompt)


def fill(template: str, **values: str) -> str:
    """`{name}` placeholders replaced in one pass, not with str.format: rubrics, prompts and outputs may hold
    braces of their own, and an output that contains `{prompt}` must stay as written."""
    pattern = re.compile("|".join(re.escape("{" + k + "}") for k in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], template)


def cache_key(model: str, system: str, user: str, temperature: float, max_tokens: int | None = None) -> str:
    """The cache key: everything that decides the judge's answer (the user message holds prompt and output).
    An answer-length cap joins the key only when set, so caches written before it existed stay valid."""
    parts = [model, system, user, temperature] + ([max_tokens] if max_tokens is not None else [])
    text = json.dumps(parts, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------- http

class _Transient(Exception):
    """A failure worth another try: 429, 5xx, a timeout, a dropped connection, a garbled response."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class JudgeError(RuntimeError):
    """A failure no retry can fix (a refused key, an unknown model or URL): labeling stops with it."""


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0].strip(), 16)  # EOF here: ValueError
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readline()


async def post_json(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """POST one request on a fresh connection (HTTP/1.1, `Connection: close`); (status, headers, body).
    No timeout here: the caller bounds the whole exchange."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=ssl.create_default_context() if https else None)
    try:
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"POST {target} HTTP/1.1", f"Host: {host}", "Connection: close", "Accept: application/json",
                 "User-Agent: alignloop-judge", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("connection closed before a response")
        fields = status_line.decode("latin-1").split(maxsplit=2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
            raise ValueError(f"not an HTTP status line: {status_line[:80]!r}")
        response_headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            response_headers[name.strip().lower()] = value.strip()
        if "chunked" in response_headers.get("transfer-encoding", "").lower():
            data = await _read_chunked(reader)
        elif "content-length" in response_headers:
            data = await reader.readexactly(int(response_headers["content-length"]))
        else:
            data = await reader.read()
        return int(fields[1]), response_headers, data
    finally:
        writer.close()


def _retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (the HTTP-date form is ignored: backoff applies), capped at a minute."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return min(max(seconds, 0.0), 60.0)


def _run(coro):
    """asyncio.run, also when called from a thread that already runs an event loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# ------------------------------------------------------------------------------------------------ cache

class JudgeCache:
    """Judge answers by key, one JSON line each ({"key", "model", "raw"}), append-only. A line is written as
    soon as its answer arrives, so a run killed mid-batch keeps what it paid for; a torn last line is skipped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.answers: dict[str, str] = {}
        self._torn = False
        self._lock = threading.Lock()  # a prefetch (`JudgePrefetch`) writes from a thread of its own
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8", errors="replace")
            self._torn = bool(text) and not text.endswith("\n")
            for line in text.split("\n"):  # not splitlines(): a reply may hold U+2028
                try:
                    entry = json.loads(line)
                    self.answers[entry["key"]] = entry["raw"]
                except (ValueError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> str | None:
        return self.answers.get(key)

    def put(self, key: str, model: str, raw: str) -> None:
        with self._lock:
            self.answers[key] = raw
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(("\n" if self._torn else "") + json.dumps({"key": key, "model": model, "raw": raw}, ensure_ascii=False) + "\n")
            self._torn = False


# ---------------------------------------------------------------------------------------------- labeler

class JudgeLabeler:
    """Scores (prompt record, output) pairs with an LLM judge; see the module docstring.

    `stats` counts what happened since the last `reset_stats()`: parsed, parse_failures, api_failures (per
    judge call), ties (pairwise), cached (answers not requested: from the cache or shared with an identical
    call in flight), requests (HTTP attempts, retries included), tokens_in, tokens_out (from `usage`, paid
    calls only) and cost (USD, when prices are given)."""

    def __init__(self, config: JudgeConfig, cache_path: str | Path | None = None, backoff: float = 1.0):
        self._api_key = None
        if config.api_key_env:
            self._api_key = os.environ.get(config.api_key_env)
            if not self._api_key:
                raise ValueError(f"labeler.api_key_env: the environment variable {config.api_key_env} is not set "
                                 "(the judge's API key is read from it)")
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.model = config.model
        self.system_prompt, self.user_template = config.system_prompt, config.user_template  # the defaults filled in
        self.temperature = config.temperature
        self.max_tokens = config.max_tokens
        self.max_concurrency = config.max_concurrency
        self.timeout = config.timeout
        self.max_retries = config.max_retries
        self.backoff = backoff  # seconds before the first retry; doubled each time, with jitter
        self.prices = None
        if config.price_in_per_million is not None or config.price_out_per_million is not None:
            self.prices = (config.price_in_per_million or 0.0, config.price_out_per_million or 0.0)
        self.pairwise = config.pairwise
        self.cache = JudgeCache(cache_path) if cache_path else None
        self.name = f"judge:{config.model}" + (":pairwise" if config.pairwise else "")
        self.reset_stats()

    def __repr__(self) -> str:  # never the key
        return f"JudgeLabeler(url={self.url!r}, model={self.model!r}, pairwise={self.pairwise})"

    def reset_stats(self) -> None:
        self.stats = {"parsed": 0, "parse_failures": 0, "api_failures": 0, "ties": 0, "cached": 0, "requests": 0,
                      "tokens_in": 0, "tokens_out": 0}
        if self.prices:
            self.stats["cost"] = 0.0

    # -- the labeler protocol

    def score(self, items: list[tuple[dict, str]]) -> list[Score]:
        """Scores in input order; the whole batch is judged concurrently."""
        if self.pairwise:
            return _run(self._session([self._score_pairwise(items)]))[0]
        return _run(self._session([self._score_one(record, output) for record, output in items]))

    async def _session(self, coros: list) -> list:
        """The coroutines' results, run with a fresh semaphore and in-flight table (both belong to one loop)."""
        self._semaphore = asyncio.Semaphore(self.max_concurrency)
        self._inflight: dict[str, asyncio.Task] = {}
        return list(await asyncio.gather(*coros))

    async def _score_one(self, record: dict, output: str) -> Score:
        user = fill(self.user_template, prompt=render_prompt(record["prompt"]), output=output)
        answer = await self._ask(self.system_prompt, user)
        judge = {"model": self.model, "raw": answer.get("raw"), "score": None}
        if "error" in answer:
            self.stats["api_failures"] += 1
            judge["error"] = answer["error"]
            return Score(None, f"judge API failure: {answer['error']}", extra={"judge": judge})
        score, error = parse_score(answer["raw"])
        if error:
            self.stats["parse_failures"] += 1
            judge["error"] = error
            return Score(None, f"judge parse failure: {error}", extra={"judge": judge})
        self.stats["parsed"] += 1
        judge["score"] = score
        return Score(score, extra={"judge": judge})

    # -- pairwise

    async def _verdict(self, prompt: str, output_a: str, output_b: str) -> dict:
        answer = await self._ask(self.system_prompt, fill(self.user_template, prompt=prompt, output_a=output_a, output_b=output_b))
        if "error" in answer:
            self.stats["api_failures"] += 1
            return {"raw": None, "error": f"judge API failure: {answer['error']}"}
        verdict, error = parse_verdict(answer["raw"])
        if error:
            self.stats["parse_failures"] += 1
            return {"raw": answer["raw"], "error": f"judge parse failure: {error}"}
        self.stats["parsed"] += 1
        return {"raw": answer["raw"], "verdict": verdict}

    async def _compare(self, record: dict, output_a: str, output_b: str) -> dict:
        """Asked in both orders: the winner when the two agree, a tie when they do not (the judge then
        preferred a position, not a response)."""
        prompt = render_prompt(record["prompt"])
        first, second = await asyncio.gather(self._verdict(prompt, output_a, output_b), self._verdict(prompt, output_b, output_a))
        result = {"winner": None, "tie": False, "raw": [first["raw"], second["raw"]]}
        if "error" in first or "error" in second:
            result["error"] = first.get("error") or second["error"]
        elif first["verdict"] == {"A": "B", "B": "A"}[second["verdict"]]:
            result["winner"] = first["verdict"]
        else:
            result["tie"] = True
            self.stats["ties"] += 1
        return result

    async def _score_pairwise(self, items: list[tuple[dict, str]]) -> list[Score]:
        """Each prompt's samples (grouped by prompt_id within the batch) judged pair by pair; the reward is
        the win rate, a tie counting half. A sample none of whose comparisons succeeded gets no reward."""
        groups: dict = {}
        for i, (record, _) in enumerate(items):
            groups.setdefault(record.get("prompt_id"), []).append(i)
        pairs = [(i, j) for members in groups.values() for k, i in enumerate(members) for j in members[k + 1:]]
        results = await asyncio.gather(*(self._compare(items[i][0], items[i][1], items[j][1]) for i, j in pairs))
        points, compared = [0.0] * len(items), [0] * len(items)
        log: list[list[dict]] = [[] for _ in items]
        for (i, j), res in zip(pairs, results):
            if "error" in res:
                outcome = {i: "error", j: "error"}
            else:
                win_i = 0.5 if res["tie"] else float(res["winner"] == "A")
                points[i] += win_i
                points[j] += 1.0 - win_i
                compared[i] += 1
                compared[j] += 1
                outcome = {i: {1.0: "win", 0.5: "tie", 0.0: "loss"}[win_i], j: {1.0: "loss", 0.5: "tie", 0.0: "win"}[win_i]}
            for me, other in ((i, j), (j, i)):
                entry = {"against": items[other][0].get("sample_id", other), "result": outcome[me], "raw": res["raw"]}
                if "error" in res:
                    entry["error"] = res["error"]
                log[me].append(entry)
        scores = []
        for k in range(len(items)):
            reward = points[k] / compared[k] if compared[k] else None
            judge = {"model": self.model, "mode": "pairwise", "score": reward, "comparisons": log[k]}
            if reward is not None:
                scores.append(Score(reward, extra={"judge": judge}))
            else:
                error = "no pairwise comparison succeeded" if log[k] else "pairwise judging needs another sample of the same prompt in the batch"
                judge["error"] = error
                scores.append(Score(None, error, extra={"judge": judge}))
        return scores

    # -- one judge call: cache, de-duplication, retries

    async def _ask(self, system: str, user: str) -> dict:
        """{"raw": reply} or {"error": why}: from the cache, from an identical call already in flight, or
        from the API."""
        key = cache_key(self.model, system, user, self.temperature, self.max_tokens)
        if self.cache is not None and (raw := self.cache.get(key)) is not None:
            self.stats["cached"] += 1
            return {"raw": raw}
        if key in self._inflight:
            self.stats["cached"] += 1
            return await self._inflight[key]
        task = self._inflight[key] = asyncio.ensure_future(self._request(system, user))
        answer = await task
        if "raw" in answer and self.cache is not None:
            self.cache.put(key, self.model, answer["raw"])
        return answer

    async def _request(self, system: str, user: str) -> dict:
        request = {"model": self.model, "temperature": self.temperature,
                   "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        if self.max_tokens is not None:
            request["max_tokens"] = self.max_tokens
        body = json.dumps(request).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            async with self._semaphore:
                self.stats["requests"] += 1
                try:
                    status, response_headers, data = await asyncio.wait_for(post_json(self.url, body, headers), self.timeout)
                    return self._answer(status, response_headers, data)
                except _Transient as e:
                    error, wait = str(e), e.retry_after
                except asyncio.TimeoutError:
                    error, wait = f"no answer within {self.timeout:g} s", None
                except ssl.SSLCertVerificationError as e:
                    raise JudgeError(f"judge {self.url}: TLS certificate not trusted ({e.verify_message})") from None
                except (OSError, EOFError, ValueError) as e:  # refused, reset, closed early, garbled
                    error, wait = f"connection error ({type(e).__name__}: {self._redact(str(e))})", None
            if attempt + 1 < attempts:
                await asyncio.sleep(wait if wait is not None else min(60.0, self.backoff * 2**attempt) * random.uniform(0.5, 1.0))
        return {"error": f"{error} (gave up after {attempts} attempts)"}

    def _answer(self, status: int, headers: dict[str, str], data: bytes) -> dict:
        """A response as {"raw"} or {"error"}; raises _Transient for what another try may fix and JudgeError
        for what no try will."""
        snippet = self._redact(data[:200].decode("utf-8", errors="replace").strip())
        if status == 200:
            try:
                reply = json.loads(data)
                content = reply["choices"][0]["message"].get("content")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                raise _Transient(f"HTTP 200 without a chat completion ({snippet!r})") from None
            usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
            tokens_in, tokens_out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            self.stats["tokens_in"] += tokens_in
            self.stats["tokens_out"] += tokens_out
            if self.prices:
                self.stats["cost"] += (tokens_in * self.prices[0] + tokens_out * self.prices[1]) / 1e6
            return {"raw": content if isinstance(content, str) else ""}
        if status in (408, 409, 429) or status >= 500:
            raise _Transient(f"HTTP {status}", _retry_after(headers.get("retry-after")))
        if status in (401, 403):
            raise JudgeError(f"judge {self.url}: HTTP {status}, the API key was refused ({snippet})")
        if status == 404:
            raise JudgeError(f"judge {self.url}: HTTP 404, check base_url and model '{self.model}' ({snippet})")
        return {"error": f"HTTP {status} ({snippet})"}

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


class JudgePrefetch:
    """Judge calls started while sampling runs: `add` takes one prompt's sample records as soon as they exist
    and judges them in the background (pairwise: against each other, as labeling would), so that the answers
    are in the judge's cache when the label stage asks. Leaving the `with` block waits for the calls in flight
    (or, on an error, cancels them); a resumed run finds what was answered in the cache.

    Nothing here can fail sampling: a judge call that fails is left for the label stage, which asks again and
    reports it as it always does; an error no retry can fix (a refused key) stops the prefetch, not the run.

    The calls run in a thread of their own, with their own event loop, on a copy of the labeler: it shares the
    labeler's cache but has its own stats, semaphore and in-flight table (those belong to one event loop)."""

    def __init__(self, judge: JudgeLabeler):
        self.judge = copy.copy(judge)
        self.judge.reset_stats()  # a dict of its own
        self.judge._semaphore = asyncio.Semaphore(judge.max_concurrency)
        self.judge._inflight = {}
        self.items = 0
        self.error: str | None = None
        self._calls: list[concurrent.futures.Future] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="judge-prefetch", daemon=True)
        self._thread.start()

    def __enter__(self) -> JudgePrefetch:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(wait=exc_type is None)

    def add(self, records: list[dict]) -> None:
        """Start judging one prompt's sample records."""
        self.items += len(records)
        self._calls.append(asyncio.run_coroutine_threadsafe(self._judge([(r, r["output"]) for r in records]), self._loop))

    async def _judge(self, items: list[tuple[dict, str]]) -> None:
        if self.error is not None:
            return
        try:
            if self.judge.pairwise:
                await self.judge._score_pairwise(items)
            else:
                await asyncio.gather(*(self.judge._score_one(record, output) for record, output in items))
        except Exception as e:  # a JudgeError; the label stage meets it again and stops the run with it
            self.error = f"{type(e).__name__}: {e}"

    def close(self, wait: bool = True) -> None:
        """Wait for the calls in flight (`wait`), or cancel them; then stop the thread."""
        if wait:
            concurrent.futures.wait(self._calls)
        asyncio.run_coroutine_threadsafe(self._cancel_the_rest(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @staticmethod
    async def _cancel_the_rest() -> None:
        """Cancel what still runs (everything, when not waiting; after an error, the failed prompt's other
        calls) and let it finish, so that the loop closes with no task pending."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def summary(self) -> dict:
        """What the prefetch did: samples given to it, HTTP requests made, judge calls that failed."""
        info = {"items": self.items, "requests": self.judge.stats["requests"], "api_failures": self.judge.stats["api_failures"]}
        return {**info, "error": self.error} if self.error else info


def judge_pairs(judge: JudgeLabeler, pairs: list[tuple[dict, str, str]]) -> list[dict]:
    """Which of two outputs for the same prompt is better, for pairwise feedback: for each (prompt record,
    output A, output B), {"winner": "A" | "B" | None, "tie": bool, "raw": [reply, reply swapped], "error"?}.
    Each pair is asked in both orders and a disagreement is a tie, so position bias cannot pick a winner.
    A pairwise feedback record then takes `label = winner == "A"`; ties and errors make no pair."""
    if not judge.pairwise:
        raise ValueError("judge_pairs needs a judge built with pairwise=True (its rubric asks for a verdict)")
    return _run(judge._session([judge._compare(record, a, b) for record, a, b in pairs]))

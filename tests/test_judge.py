"""The LLM judge labeler against a real OpenAI-compatible HTTP server on 127.0.0.1.

The server (`FakeJudge`) speaks `POST /v1/chat/completions` and decides what to do from markers in the
user message (so from the output being judged): `score=N` is the score it gives; `FAULT:429once`,
`FAULT:500once` and `FAULT:droponce` fail the first request for that message only; `FAULT:500always` and
`FAULT:hang` (no answer within the client's timeout) fail every time; `FAULT:garbage` answers without a
score, `FAULT:range` with `Final Score: 11`, `FAULT:400` with a non-retryable 400. Every 200 answer reports
usage of 100 prompt and 10 completion tokens, so the token and cost accounting is exact. `delay` makes every
answer slow, `status` makes every request fail with that HTTP status.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignloop.config import ConfigError, JudgeConfig, dump_config, load_config
from alignloop.loop import Run, label_stage, sample_stage
from alignloop.records import read_samples, write_records
from alignloop.rewards import make_labeler
from alignloop.rewards.judge import JudgeError, JudgeLabeler, judge_pairs, parse_score, parse_verdict
from alignloop.sampling import Sampler
from alignloop.stages.label import label_records
from conftest import tiny_run_overrides

KEY = "sk-test-SECRET-0123456789"


class FakeJudge:
    def __init__(self):
        self.requests: list[dict] = []  # {"time", "auth", "user", "path"}
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.vary = False  # unmarked outputs: score 5, or (vary) a score from a hash of the message
        self.delay = 0.0  # seconds before each answer
        self.status: int | None = None  # every request answered with this status
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                with judge.lock:
                    judge.requests.append({"time": time.monotonic(), "auth": self.headers.get("Authorization"),
                                           "user": user, "path": self.path, "model": body["model"],
                                           "max_tokens": body.get("max_tokens")})
                    judge.seen[user] = n = judge.seen.get(user, 0) + 1
                if self.path != "/v1/chat/completions":
                    return self.send_json(404, {"error": "no such route"})
                if judge.status is not None:
                    return self.send_json(judge.status, {"error": "down"})
                time.sleep(judge.delay)
                if "FAULT:hang" in user:
                    judge.stop.wait(1.0)  # past the client's 0.5 s timeout; then close without an answer
                    return
                if "FAULT:droponce" in user and n == 1:
                    return  # close the connection without a response
                if "FAULT:429once" in user and n == 1:
                    return self.send_json(429, {"error": "slow down"}, {"Retry-After": "0.2"})
                if "FAULT:500once" in user and n == 1 or "FAULT:500always" in user:
                    return self.send_json(500, {"error": "boom"})
                if "FAULT:400" in user:
                    return self.send_json(400, {"error": "context too long"})
                self.send_json(200, {"choices": [{"message": {"role": "assistant", "content": judge.reply(user)}}],
                                     "usage": {"prompt_tokens": 100, "completion_tokens": 10}})

            def send_json(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def reply(self, user: str) -> str:
        if "[Response A]" in user:  # pairwise: GOOD wins; between two others the judge always says A
            a = user.split("[Response A]\n", 1)[1].split("\n\n[Response B]", 1)[0]
            b = user.split("[Response B]\n", 1)[1]
            verdict = "A" if "GOOD" in a else "B" if "GOOD" in b else "A"
            return f"Comparing the two.\nFinal Verdict: {verdict}"
        if "FAULT:garbage" in user:
            return "I like turtles."
        if "FAULT:range" in user:
            return "Excellent!\nFinal Score: 11"
        score = re.search(r"score=(\d+)", user)
        score = score.group(1) if score else zlib.crc32(user.encode()) % 10 + 1 if self.vary else 5
        return f"Reasoning: fine. (An earlier draft said Final Score: 2.)\nFinal Score: {score}"

    def count(self, marker: str = "") -> int:
        return sum(marker in r["user"] for r in self.requests)

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = FakeJudge()
    yield s
    s.close()


def judge_config(server, **extra) -> JudgeConfig:
    return JudgeConfig(base_url=server.base_url, model="judge-model", api_key_env="ALIGNLOOP_TEST_JUDGE_KEY",
                         timeout=0.5, max_retries=2, max_concurrency=4, price_in_per_million=2.0,
                         price_out_per_million=10.0, **extra)


def make(server, run_dir, monkeypatch, **extra) -> JudgeLabeler:
    monkeypatch.setenv("ALIGNLOOP_TEST_JUDGE_KEY", KEY)
    labeler = make_labeler(judge_config(server, **extra), run_dir)
    labeler.backoff = 0.01  # tiny backoff so the suite runs in seconds
    return labeler


def sample(i: int, output: str, prompt_id: str | None = None) -> dict:
    return {"prompt_id": prompt_id or f"p{i}", "sample_id": 0, "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "output": output, "round": 0, "generator": "test"}


FAULTS = {3: "FAULT:429once", 6: "FAULT:500once", 9: "FAULT:hang", 12: "FAULT:500always", 15: "FAULT:garbage",
          18: "FAULT:range"}


def faulty_samples() -> list[dict]:
    """20 samples, 6 (30%) with a fault; the others ask for score (i % 10) + 1."""
    return [sample(i, f"Answer {i} {FAULTS.get(i, '')} score={i % 10 + 1}") for i in range(20)]


def test_faulty_run_is_counted_exactly_and_a_repeat_pays_nothing(server, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    labeler = make(server, run_dir, monkeypatch)
    t = time.monotonic()
    scored, counts = label_records(faulty_samples(), labeler, batch_size=64, progress=None)
    seconds = time.monotonic() - t

    # 429 and 500 once succeed on retry and count as parsed; hang and 500-always fail after 3 attempts
    assert counts == {"scored": 16, "failed": 4}
    assert labeler.stats == {"parsed": 16, "parse_failures": 2, "api_failures": 2, "ties": 0, "cached": 0,
                             "requests": 26, "tokens_in": 1800, "tokens_out": 180, "cost": pytest.approx(0.0054)}
    assert len(server.requests) == 26
    assert server.count("FAULT:hang") == 3 and server.count("FAULT:500always") == 3
    assert server.count("FAULT:429once") == 2 and server.count("FAULT:500once") == 2
    assert seconds < 5

    for i, record in enumerate(scored):
        if i in (9, 12, 15, 18):
            assert record["reward"] is None
        else:
            assert record["reward"] == float(i % 10 + 1)  # the LAST 'Final Score' counts, not the draft's 2
            assert "label_error" not in record and "error" not in record["judge"]
            assert record["judge"]["score"] == record["reward"] and record["judge"]["model"] == "judge-model"
    assert scored[9]["label_error"] == "judge API failure: no answer within 0.5 s (gave up after 3 attempts)"
    assert scored[12]["label_error"] == "judge API failure: HTTP 500 (gave up after 3 attempts)"
    assert scored[15]["label_error"] == "judge parse failure: no 'Final Score: X' in the judge's reply"
    assert scored[15]["judge"] == {"model": "judge-model", "raw": "I like turtles.", "score": None,
                                   "error": "no 'Final Score: X' in the judge's reply"}
    assert scored[18]["label_error"] == "judge parse failure: judge score 11 is outside 1-10"
    assert scored[9]["judge"]["raw"] is None

    # Retry-After (0.2 s) was honoured although the backoff is 0.01 s
    first, second = [r["time"] for r in server.requests if "FAULT:429once" in r["user"]]
    assert second - first >= 0.19

    # the key went out as a Bearer header (that it goes nowhere else is the next test's)
    assert {r["auth"] for r in server.requests} == {f"Bearer {KEY}"}
    assert KEY not in repr(labeler)

    # the cache holds the 18 answers received (parse failures included), not the 2 API failures
    cache = [json.loads(line) for line in (run_dir / "judge_cache.jsonl").read_text().splitlines()]
    assert len(cache) == 18 and set(cache[0]) == {"key", "model", "raw"}

    # a resumed run (a fresh labeler on the same run directory) re-asks only what failed
    again = make(server, run_dir, monkeypatch)
    rescored, recounts = label_records(faulty_samples(), again, progress=None)
    assert rescored == scored and recounts == counts
    assert again.stats == {"parsed": 16, "parse_failures": 2, "api_failures": 2, "ties": 0, "cached": 18,
                           "requests": 6, "tokens_in": 0, "tokens_out": 0, "cost": 0.0}
    assert len(server.requests) == 26 + 6


def test_the_key_reaches_no_file_of_a_real_run_and_no_console_output(server, tiny_model, tmp_path):
    """A whole loop (`alignloop run`, two rounds on the tiny model, trained checkpoints included) labeled by
    the judge: the key goes out in every request's header and appears in no byte of any file of the run
    directory and nowhere in what the program printed."""
    run_dir = tmp_path / "run"
    server.vary = True  # scores that differ, so there are pairs and the rounds train
    overrides = [o for o in tiny_run_overrides(run_dir, tiny_model) if not o.startswith("labeler.")] + [
        "labeler.kind=judge", f"labeler.base_url={server.base_url}", "labeler.model=judge-model",
        "labeler.api_key_env=ALIGNLOOP_TEST_JUDGE_KEY", "labeler.timeout=5"]
    env = {**os.environ, "ALIGNLOOP_TEST_JUDGE_KEY": KEY, "ALIGNLOOP_DEBUG": "1"}  # tracebacks too, if any
    result = subprocess.run([sys.executable, "-m", "alignloop", "run", *(a for o in overrides for a in ("--set", o))],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["rounds"]["1"]["label"]["labeler"] == "judge:judge-model" and manifest["rounds"]["1"]["label"]["parsed"] == 18
    assert (run_dir / "rounds/r001/checkpoint/model.safetensors").exists()
    # each round's samples were judged while sampling ran; its label stage found the answers in the cache
    assert [manifest["rounds"][r]["label"]["requests"] for r in ("0", "1")] == [0, 0]
    round_requests = sum(manifest["rounds"][r]["sample"]["judge_prefetch"]["requests"] for r in ("0", "1"))
    assert 0 < round_requests < len(server.requests)  # the held-out evaluations asked the judge too
    assert {r["auth"] for r in server.requests} == {f"Bearer {KEY}"}
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.name == "judge_cache.jsonl" for p in files)
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in result.stdout and KEY not in result.stderr
    assert "ALIGNLOOP_TEST_JUDGE_KEY" in (run_dir / "config.yaml").read_text()  # the variable's name is kept


def test_the_label_verb_runs_the_judge_from_a_config_file(server, tmp_path):
    """`alignloop label --config cfg.yaml` takes the config's labeler section, so the verb labels with a judge as
    the loop does; its answers are cached beside the output, so a repeat asks nothing."""
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(sample(i, f"Answer {i} score={i + 2}")) + "\n" for i in range(4)))
    (tmp_path / "cfg.yaml").write_text(f"labeler:\n  kind: judge\n  base_url: {server.base_url}\n  model: judge-model\n"
                                       "  api_key_env: ALIGNLOOP_TEST_JUDGE_KEY\n")
    env = {**os.environ, "ALIGNLOOP_TEST_JUDGE_KEY": KEY}
    command = [sys.executable, "-m", "alignloop", "--no-progress", "label", str(tmp_path / "samples.jsonl"), "--out",
               str(tmp_path / "scored.jsonl"), "--config", str(tmp_path / "cfg.yaml"), "--batch-size", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in scored] == [2.0, 3.0, 4.0, 5.0] and scored[0]["judge"]["model"] == "judge-model"
    assert len(server.requests) == 4 and (tmp_path / "judge_cache.jsonl").exists()
    assert subprocess.run(command, capture_output=True, text=True, env=env, timeout=300).returncode == 0
    assert len(server.requests) == 4


def test_dropped_connection_retried_400_not(server, tmp_path, monkeypatch):
    labeler = make(server, None, monkeypatch)
    scores = labeler.score([(sample(0, "FAULT:droponce score=7"), "FAULT:droponce score=7"),
                            (sample(1, "FAULT:400"), "FAULT:400")])
    assert scores[0].reward == 7.0
    assert scores[1].reward is None and scores[1].error.startswith("judge API failure: HTTP 400 (")
    assert server.count("FAULT:droponce") == 2 and server.count("FAULT:400") == 1  # a 400 is not retried
    assert labeler.stats["parsed"] == 1 and labeler.stats["api_failures"] == 1 and labeler.stats["requests"] == 3


def test_identical_calls_in_one_batch_are_requested_once(server, monkeypatch):
    labeler = make(server, None, monkeypatch)
    item = (sample(0, "same score=4"), "same score=4")
    assert [s.reward for s in labeler.score([item, item, item])] == [4.0, 4.0, 4.0]
    assert len(server.requests) == 1 and labeler.stats["cached"] == 2 and labeler.stats["parsed"] == 3


def test_answer_length_cap_is_sent_and_keys_the_cache(server, tmp_path, monkeypatch):
    from alignloop.rewards.judge import cache_key

    item = (sample(0, "capped score=6"), "capped score=6")
    assert make(server, tmp_path, monkeypatch).score([item])[0].reward == 6.0
    assert make(server, tmp_path, monkeypatch, max_tokens=32).score([item])[0].reward == 6.0
    assert [r["max_tokens"] for r in server.requests] == [None, 32]  # the capped call was not served from the cache
    assert cache_key("m", "s", "u", 0.0) == cache_key("m", "s", "u", 0.0, None) != cache_key("m", "s", "u", 0.0, 32)


def test_missing_key_variable_fails_before_any_call(server, monkeypatch):
    monkeypatch.delenv("ALIGNLOOP_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="environment variable ALIGNLOOP_TEST_JUDGE_KEY is not set"):
        make_labeler(judge_config(server))
    assert server.requests == []


def test_wrong_url_stops_labeling_with_a_clear_error(server, monkeypatch):
    labeler = make(server, None, monkeypatch)
    labeler.url = labeler.url.replace("/v1/", "/v2/")  # the fake server answers 404 there
    with pytest.raises(RuntimeError, match="HTTP 404, check base_url and model 'judge-model'"):
        labeler.score([(sample(0, "x"), "x")])


def test_pairwise_disagreement_is_a_tie(server, monkeypatch):
    labeler = make(server, None, monkeypatch, pairwise=True)
    record = sample(0, "")
    results = judge_pairs(labeler, [(record, "GOOD answer", "poor answer"), (record, "poor answer", "GOOD answer"),
                                    (record, "one answer", "another answer")])
    assert [(r["winner"], r["tie"]) for r in results] == [("A", False), ("B", False), (None, True)]
    assert labeler.stats["parsed"] == 6 and labeler.stats["ties"] == 1
    assert len(server.requests) == 4 and labeler.stats["cached"] == 2  # the second pair is the first, swapped
    assert results[2]["raw"] == ["Comparing the two.\nFinal Verdict: A"] * 2  # the judge always said A: position bias


def test_pairwise_labeler_rewards_win_rate(server, monkeypatch):
    labeler = make(server, None, monkeypatch, pairwise=True)
    items = [(sample(0, o, "p"), o) for o in ("GOOD one", "meh", "meh too")] + [(sample(1, "alone", "q"), "alone")]
    scores = labeler.score(items)
    assert [s.reward for s in scores] == [1.0, 0.25, 0.25, None]  # beat both; lost to GOOD, tied each other
    assert scores[3].error == "pairwise judging needs another sample of the same prompt in the batch"
    assert [c["result"] for c in scores[1].extra["judge"]["comparisons"]] == ["loss", "tie"]
    assert labeler.stats["ties"] == 1 and labeler.stats["requests"] == 6


def test_cache_survives_a_torn_last_line(tmp_path):
    from alignloop.rewards.judge import JudgeCache

    path = tmp_path / "judge_cache.jsonl"
    path.write_text(json.dumps({"key": "k1", "model": "m", "raw": "Final Score: 3\u2028x"}, ensure_ascii=False) + '\n{"key": "k2", "mo')
    cache = JudgeCache(path)
    assert cache.get("k1") == "Final Score: 3\u2028x" and cache.get("k2") is None  # killed mid-write: asked again
    cache.put("k2", "m", "Final Score: 4")
    assert JudgeCache(path).answers == {"k1": "Final Score: 3\u2028x", "k2": "Final Score: 4"}


def test_parse_score_and_verdict():
    assert parse_score("blah\nFinal Score: 8") == (8.0, None)
    assert parse_score("Final Score: 3 ... no wait. **Final Score:** 9/10") == (9.0, None)
    assert parse_score("7") == (7.0, None) and parse_score("Score: 6.5") == (6.5, None)
    assert parse_score("I give it 7 out of 10 because") == (None, "no 'Final Score: X' in the judge's reply")
    assert parse_score("Final Score: 0") == (None, "judge score 0 is outside 1-10")
    assert parse_score("12") == (None, "judge score 12 is outside 1-10")
    assert parse_score(None)[0] is None
    assert parse_verdict("A is better.\nFinal Verdict: B") == ("B", None)
    assert parse_verdict("[[A]]") == ("A", None)
    assert parse_verdict("Both are fine")[0] is None


def test_judge_config_is_validated_and_callable_config_unchanged(tmp_path):
    with pytest.raises(ConfigError, match="labeler: .*needs 'model'"):
        load_config(None, ["labeler.kind=judge", "labeler.base_url=http://localhost:8000/v1"])
    with pytest.raises(ConfigError, match=r"labeler: .*user_template lacks \{output\}"):
        load_config(None, ["labeler.kind=judge", "labeler.base_url=http://h/v1", "labeler.model=m",
                           "labeler.user_template='{prompt} only'"])
    with pytest.raises(ConfigError, match="labeler.api_key: unknown key"):
        load_config(None, ["labeler.api_key=sk-123"])
    with pytest.raises(ConfigError, match="needs samples_per_prompt >= 2 and heldout: null"):
        load_config(None, ["labeler.kind=judge", "labeler.base_url=http://h/v1", "labeler.model=m", "labeler.pairwise=true"])
    judge = load_config(None, ["labeler.kind=judge", "labeler.base_url=http://h/v1", "labeler.model=m"])
    assert "Final Score: X" in judge.labeler.system_prompt and "{output}" in judge.labeler.user_template
    assert "Final Score: X" in dump_config(judge)  # the rubric in effect is saved with the run
    (tmp_path / "c.yaml").write_text(dump_config(judge))
    assert load_config(tmp_path / "c.yaml") == judge  # and a resumed run reads back the same config
    # a callable labeler is saved as it always was
    assert "labeler:\n  kind: callable\n  function: alignloop.rewards.ifeval:ifeval_reward\n  batch_size: 64\nfeedback:" in dump_config(load_config(None))


# ---- the judge at work while the sampler runs (`JudgePrefetch`), in a round's sample and label stages

ROUND_PROMPTS = [{"prompt_id": f"q{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}]} for i in range(6)]


def judge_round(server, tiny_model, run_dir, monkeypatch, *extra):
    """A run directory, sampler and judge for one round on the tiny model: 6 prompts x 3 samples, sampled in
    6 batches (one prompt each), so that there is sampling left to do after the first prompt's samples exist."""
    monkeypatch.setenv("ALIGNLOOP_TEST_JUDGE_KEY", KEY)
    overrides = [o for o in tiny_run_overrides(run_dir, tiny_model) if not o.startswith("labeler.")] + [
        "labeler.kind=judge", f"labeler.base_url={server.base_url}", "labeler.model=judge-model",
        "labeler.api_key_env=ALIGNLOOP_TEST_JUDGE_KEY", "labeler.timeout=5", "labeler.max_concurrency=4",
        "sampler.batch_size=3", "sampler.max_new_tokens=24", *extra]
    config = load_config(None, overrides)
    run = Run(config)
    run.open()
    labeler = make_labeler(config.labeler, run.dir)
    labeler.backoff = 0.01
    return run, Sampler(config.sampler, config.seed), labeler


def sample_round(run, sampler, labeler) -> tuple[dict, float]:
    """The sample stage's manifest entry, and when its sampler returned (time.monotonic, as the server's times)."""
    ends, generate = [], sampler.generate

    def timed(*args, **kwargs):
        outputs = generate(*args, **kwargs)
        ends.append(time.monotonic())
        return outputs

    sampler.generate = timed
    return sample_stage(run, 0, ROUND_PROMPTS, 0, run.config.policy, 0, sampler, None, labeler), ends[0]


def labeled_without_prefetch(run, tmp_path) -> bytes:
    """scored.jsonl as labeling the round's samples afterwards, with a judge that has no cache, writes it."""
    expected, _ = label_records(read_samples(run.round_dir(0) / "samples.jsonl"), make_labeler(run.config.labeler), progress=None)
    write_records(tmp_path / "expected.jsonl", expected)
    return (tmp_path / "expected.jsonl").read_bytes()


def test_the_judge_starts_while_sampling_runs_and_the_label_stage_asks_nothing(server, tiny_model, tmp_path, monkeypatch):
    server.vary, server.delay = True, 0.2
    run, sampler, labeler = judge_round(server, tiny_model, tmp_path / "run", monkeypatch)
    sampled, sampling_end = sample_round(run, sampler, labeler)

    prefetch = sampled["judge_prefetch"]
    assert {k: prefetch[k] for k in ("items", "requests", "api_failures")} == {"items": 18, "requests": 18, "api_failures": 0}
    assert len(server.requests) == 18
    # the first prompt's 3 samples went to the judge while the other 5 prompts were being sampled
    assert sum(r["time"] < sampling_end for r in server.requests) >= 3
    assert 0 <= prefetch["seconds_after_sampling"] < sampled["seconds"]
    assert len(json.loads(run.manifest_path.read_text())["rounds"]["0"]["sample"]["judge_prefetch"]) == 4  # recorded

    labeled = label_stage(run, 0, labeler, None)
    assert (labeled["requests"], labeled["cached"], labeled["parsed"], labeled["scored"]) == (0, 18, 18, 18)
    assert len(server.requests) == 18
    assert (run.round_dir(0) / "scored.jsonl").read_bytes() == labeled_without_prefetch(run, tmp_path)


def test_a_pairwise_judge_compares_each_prompts_samples_while_sampling_runs(server, tiny_model, tmp_path, monkeypatch):
    server.delay = 0.05
    run, sampler, labeler = judge_round(server, tiny_model, tmp_path / "run", monkeypatch, "labeler.pairwise=true",
                                        "labeler.batch_size=6", "heldout=null")
    sampled, sampling_end = sample_round(run, sampler, labeler)
    assert sampled["judge_prefetch"]["requests"] == 36 == len(server.requests)  # 6 prompts x 3 pairs x both orders
    assert server.requests[0]["time"] < sampling_end
    labeled = label_stage(run, 0, labeler, None)
    assert (labeled["requests"], labeled["cached"], labeled["scored"]) == (0, 36, 18)
    assert (run.round_dir(0) / "scored.jsonl").read_bytes() == labeled_without_prefetch(run, tmp_path)


@pytest.mark.parametrize("status", [500, 404])
def test_a_failing_judge_does_not_fail_sampling(status, server, tiny_model, tmp_path, monkeypatch):
    """500 on every try: the prefetch gives up on each sample, the label stage asks again and records the
    failures as it always does. 404 (no retry can fix it): the prefetch stops, the label stage stops the run."""
    server.status = status
    run, sampler, labeler = judge_round(server, tiny_model, tmp_path / "run", monkeypatch, "labeler.max_retries=1")
    sampled, _ = sample_round(run, sampler, labeler)
    assert sampled["count"] == 18 and len(read_samples(run.round_dir(0) / "samples.jsonl")) == 18
    prefetch = sampled["judge_prefetch"]
    if status == 500:
        assert (prefetch["requests"], prefetch["api_failures"], "error" in prefetch) == (36, 18, False)
        labeled = label_stage(run, 0, labeler, None)
        assert (labeled["requests"], labeled["cached"], labeled["api_failures"], labeled["failed"]) == (36, 0, 18, 18)
        scored = [json.loads(line) for line in (run.round_dir(0) / "scored.jsonl").read_text().splitlines()]
        assert {r["label_error"] for r in scored} == {"judge API failure: HTTP 500 (gave up after 2 attempts)"}
    else:
        assert "HTTP 404, check base_url and model 'judge-model'" in prefetch["error"]
        assert prefetch["requests"] < 18  # it stopped asking
        with pytest.raises(JudgeError, match="HTTP 404"):
            label_stage(run, 0, labeler, None)

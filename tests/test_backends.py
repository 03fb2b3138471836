"""Tests of lvr.backends against a real loopback HTTP server and real (tiny) transformers models."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import string
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from backend_server import (
    CAPTION_SCHEMA,
    QA_SCHEMA,
    caption_request,
    dead_port,
    fake_server,
    item_tag,
    mixed_requests,
    qa_request,
)

from lvr.backends import (
    BackendError,
    CachedBackend,
    Request,
    RequestCache,
    cache_key,
    make_backend,
)
from lvr.backends.json_grammar import JsonGrammar
from lvr.backends.limits import RateLimiter, backoff_delay, parse_retry_after
from lvr.backends.openai_backend import read_choices
from lvr.backends.schema import parse_and_validate, validate
from lvr.errors import LvrError
from lvr.layout import RunLayout
from lvr.testing.fake_server import FaultConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAST = {"backoff_base_s": 0.02, "backoff_cap_s": 0.1, "timeout_s": 1.0}


def openai_backend(url: str, **opts):
    return make_backend("openai", "fake-model", base_url=url, **{**FAST, **opts})


def arrivals_by_item(server) -> dict[str, list[str]]:
    """item id -> outcomes of its arrivals at the server, in order."""
    out: dict[str, list[str]] = defaultdict(list)
    for a in server.log:
        out[item_tag(a.user_text)].append(a.outcome)
    return out


# -------------------------------------------------------------------------------------------------
# openai backend against the fault-injecting server
# -------------------------------------------------------------------------------------------------


def test_faults_every_request_ends_with_texts_or_error() -> None:
    faults = FaultConfig(rate=0.2, seed=1, retry_after_s=0.1, timeout_sleep_s=1.5)
    reqs = mixed_requests(160)
    with fake_server(latency_s=0.01, faults=faults) as server:
        # 2 attempts per row: with 20% faults a few rows (~4%) exhaust them, both paths are hit.
        backend = openai_backend(server.url, max_retries=1, concurrency=64)
        res = backend.run(reqs, progress=False)
        seen = arrivals_by_item(server)
    assert [r.item_id for r in res] == [q.item_id for q in reqs]  # none lost, none reordered
    assert sum(r.attempts for r in res) == sum(len(v) for v in seen.values())  # every call counted
    assert set(Counter(o for v in seen.values() for o in v)) > {"ok", "429", "timeout"}
    for req, resp in zip(reqs, res, strict=True):
        outcomes = seen[req.item_id]
        assert resp.attempts == len(outcomes) <= 2
        if outcomes[-1] == "ok":
            assert resp.error is None and len(resp.texts) == 1
            assert validate(json.loads(resp.texts[0]), req.json_schema) == []
        else:
            assert resp.texts == [] and "after 2 attempts" in resp.error
            assert "\n" not in resp.error
    assert 0 < sum(not r.ok for r in res) < 20  # exhausted rows are error rows, not raises


def test_fault_kinds_give_honest_errors() -> None:
    expected = {
        "500": "HTTP 500",
        "503": "HTTP 503",
        "429": "HTTP 429",
        "timeout": "timeout",
        "truncated": "truncated response body",
        "non_json": "response body is not JSON",
        "missing_fields": 'missing required key "caption"',
    }
    for kind, text in expected.items():
        faults = FaultConfig(rate=1.0, kinds=(kind,), retry_after_s=0.05, timeout_sleep_s=0.5)
        with fake_server(faults=faults) as server:
            backend = openai_backend(server.url, max_retries=1, timeout_s=0.25)
            [resp] = backend.run([caption_request(0)], progress=False)
        assert resp.texts == [] and resp.attempts == 2, kind
        assert text in resp.error and resp.error.endswith("after 2 attempts"), resp.error


def test_text_requests_and_n_choices() -> None:
    options = "Which comes first?\nA. the dog\nB. the ball\nC. the cup\nD. the man"
    req = Request("q-1", [{"role": "user", "content": options}], n=3, temperature=1.0)
    with fake_server() as server:
        [resp] = openai_backend(server.url).run([req], progress=False)
    assert resp.ok and len(resp.texts) == 3
    assert all(t.startswith("<think>") and "<answer>" in t for t in resp.texts)


def test_bad_row_does_not_fail_others() -> None:
    bad = caption_request(1, images=[np.zeros((8, 8, 3), dtype=np.float32)])
    good = caption_request(2, images=[np.zeros((8, 8, 3), dtype=np.uint8)])
    with fake_server() as server:
        res = openai_backend(server.url).run([bad, good], progress=False)
        sent = server.log
    assert res[0].error.startswith("bad request: image 0") and res[0].attempts == 0
    assert res[1].ok and len(sent) == 1


def test_retry_after_is_honoured() -> None:
    faults = FaultConfig(rate=0.6, kinds=("429",), seed=3, retry_after_s=0.3)
    with fake_server(faults=faults) as server:
        backend = openai_backend(server.url, backoff_base_s=0.001, max_retries=4)
        res = backend.run(mixed_requests(20), progress=False)
    delays = backend.last_stats.delays
    assert delays and all(kind == "HTTP 429" for kind, _, _ in delays)
    # The planned wait of every retry after a 429 is at least the server's Retry-After.
    assert all(ra == pytest.approx(0.3) and wait >= 0.3 for _, wait, ra in delays)
    assert sum(r.ok for r in res) >= 15


def test_retry_after_parsing_and_backoff() -> None:
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    date = "Wed, 21 Oct 2015 07:28:10 GMT"
    assert parse_retry_after({"Retry-After": date}, now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after({"Retry-After": "soon"}) is None
    rng = random.Random(0)
    windows = [backoff_delay(r, 0.5, 4.0, rng) for r in range(1, 8) for _ in range(50)]
    assert max(windows) <= 4.0 and min(windows) >= 0.0
    assert backoff_delay(1, 0.5, 4.0, rng, retry_after_s=500, max_retry_after_s=60) <= 60.5


def test_rate_limiter_schedule_is_smooth() -> None:
    limiter = RateLimiter(600)  # one call every 0.1 s
    starts = [limiter.reserve(0.0) for _ in range(5)]
    assert starts == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert limiter.reserve(10.0) == 10.0  # idle time is not banked: no burst afterwards
    assert limiter.reserve(10.0) == pytest.approx(10.1)
    assert RateLimiter(None).reserve(5.0) == 5.0


def test_rate_limiter_spaces_every_attempt_of_a_run() -> None:
    faults = FaultConfig(rate=0.3, kinds=("500",), seed=2)
    with fake_server(faults=faults) as server:
        backend = openai_backend(server.url, max_requests_per_minute=3000, concurrency=16)
        res = backend.run(mixed_requests(24), progress=False)
        arrivals = len(server.log)
    schedule = backend.limiter.schedule
    assert len(schedule) == arrivals == sum(r.attempts for r in res)  # retries are limited too
    gaps = np.diff(sorted(schedule))
    assert gaps.min() >= 0.02 - 1e-9  # 60 / 3000 s apart, whatever the concurrency


def test_unreachable_endpoint_fails_fast_with_one_error() -> None:
    url = f"http://127.0.0.1:{dead_port()}/v1"
    backend = openai_backend(url)
    with pytest.raises(LvrError, match=r"cannot reach .*127\.0\.0\.1"):
        backend.run(mixed_requests(1000), progress=False)
    assert backend.last_stats.attempts == 0  # no row was sent


def test_breaker_stops_sending_when_endpoint_dies() -> None:
    url = f"http://127.0.0.1:{dead_port()}/v1"
    backend = openai_backend(
        url, preflight=False, concurrency=4, unreachable_after=8, max_retries=1
    )
    res = backend.run(mixed_requests(300), progress=False)
    assert len(res) == 300 and not any(r.ok for r in res)
    assert backend.last_stats.attempts <= (8 + 4) * 2  # not 300 rows x 2 attempts
    assert sum(r.error.startswith("not sent: endpoint") for r in res) >= 280


def test_preflight_rejects_bad_key_and_unknown_model() -> None:
    with fake_server(api_key="secret") as server:
        with pytest.raises(BackendError, match="rejected the API key"):
            openai_backend(server.url, api_key="wrong").run([caption_request(0)], progress=False)
        ok = openai_backend(server.url, api_key="secret").run([caption_request(0)], progress=False)
        assert ok[0].ok
    with fake_server() as server, pytest.raises(BackendError, match="not served"):
        make_backend("openai", "other", base_url=server.url).run([caption_request(0)], False)


def test_preflight_once_per_backend_not_per_run() -> None:
    """A stage calls `run` once per shard: the endpoint check costs a round trip with nothing in
    flight, so a backend checks once; a failed check is not remembered."""
    with fake_server(api_key="secret") as server:
        wrong = openai_backend(server.url, api_key="wrong")
        for _ in range(2):
            with pytest.raises(BackendError, match="rejected the API key"):
                wrong.run([caption_request(0)], progress=False)
        backend = openai_backend(server.url, api_key="secret")
        for i in range(3):
            assert backend.run([caption_request(i)], progress=False)[0].ok
        assert server.model_lists == 1  # one check for three runs (refused keys end at auth)


def test_proxy_from_the_environment_is_resolved_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from lvr.backends.http import env_proxy

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        for var in (name, name.upper()):
            monkeypatch.delenv(var, raising=False)
    assert env_proxy("http://api.example.com/v1") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert env_proxy("https://api.example.com/v1") == "http://proxy.corp:3128"
    assert env_proxy("http://api.example.com/v1") is None  # no proxy for plain http set
    assert env_proxy("https://127.0.0.1:8000/v1") is None


def test_run_inside_a_running_event_loop() -> None:
    with fake_server() as server:
        backend = openai_backend(server.url)

        async def main():
            return backend.run(mixed_requests(4), progress=False)

        res = asyncio.run(main())
    assert [r.ok for r in res] == [True] * 4


def test_json_modes_for_servers_without_structured_output() -> None:
    with fake_server() as server:
        for mode in ("json_object", "prompt"):
            res = openai_backend(server.url, json_mode=mode).run([qa_request(0)], progress=False)
            assert res[0].ok, res[0].error
            assert validate(json.loads(res[0].texts[0]), QA_SCHEMA) == []


def test_fake_server_answers_are_plausible_and_deterministic() -> None:
    frames_a = [np.zeros((8, 8, 3), dtype=np.uint8)]
    frames_b = [np.full((8, 8, 3), 200, dtype=np.uint8)]
    plain = [
        Request(f"c{i}", [{"role": "user", "content": "Describe the clip."}], images=f)
        for i, f in enumerate([frames_a, frames_b, frames_a])
    ]
    with fake_server() as server:
        backend = openai_backend(server.url)
        qa, *caps = backend.run([qa_request(0), *plain], progress=False)
        again = backend.run([qa_request(0)], progress=False)[0]
    value = json.loads(qa.texts[0])
    captions = [
        "a man enters the kitchen",
        "he opens the fridge",
        "he pours milk into a cup",
        "he drinks and leaves",
    ]
    right = value["options"]["ABCD".index(value["answer"])]
    assert right in captions and value["question"].startswith("After ")
    assert all(0 <= e["start_s"] < e["end_s"] <= 40 for e in value["evidence"])
    assert again.texts == qa.texts  # same prompt, same answer
    assert caps[0].texts == caps[2].texts != caps[1].texts  # captions follow the frames


def test_make_backend_rejects_unknown_options() -> None:
    with pytest.raises(BackendError, match="unknown openai backend options"):
        make_backend("openai", "m", concurency=3)
    with pytest.raises(BackendError, match="unknown backend kind"):
        make_backend("vllm", "m")


# -------------------------------------------------------------------------------------------------
# usage accounting and the tokens-per-minute budget
# -------------------------------------------------------------------------------------------------


def test_fake_server_usage_is_counted_like_a_real_server() -> None:
    frame = np.zeros((224, 336, 3), dtype=np.uint8)  # 8 x 12 patches of 28 px
    with_image = caption_request(0, images=[frame, frame])
    text_only = caption_request(0)
    sampled = Request(
        "q", [{"role": "user", "content": "Which?\nA. x\nB. y"}], n=3, temperature=1.0
    )
    with fake_server() as server:
        backend = openai_backend(server.url, concurrency=1)  # arrivals in request order
        res = backend.run([with_image, text_only, sampled], progress=False)
        usage = [a.usage for a in server.log]
    assert all(r.ok for r in res)
    for resp, u in zip(res, usage, strict=True):
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert (resp.prompt_tokens, resp.completion_tokens) == (
            u["prompt_tokens"],
            u["completion_tokens"],
        )
        assert u["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage[0]["prompt_tokens"] - usage[1]["prompt_tokens"] == 2 * (8 * 12 + 2)  # images
    assert 25 < usage[1]["prompt_tokens"] < 60  # ~30 words of prompt + chat template
    # n = 3 sampled choices: completion tokens count all three, each about a third
    one = len(res[2].texts[0].split())
    assert usage[2]["completion_tokens"] >= 3 * one // 2


def test_usage_counts_attempts_retries_failures_and_cache_hits(tmp_path: Path) -> None:
    from lvr.backends.usage import Usage

    faults = FaultConfig(rate=0.4, kinds=("500", "missing_fields"), seed=11)
    reqs = mixed_requests(40)
    with fake_server(faults=faults) as server:
        cached = CachedBackend(openai_backend(server.url, max_retries=1), tmp_path / "c.sqlite")
        first = cached.run(reqs, progress=False)
        u1 = Usage.from_dict(cached.usage.to_dict())
        log = list(server.log)
        cached.run(reqs, progress=False)  # the failures are sent again, the rest are hits
        again = server.log[len(log) :]
    billed = [a.usage for a in log if a.usage is not None]
    # missing_fields answers failed validation but came back with usage: they are billed too
    assert len(billed) > sum(r.ok for r in first)
    assert (u1.requests, u1.sent, u1.cache_hits) == (40, 40, 0)
    assert u1.attempts == len(log) and u1.retries == len(log) - 40
    assert u1.failures == sum(not r.ok for r in first) > 0
    assert u1.prompt_tokens == sum(b["prompt_tokens"] for b in billed)
    assert u1.completion_tokens == sum(b["completion_tokens"] for b in billed)
    u2 = cached.usage  # both runs
    assert u2.requests == 80 and u2.cache_hits == sum(r.ok for r in first)
    assert u2.sent - u1.sent == u1.failures and u2.attempts - u1.attempts == len(again)
    assert u2.prompt_tokens - u1.prompt_tokens == sum(
        a.usage["prompt_tokens"] for a in again if a.usage
    )
    price = {"prompt_per_1m": 2.0, "completion_per_1m": 8.0}
    assert u2.cost(price) == pytest.approx((2 * u2.prompt_tokens + 8 * u2.completion_tokens) / 1e6)


def test_token_limiter_reserves_estimates_and_settles_with_usage() -> None:
    clock = [0.0]
    limiter = RateLimiter(None, lambda: clock[0], tokens_per_minute=6000)  # 100 tokens/s
    assert limiter.reserve(0.0, 100) == 0.0
    assert limiter.reserve(0.0, 100) == pytest.approx(1.0)  # the first call's 100 tokens
    limiter.settle(100, 20)  # the second used 20: 0.8 s of schedule come back
    assert limiter.reserve(0.0, 10) == pytest.approx(1.2)
    clock[0] = 5.0
    limiter.settle(500, 0)  # a refund never banks capacity in the past
    assert limiter.reserve(5.0, 10) == pytest.approx(5.0)
    both = RateLimiter.for_share(600, 60_000, share=0.5)  # 300 RPM and 30K TPM for this process
    assert both.interval == pytest.approx(0.2) and both.token_interval == pytest.approx(0.002)
    assert both.describe() == {"max_requests_per_minute": 600, "max_tokens_per_minute": 60_000,
                               "share": 0.5, "process_requests_per_minute": 300.0,
                               "process_tokens_per_minute": 30_000.0}  # fmt: skip


def test_tokens_per_minute_budget_holds_against_the_server() -> None:
    tpm = 30_000  # 500 tokens/s; each call reserves ~110 tokens and uses fewer
    reqs = [caption_request(i, max_tokens=60) for i in range(40)]
    with fake_server() as server:
        backend = openai_backend(server.url, max_tokens_per_minute=tpm, concurrency=8)
        res = backend.run(reqs, progress=False)
        log = list(server.log)
    assert all(r.ok for r in res)
    used = [a.usage["total_tokens"] for a in log]
    span = log[-1].t - log[0].t
    rate = sum(used[:-1]) / span  # tokens of the calls started before the last one
    assert rate <= tpm / 60 * 1.05
    # settling with the real usage lets the budget be spent, not the (larger) estimates
    assert rate >= 0.75 * tpm / 60


# -------------------------------------------------------------------------------------------------
# cache
# -------------------------------------------------------------------------------------------------


def test_cache_rerun_retries_only_failures(tmp_path: Path) -> None:
    faults = FaultConfig(rate=0.5, kinds=("500", "truncated"), seed=5)
    reqs = mixed_requests(60)
    with fake_server(faults=faults) as server:
        cached = CachedBackend(openai_backend(server.url, max_retries=1), tmp_path / "c.sqlite")
        first = cached.run(reqs, progress=False)
        failed = {r.item_id for r in first if not r.ok}
        assert 0 < len(failed) < 60
        n_before = len(server.log)
        second = cached.run(reqs, progress=False)
        resent = {item_tag(a.user_text) for a in server.log[n_before:]}
    assert resent == failed  # only the failures went out again
    assert cached.last_hits == 60 - len(failed)
    for a, b in zip(first, second, strict=True):
        if a.ok:
            assert b.cached and b.texts == a.texts and b.attempts == 0
    assert len(RequestCache(tmp_path / "c.sqlite")) == sum(r.ok for r in second)


def test_cache_prompt_edit_pays_only_for_changed_rows(tmp_path: Path) -> None:
    reqs = mixed_requests(20)
    with fake_server() as server:
        cached = CachedBackend(openai_backend(server.url), tmp_path / "c.sqlite")
        cached.run(reqs, progress=False)
        n0 = len(server.log)
        edited = [
            caption_request(i, prompt_version="cap-v2") if i % 2 else qa_request(i)
            for i in range(20)
        ]
        res = cached.run(edited, progress=False)
        resent = sorted(item_tag(a.user_text) for a in server.log[n0:])
    assert resent == sorted(f"clip-{i}" for i in range(1, 20, 2))
    assert all(r.ok for r in res) and sum(r.cached for r in res) == 10


def test_cache_reads_sibling_shard_files_and_ignores_the_key(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)  # the file names of a run's machines
    reqs = mixed_requests(12)
    with fake_server(api_key="sk-first-key-000001") as server:
        for i in range(2):  # a 2-shard run: each machine writes its own file
            shard = [r for k, r in enumerate(reqs) if k % 2 == i]
            CachedBackend(openai_backend(server.url, api_key="sk-first-key-000001"),
                          layout.request_cache(i, 2)).run(shard, progress=False)  # fmt: skip
    # The same job on 3 machines, with a rotated key: every answer is found, nothing is sent.
    with fake_server(api_key="sk-rotated-key-0002") as server:
        for i in range(3):
            shard = [r for k, r in enumerate(reqs) if k % 3 == i]
            backend = openai_backend(server.url, api_key="sk-rotated-key-0002")
            cached = CachedBackend(backend, layout.request_cache(i, 3))
            res = cached.run(shard, progress=False)
            assert all(r.cached for r in res) and cached.usage.cache_hits == len(shard)
        assert server.log == []
    # A file that is not a cache is skipped with a warning: misses, not a failed run.
    (layout.cache / "requests-broken.sqlite").write_bytes(b"not sqlite")
    found = RequestCache(layout.request_cache()).get_many([cache_key(reqs[0], "fake-model")])
    assert len(found) == 1


def test_cache_key_covers_payload() -> None:
    base = caption_request(0, images=[np.zeros((4, 4, 3), dtype=np.uint8)])
    key = cache_key(base, "m")
    variants = [
        caption_request(0, images=[np.ones((4, 4, 3), dtype=np.uint8)]),  # other pixels
        caption_request(0, images=[np.zeros((4, 4, 3), dtype=np.uint8)], temperature=0.5),
        caption_request(0, images=[np.zeros((4, 4, 3), dtype=np.uint8)], prompt_version="v9"),
        caption_request(0, images=[np.zeros((4, 4, 3), dtype=np.uint8)], seed=1),
    ]
    assert len({key, *(cache_key(v, "m") for v in variants), cache_key(base, "m2")}) == 6
    assert cache_key(caption_request(0, images=[np.zeros((4, 4, 3), np.uint8)]), "m") == key


_KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from backend_server import mixed_requests
from lvr.backends import CachedBackend, make_backend
backend = make_backend("openai", "fake-model", base_url={url!r}, concurrency=8)
CachedBackend(backend, {cache!r}).run(mixed_requests(300), progress=False)
print("finished")
"""


def test_sigkill_during_cached_run_then_rerun(tmp_path: Path) -> None:
    cache = RunLayout(tmp_path).request_cache()
    reqs = mixed_requests(300)
    with fake_server(latency_s=0.05) as server:
        script = _KILL_SCRIPT.format(
            tests=str(Path(__file__).parent), url=server.url, cache=str(cache)
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            stored = 0
            for _ in range(600):  # until ~40 rows are committed (or 60 s)
                if cache.exists():
                    with sqlite3.connect(cache) as conn:
                        try:
                            stored = conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
                        except sqlite3.OperationalError:
                            stored = 0
                if stored >= 40 or proc.poll() is not None:
                    break
                time.sleep(0.1)
            assert proc.poll() is None, proc.communicate()
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        assert 40 <= stored < 300
        resumed = CachedBackend(openai_backend(server.url), cache)
        final = resumed.run(reqs, progress=False)
        reference = openai_backend(server.url).run(reqs, progress=False)
    assert resumed.last_hits >= stored
    assert [r.texts for r in final] == [r.texts for r in reference]
    with sqlite3.connect(cache) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        keys = [k for (k,) in conn.execute("SELECT key FROM responses")]
    assert sorted(keys) == sorted({cache_key(r, "fake-model") for r in reqs})  # one row each


# -------------------------------------------------------------------------------------------------
# schema validation and the JSON grammar
# -------------------------------------------------------------------------------------------------


def test_doctests() -> None:
    import doctest

    from lvr import secrets
    from lvr.backends import json_grammar, limits, openai_backend, schema, usage
    from lvr.testing import fake_content

    for module in (
        json_grammar,
        limits,
        schema,
        usage,
        openai_backend,
        fake_content,
        secrets,
    ):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_validate_and_parse() -> None:
    good = {
        "question": "Why so?",
        "options": ["a", "b", "c", "d"],
        "answer": "B",
        "reasoning": "r",
        "evidence": [{"start_s": 0, "end_s": 1.5}],
    }
    assert validate(good, QA_SCHEMA) == []
    assert validate({**good, "answer": "E"}, QA_SCHEMA)[0].startswith("$.answer")
    assert validate({**good, "options": ["a"]}, QA_SCHEMA)[0] == "$.options: 1 items, minItems is 4"
    assert validate({**good, "evidence": [{"start_s": "x", "end_s": 1}]}, QA_SCHEMA)
    text, problem = parse_and_validate('```json\n{"caption": "x"}\n```', CAPTION_SCHEMA)
    assert text == '{"caption": "x"}' and problem is None
    assert "not JSON" in parse_and_validate('{"caption": "x"', CAPTION_SCHEMA)[1]
    req = caption_request(0, n=2)
    body = json.dumps({"choices": [{"message": {"content": '{"caption":"a"}'}}]}).encode()
    texts, failure = read_choices(body, req)
    assert texts == [] and not failure.retryable and "n=2" in failure.message


MIXED_SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0},
        "x": {"type": "number"},
        "ok": {"type": "boolean"},
        "none": {"type": "null"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "kind": {"enum": [1, 10, "ten"]},
        "inner": {"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}},
    },
}


@pytest.mark.parametrize("schema", [CAPTION_SCHEMA, QA_SCHEMA, MIXED_SCHEMA])
def test_grammar_random_walks_give_valid_json(schema: dict) -> None:
    grammar = JsonGrammar(schema, max_string=12, max_items=4)
    chars = list('{}[]",:.-\\/ \n_' + string.ascii_letters + string.digits)
    rng = random.Random(0)
    for _ in range(40):
        state, text = grammar.initial(), ""
        budget = grammar.min_rest(state) + rng.choice([0, 20, 200])
        while True:
            options = [
                c
                for c in chars
                if (s := grammar.advance(state, c)) is not None
                and grammar.min_rest(s) <= budget - len(text) - 1
            ]
            if grammar.is_complete(state) and (not state or not options or rng.random() < 0.3):
                break
            assert options, text  # the budget rule never leads into a dead end
            char = rng.choice(options)
            state, text = grammar.advance(state, char), text + char
        assert len(text) <= budget and validate(json.loads(text), schema) == [], text


def test_grammar_rejects_what_the_schema_forbids() -> None:
    g = JsonGrammar(QA_SCHEMA)
    assert g.feed(g.initial(), '{"options"') is None  # keys in schema order
    assert g.feed(g.initial(), '{"question":"q","options":["a"],') is None  # minItems 4
    prefix = '{"question":"what?","options":["a","b","c","d"],"answer":"'
    assert g.feed(g.initial(), prefix + "E") is None and g.feed(g.initial(), prefix + 'D"')
    assert JsonGrammar({"type": "string", "maxLength": 3}).feed(((0, (0, 0, 0)),), '"abcd') is None
    with pytest.raises(ValueError, match="unsupported keywords"):
        JsonGrammar({"type": "string", "pattern": "a+"})


# -------------------------------------------------------------------------------------------------
# hf backend: tiny random-weight models (the real test of the constraint) and SmolLM2 (slow)
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while these tests run (2 shared cores: OpenMP spinning costs 10x)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory, one_thread) -> str:
    from lvr.models import build_tiny_llm

    return str(build_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm"))


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory, one_thread) -> str:
    from lvr.models import build_tiny_vlm

    return str(build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm"))


def _ask(i: int, schema: dict | None, **kwargs) -> Request:
    return Request(
        f"r{i}",
        [{"role": "user", "content": f"Describe item {i} as JSON."}],
        json_schema=schema,
        **kwargs,
    )


ARRAY_SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5}


@pytest.mark.parametrize("schema", [CAPTION_SCHEMA, QA_SCHEMA, MIXED_SCHEMA, ARRAY_SCHEMA])
def test_constrained_decoding_makes_a_random_model_emit_valid_json(tiny_llm, schema) -> None:
    backend = make_backend("hf", tiny_llm, batch_size=4)
    reqs = [_ask(i, schema, max_tokens=120) for i in range(2)]
    reqs += [_ask(i, schema, max_tokens=120, temperature=1.0, seed=i) for i in range(2, 4)]
    res = backend.run(reqs, progress=False)
    for resp in res:
        assert resp.error is None, resp.error
        assert validate(json.loads(resp.texts[0]), schema) == []


def test_without_the_constraint_the_random_model_is_not_json(tiny_llm) -> None:
    backend = make_backend("hf", tiny_llm, constrain_json=False)
    res = backend.run([_ask(i, CAPTION_SCHEMA, max_tokens=40) for i in range(3)], progress=False)
    assert all(r.texts == [] and "output" in r.error for r in res)


def test_hf_n_samples_seeded(tiny_llm) -> None:
    backend = make_backend("hf", tiny_llm)
    sampled = _ask(0, None, max_tokens=8, temperature=1.0, n=3, seed=7)
    other = _ask(2, None, max_tokens=8, temperature=1.0, n=3, seed=8)  # same batch, other seed
    greedy = _ask(1, None, max_tokens=8, n=2)
    a, g, o = backend.run([sampled, greedy, other], progress=False)
    b, _, o2 = backend.run([sampled, greedy, other], progress=False)
    assert len(a.texts) == 3 and len(set(a.texts)) > 1
    assert a.texts == b.texts and o.texts == o2.texts  # same batch composition, same samples
    assert len(g.texts) == 2 and g.texts[0] == g.texts[1]


def test_hf_vlm_video_images_and_bad_rows(tiny_vlm, tiny_llm) -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(4)]
    backend = make_backend("hf", tiny_vlm, batch_size=2)
    video = _ask(0, CAPTION_SCHEMA, images=frames, fps=2.0, max_tokens=40)
    backend.load()
    enc = backend.encode([video])
    assert "mm_token_type_ids" in enc and "pixel_values_videos" in enc  # 3-D M-RoPE inputs
    reqs = [
        video,
        _ask(1, None, images=frames[:2], max_tokens=5),
        _ask(2, None, max_tokens=5),
        _ask(3, None, images=[frames[0].astype(np.float32)]),
    ]
    res = backend.run(reqs, progress=False)
    assert validate(json.loads(res[0].texts[0]), CAPTION_SCHEMA) == []
    assert res[1].ok and res[2].ok and res[3].error.startswith("bad request")
    [llm_row] = make_backend("hf", tiny_llm).run([_ask(4, None, images=frames)], progress=False)
    assert llm_row.error == "bad request: images given to a text-only model"


def test_hf_unloadable_model_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(LvrError, match="hf backend cannot load"):
        make_backend("hf", str(tmp_path / "missing")).run([_ask(0, None)], progress=False)


@pytest.mark.slow
def test_smollm2_constrained_outputs_validate(tmp_path_factory, one_thread) -> None:
    from lvr.models import smollm2_dir

    folder = smollm2_dir(tmp_path_factory.mktemp("smol"))
    backend = make_backend("hf", str(folder), batch_size=2)
    reqs = [
        _ask(0, CAPTION_SCHEMA, max_tokens=80),
        Request(
            "qa",
            [{"role": "user", "content": qa_request(0).messages[0]["content"]}],
            json_schema=QA_SCHEMA,
            max_tokens=300,
        ),
    ]
    for resp, req in zip(backend.run(reqs, progress=False), reqs, strict=True):
        assert resp.error is None, resp.error
        assert validate(json.loads(resp.texts[0]), req.json_schema) == []

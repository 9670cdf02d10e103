"""The official OpenAI Python SDK, unmodified, against examples/axum_gateway.rs.

Run by .ci/sdk-test.sh, which starts the gateway and passes its base URL:

    python examples/axum_gateway_sdk_test.py http://127.0.0.1:PORT/v1

The gateway's upstream is the tower-ai simulator, with scripted models (see the example's
header). Checks, with the SDK's default retries unless said otherwise:

- a non-streamed and a streamed chat completion;
- a burst of 400 streamed calls over one key's budget: each is served or ends in a
  RateLimitError whose retry-after the SDK honoured; no timeout, no 502;
- the primary's insufficient_quota reaches the caller as that error, not as the fallback
  model's answer; a fallback answer names its route in x-tower-ai-route;
- `Authorization: bearer ...` (lowercase scheme) works; unknown paths, wrong methods and
  oversized bodies get OpenAI-shaped errors;
- unknown keys get 401; a 1 MiB model name gets a 400; 1,000 requests under fresh keys do
  not buy a key past its own limit;
- a stream the upstream stops feeding is cut (the SDK raises instead of returning a
  truncated answer);
- with `timeout=5` while the gateway's upstream budget is full, a 429 with retry-after at
  once, not a client-side timeout.
"""

import asyncio
import http.client
import json
import sys
import time
import urllib.parse

import openai

MESSAGES = [{"role": "user", "content": "Hello from the OpenAI Python SDK"}]
CLIENT_CONCURRENT = 4  # the gateway's per-key limit of requests in flight


class Raw:
    """Plain HTTP/1.1 requests, as curl would send them (one kept-alive connection)."""

    def __init__(self, base_url: str) -> None:
        url = urllib.parse.urlsplit(base_url)
        self.prefix = url.path
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)

    def request(self, method: str, path: str, headers: dict, body: bytes | None = None):
        self.conn.request(method, self.prefix + path, body=body, headers=headers)
        res = self.conn.getresponse()
        data = res.read()
        return res.status, res.headers, data

    def post_json(self, path: str, payload: dict, auth: str):
        headers = {"authorization": auth, "content-type": "application/json"}
        return self.request("POST", path, headers, json.dumps(payload).encode())

    def close(self) -> None:
        self.conn.close()


def basics(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="sk-sdk-test", timeout=30)

    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    text = completion.choices[0].message.content
    print(f"answer: {text!r}, usage: {completion.usage}")
    assert text, "empty answer"
    assert completion.choices[0].finish_reason == "stop", completion.choices[0].finish_reason
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    streamed = "".join(pieces)
    print(f"stream: {len(pieces)} pieces, {streamed!r}, usage: {usage}")
    assert len(pieces) > 1, "not streamed"
    assert streamed == text, "the stream should carry the same answer"
    assert finish == "stop", finish
    assert usage is not None and usage.completion_tokens == completion.usage.completion_tokens


async def burst(base_url: str, calls: int = 400) -> None:
    """(1) Many streamed calls at once under one key: served, or refused with a 429 the
    SDK waited on (default max_retries=2, retry-after honoured each time)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-sdk-burst", timeout=30)

    async def one() -> tuple[str, float, object]:
        start = time.monotonic()
        try:
            stream = await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True, max_tokens=16
            )
            text = ""
            async for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
            assert text, "an empty stream"
            return "served", time.monotonic() - start, None
        except openai.RateLimitError as err:
            return "rate_limited", time.monotonic() - start, err
        except Exception as err:  # counted and reported below
            return type(err).__name__, time.monotonic() - start, err

    start = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(calls)))
    wall = time.monotonic() - start
    counts: dict[str, int] = {}
    for outcome, _, _ in results:
        counts[outcome] = counts.get(outcome, 0) + 1
    print(f"burst of {calls} streamed calls in {wall:.1f} s: {counts}")
    others = [(o, e) for o, _, e in results if o not in ("served", "rate_limited")]
    assert not others, f"neither served nor rate limited: {others[:3]}"
    assert counts.get("served", 0) >= CLIENT_CONCURRENT, counts
    assert counts.get("rate_limited", 0) > 0, "the burst should go over the key's budget"
    for outcome, elapsed, err in results:
        if outcome != "rate_limited":
            continue
        assert err.status_code == 429, err.status_code
        body = err.body or {}
        assert body.get("code") == "budget_exceeded", body
        retry_after = float(err.response.headers["retry-after"])
        assert 1 <= retry_after <= 60, retry_after
        # Three attempts (max_retries=2), each wait being the gateway's retry-after.
        assert elapsed >= 2 * retry_after * 0.95, (elapsed, retry_after)
    await client.close()


def quota_and_fallback(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="sk-sdk-test", timeout=30)

    # (2) The primary's account is out of credit: that error, not a fallback answer.
    start = time.monotonic()
    try:
        client.chat.completions.create(model="quota-model", messages=MESSAGES)
    except openai.RateLimitError as err:
        elapsed = time.monotonic() - start
        print(f"quota-model: {err.status_code} {err.code}, {elapsed:.2f} s")
        assert err.code == "insufficient_quota", err.body
        assert "x-tower-ai-route" not in err.response.headers
        assert err.response.headers.get("x-should-retry") == "false"
        assert elapsed < 2, "x-should-retry: false, so the SDK did not retry"
    else:
        raise AssertionError("insufficient_quota was answered by another model")

    # The upstream refuses the gateway's own key: a 502 of the gateway's, not the
    # provider's 401 (the client's key is fine) nor its text; not retried.
    start = time.monotonic()
    try:
        client.chat.completions.create(model="locked-model", messages=MESSAGES)
    except openai.InternalServerError as err:
        assert err.status_code == 502 and err.code == "upstream_unauthorized", err.body
        assert time.monotonic() - start < 2, "x-should-retry: false, so the SDK did not retry"
    else:
        raise AssertionError("the upstream's 401 was not reported")

    # (3) The primary model is down: the fallback model answers, and the header says so.
    raw = client.chat.completions.with_raw_response.create(model="down-model", messages=MESSAGES)
    completion = raw.parse()
    print(f"down-model: served by route {raw.headers.get('x-tower-ai-route')!r}, model {completion.model!r}")
    assert raw.headers.get("x-tower-ai-route") == "gpt-4o-mini", dict(raw.headers)
    assert raw.headers.get("x-tower-ai-model") == "gpt-4o-mini"
    assert completion.choices[0].message.content

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.headers.get("x-tower-ai-route") == "primary", dict(raw.headers)


def http_shapes(base_url: str) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5}
    raw = Raw(base_url)
    # (4) The scheme is case-insensitive (RFC 9110 section 11.1).
    status, _, data = raw.post_json("/chat/completions", body, "bearer sk-sdk-test")
    assert status == 200, data

    # (5) Unknown path, wrong method, oversized body: OpenAI's error shape.
    auth = {"authorization": "Bearer sk-sdk-test"}
    for method, path, want, code in [
        ("POST", "/nowhere", 404, "unknown_url"),
        ("GET", "/chat/completions", 405, "method_not_allowed"),
    ]:
        status, _, data = raw.request(method, path, auth, b"" if method == "POST" else None)
        assert status == want, (path, status)
        error = json.loads(data)["error"]
        assert error["code"] == code and error["message"] and "type" in error, error
    raw.close()
    raw = Raw(base_url)
    status, _, data = raw.request("POST", "/chat/completions", auth, b"x" * (3 << 20))
    assert status == 413, status
    assert json.loads(data)["error"]["code"] == "request_too_large", data
    raw.close()

    client = openai.OpenAI(base_url=base_url, api_key="sk-sdk-test", timeout=30)
    try:
        client.models.list()
    except openai.NotFoundError as err:
        assert err.code == "unknown_url", err.body
    else:
        raise AssertionError("GET /v1/models should be a 404")
    print("lowercase bearer, 404, 405, 413: ok")


def hostile_clients(base_url: str) -> None:
    # Unknown keys: 401 before any budget.
    stranger = openai.OpenAI(base_url=base_url, api_key="sk-made-up", timeout=30)
    try:
        stranger.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    except openai.AuthenticationError as err:
        assert err.code == "invalid_api_key", err.body
        assert "sk-made-up" not in str(err.body), "the key is not echoed"
    else:
        raise AssertionError("an unknown key was served")

    # A 1 MiB model name: a clear 400.
    client = openai.OpenAI(base_url=base_url, api_key="sk-sdk-test", timeout=30)
    try:
        client.chat.completions.create(model="m" * (1 << 20), messages=MESSAGES)
    except openai.BadRequestError as err:
        assert err.code == "model_too_long", err.body
        print(f"1 MiB model name: 400 {err.code}: {err.body['message']}")
    else:
        raise AssertionError("a 1 MiB model name was accepted")

    # A key at its limit (CLIENT_CONCURRENT slow streams held open) stays at it, however
    # many fresh keys its owner makes up.
    noisy = openai.OpenAI(base_url=base_url, api_key="sk-sdk-noisy", timeout=30, max_retries=0)
    held = [
        noisy.chat.completions.create(model="slow-model", messages=MESSAGES, stream=True)
        for _ in range(CLIENT_CONCURRENT)
    ]

    def refused() -> bool:
        try:
            noisy.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
        except openai.RateLimitError as err:
            assert err.code == "budget_exceeded", err.body
            assert err.response.headers.get("retry-after"), "no retry-after"
            return True
        return False

    assert refused(), "the key should be at its limit"
    statuses: dict[int, int] = {}
    raw = Raw(base_url)
    for i in range(1000):
        status, _, _ = raw.post_json(
            "/chat/completions",
            {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5},
            f"Bearer sk-fresh-{i}",
        )
        statuses[status] = statuses.get(status, 0) + 1
    raw.close()
    print(f"1,000 fresh keys: {statuses}")
    assert statuses == {401: 1000}, statuses
    assert refused(), "fresh keys bought the key more room"
    for stream in held:
        stream.close()
    time.sleep(0.2)
    assert noisy.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5).choices
    print("noisy key: refused at its limit before and after 1,000 fresh keys, served once its streams closed")


def stalled_stream(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="sk-sdk-test", timeout=30, max_retries=0)
    stream = client.chat.completions.create(model="stall-model", messages=MESSAGES, stream=True)
    pieces = []
    try:
        for chunk in stream:
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
    except Exception as err:  # the SDK's or its HTTP client's error for a reset stream
        print(f"stall-model: cut after {len(pieces)} chunks ({type(err).__name__})")
    else:
        raise AssertionError("a stalled stream ended as if complete")


def upstream_budget_full(base_url: str) -> None:
    """A caller with `timeout=5` while the gateway's upstream token budget is full: a 429
    with retry-after within its timeout, not a client-side timeout. The SDK sends its
    timeout (`x-stainless-read-timeout: 5`); the gateway's stack reads it as the request's
    deadline, and its upstream budget, which cannot admit the request before it, refuses
    at once. Run last: the streams that fill the budget keep their reservations."""
    # Five clients (each within its own 200k tokens a minute) open long streams that
    # reserve 190k tokens each: 950k of the upstream account's 1M.
    fillers = []
    for key in ["sk-alice", "sk-bob", "sk-carol", "sk-sdk-noisy", "sk-sdk-burst"]:
        filler = openai.OpenAI(base_url=base_url, api_key=key, timeout=30, max_retries=0)
        stream = filler.chat.completions.create(
            model="slow-model", messages=MESSAGES, stream=True, max_tokens=190_000
        )
        next(iter(stream))  # admitted upstream: its reservation is held
        fillers.append(stream)
    client = openai.OpenAI(base_url=base_url, api_key="sk-sdk-test", timeout=5, max_retries=0)
    start = time.monotonic()
    try:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=60_000)
    except openai.RateLimitError as err:
        elapsed = time.monotonic() - start
        retry_after = err.response.headers.get("retry-after")
        code = err.body.get("code") if isinstance(err.body, dict) else None
        print(f"upstream budget full: 429 {code} after {elapsed:.3f} s, retry-after {retry_after}")
        assert retry_after and int(retry_after) >= 5, retry_after
        assert elapsed < 1, f"the refusal took {elapsed:.3f} s"
    else:
        raise AssertionError("the upstream budget had room")
    finally:
        for stream in fillers:
            stream.close()


def main(base_url: str) -> None:
    basics(base_url)
    quota_and_fallback(base_url)
    http_shapes(base_url)
    hostile_clients(base_url)
    asyncio.run(burst(base_url))
    stalled_stream(base_url)
    upstream_budget_full(base_url)
    print("openai SDK test passed")


if __name__ == "__main__":
    main(sys.argv[1])

"""The official OpenAI Python SDK, unmodified, against examples/axum_gateway.rs.

Run by .ci/sdk-test.sh, which starts the gateway and passes its base URL:

    python examples/axum_gateway_sdk_test.py http://127.0.0.1:PORT/v1

Checks a non-streamed and a streamed chat completion, and that a client API key past the
gateway's per-key budget gets the SDK's RateLimitError while another key is still served.
"""

import sys

import openai


def main(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="sk-sdk-test", timeout=30, max_retries=0)
    messages = [{"role": "user", "content": "Hello from the OpenAI Python SDK"}]

    # Non-streamed.
    completion = client.chat.completions.create(model="gpt-4o", messages=messages)
    text = completion.choices[0].message.content
    print(f"answer: {text!r}, usage: {completion.usage}")
    assert text, "empty answer"
    assert completion.choices[0].finish_reason == "stop", completion.choices[0].finish_reason
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0

    # Streamed, with the usage chunk at the end.
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=messages,
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

    # The gateway's per-key budget: a fresh key gets 5 requests a minute, then a 429.
    noisy = openai.OpenAI(base_url=base_url, api_key="sk-sdk-noisy", timeout=30, max_retries=0)
    short = dict(model="gpt-4o", messages=messages, max_tokens=5)
    for _ in range(5):
        noisy.chat.completions.create(**short)
    try:
        noisy.chat.completions.create(**short)
    except openai.RateLimitError as err:
        print(f"noisy key refused: {err.status_code}, retry-after {err.response.headers.get('retry-after')}")
        assert err.response.headers.get("retry-after"), "no retry-after"
    else:
        raise AssertionError("the sixth request of a key should be refused")
    assert client.chat.completions.create(**short).choices[0].message.content, "other keys still served"

    print("openai SDK test passed")


if __name__ == "__main__":
    main(sys.argv[1])

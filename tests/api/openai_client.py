"""Streams a chat completion from Punica with the official `openai` client, unchanged.

Run by the Rust test `service_openai::the_official_openai_python_client_streams_a_chat_completion`
with OPENAI_BASE_URL (http://host:port/v1), OPENAI_API_KEY (a tenant key) and PUNICA_MODEL (the
base model's id). Exits non-zero, with the reason, on anything unexpected.
"""

import os
import sys

import openai


def main() -> int:
    client = openai.OpenAI()  # reads OPENAI_BASE_URL and OPENAI_API_KEY
    model = os.environ["PUNICA_MODEL"]

    models = [m.id for m in client.models.list()]
    if model not in models:
        print(f"base model {model!r} missing from /v1/models: {models}", file=sys.stderr)
        return 1

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks, text, finish_reason, usage = 0, "", None, None
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish_reason = choice.finish_reason or finish_reason
    if usage is None or usage.completion_tokens != 8:
        print(f"usage not filled: {usage}", file=sys.stderr)
        return 1

    whole = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=8,
        temperature=0,
    )
    if whole.choices[0].message.content != text:
        print(f"stream {text!r} != whole {whole.choices[0].message.content!r}", file=sys.stderr)
        return 1

    try:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)
        print("an unknown model did not fail", file=sys.stderr)
        return 1
    except openai.NotFoundError:
        pass

    print(f"chunks={chunks} finish_reason={finish_reason} text={text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

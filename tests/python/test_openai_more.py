"""Issue 21 through the official `openai` client: completions' echo + logprobs (prompt
logprobs), `/v1/embeddings` (the client asks for base64 by default) and `/v1/responses`
(plain and streamed, the `output_text` the client assembles)."""

import math

import openai
import pytest

from conftest import MODEL

PROMPT = "The quick brown fox jumps over the lazy dog"
GREEDY = {"temperature": 0.0}


def test_echo_with_logprobs(client, http):
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=3, **GREEDY
    )
    choice = resp.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0.0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[: len(ids)]) == PROMPT
    # The prompt logprobs vLLM adds to the choice agree with the echoed ones.
    prompt_lps = choice.model_extra["prompt_logprobs"]
    assert prompt_lps[0] is None and len(prompt_lps) == len(ids)
    for k in range(1, len(ids)):
        entry = prompt_lps[k][str(ids[k])]
        assert abs(entry["logprob"] - lp.token_logprobs[k]) < 1e-4
        assert entry["rank"] >= 1


def test_embeddings(client):
    texts = ["A sentence about cats.", "Another one, about dogs.", "A sentence about cats."]
    resp = client.embeddings.create(model=MODEL, input=texts)
    assert resp.model == MODEL and len(resp.data) == 3
    vectors = [d.embedding for d in resp.data]
    for i, v in enumerate(vectors):
        assert resp.data[i].index == i
        assert len(v) == 576
        assert abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-4
    assert max(abs(a - b) for a, b in zip(vectors[0], vectors[2])) < 1e-5
    assert max(abs(a - b) for a, b in zip(vectors[0], vectors[1])) > 1e-2
    assert resp.usage.prompt_tokens > 0 and resp.usage.total_tokens == resp.usage.prompt_tokens
    floats = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="float")
    assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, vectors[0])) < 1e-6
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=texts[0], dimensions=32)


def test_responses(client):
    resp = client.responses.create(
        model=MODEL, instructions="Answer in one word.", input="Name a colour.",
        max_output_tokens=5, temperature=0.0,
    )
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.status in ("completed", "incomplete")
    assert resp.output[0].role == "assistant"
    assert resp.output_text
    assert 0 < resp.usage.output_tokens <= 5
    # The same conversation as a chat completion gives the same text.
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=5, temperature=0.0,
        messages=[{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "Name a colour."}],
    )
    assert resp.output_text == chat.choices[0].message.content
    if chat.choices[0].finish_reason == "length":
        assert resp.status == "incomplete"
        assert resp.incomplete_details.reason == "max_output_tokens"


def test_responses_stream(client):
    kwargs = dict(model=MODEL, input=[{"role": "user", "content": "Count to five."}],
                  max_output_tokens=12, temperature=0.0)
    full = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == full.output_text
    assert events[-1].response.output_text == full.output_text
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_123")

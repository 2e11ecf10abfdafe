"""Acceptance 4: the official `openai` client against the real agent, with vLLM's behaviour for
completions, chat, streaming, usage, sampling and errors."""

import httpx
import openai
import pytest

from conftest import API_KEY, MAX_MODEL_LEN, MODEL

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0.0}


def tokenize(http, **body):
    r = http.post("/tokenize", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def error_of(response, status, kind):
    """Checks a vLLM error reply and returns its `error` object."""
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["message"], err
    assert err["type"] == kind, err
    assert err["code"] == status, err
    return err


# ---- listing and tokenizer routes -------------------------------------------------------------


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model"
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_tokenize_detokenize_roundtrip(http):
    text = "Hello world, this is a tokenizer round trip: 12345!"
    out = tokenize(http, prompt=text)
    assert out["count"] == len(out["tokens"]) > 0
    assert out["max_model_len"] == MAX_MODEL_LEN
    r = http.post("/detokenize", json={"model": MODEL, "tokens": out["tokens"]})
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == text


def test_request_id_header_is_echoed(http):
    r = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2},
        headers={"X-Request-Id": "my-request-42"},
    )
    assert r.status_code == 200, r.text
    assert r.headers.get("x-request-id") == "my-request-42"


# ---- completions --------------------------------------------------------------------------------


def test_completion_shape_and_usage(client, http):
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, extra_body={"ignore_eos": True}, **GREEDY
    )
    assert resp.id.startswith("cmpl-")
    assert resp.object == "text_completion"
    assert resp.model == MODEL
    [choice] = resp.choices
    assert choice.index == 0
    assert choice.finish_reason == "length"
    assert choice.text
    assert resp.usage.prompt_tokens == tokenize(http, prompt=PROMPT)["count"]
    assert resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8


def test_completion_stream_matches_non_stream(client):
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=12, extra_body={"ignore_eos": True}, **GREEDY)
    full = client.completions.create(**args)
    chunks = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    *body, last = chunks
    assert last.choices == []
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert last.usage.completion_tokens == 12
    assert all(len(c.choices) == 1 and c.usage is None for c in body)
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["length"]


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True))
    assert chunks and all(len(c.choices) == 1 for c in chunks)


def test_token_id_prompts(client, http):
    ids = tokenize(http, prompt=PROMPT)["tokens"]
    other = tokenize(http, prompt="Once upon a time")["tokens"]
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, **GREEDY)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    # A batch of token-id prompts: one choice per prompt, in order.
    batch = client.completions.create(model=MODEL, prompt=[ids, other], max_tokens=8, **GREEDY)
    assert sorted(c.index for c in batch.choices) == [0, 1]
    first = next(c for c in batch.choices if c.index == 0)
    assert first.text == by_text.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + len(other)


def test_n_two_choices(client):
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.usage.completion_tokens == 12
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=7, stream=True,
        extra_body={"ignore_eos": True},
    ))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert all(texts.values())


def _stop_case(client):
    """A greedy output and a stop string taken from its middle."""
    text = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, extra_body={"ignore_eos": True}, **GREEDY
    ).choices[0].text
    words = text.split()
    assert len(words) >= 4, text
    stop = words[len(words) // 2]
    cut = text.index(stop)
    assert cut > 0
    return text, stop, cut


def test_stop_string(client):
    text, stop, cut = _stop_case(client)
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, stop=[stop], extra_body={"ignore_eos": True},
        **GREEDY,
    )
    choice = resp.choices[0]
    assert choice.text == text[:cut]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop

    kept = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, stop=stop,
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True}, **GREEDY,
    )
    assert kept.choices[0].text == text[: cut + len(stop)]

    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}, **GREEDY,
    )
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.text for c in chunks) == text[:cut]
    assert chunks[-1].finish_reason == "stop"


def test_stop_token_ids(client):
    full = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12,
        extra_body={"ignore_eos": True, "return_token_ids": True}, **GREEDY,
    )
    ids = full.choices[0].model_extra["token_ids"]
    stop_id = ids[3]
    first = ids.index(stop_id)
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12,
        extra_body={"ignore_eos": True, "return_token_ids": True, "stop_token_ids": [stop_id]},
        **GREEDY,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop_id
    assert choice.model_extra["token_ids"] == ids[: first + 1]


def test_seed_reproducibility(client):
    def sample(seed):
        return client.completions.create(
            model=MODEL, prompt="My favourite animal is", max_tokens=16, temperature=1.0,
            seed=seed, extra_body={"ignore_eos": True},
        ).choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in range(1, 5)}) >= 2


def test_completion_logprobs(client):
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=3, extra_body={"ignore_eos": True},
        **GREEDY,
    )
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0.0
        assert 1 <= len(top) <= 4
        # Greedy: the chosen token is the most likely one.
        assert abs(max(top.values()) - chosen) < 1e-4


# ---- chat ---------------------------------------------------------------------------------------


def test_chat_completion(client, http):
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, **GREEDY)
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    [choice] = resp.choices
    assert choice.message.role == "assistant"
    # The chat path equals a greedy completion of the chat-templated prompt. (With SmolLM's
    # default system prompt this Q4_1 model answers "L'Étoile, …", as candle-transformers'
    # quantized_llama does on the same tokens; without a system turn it answers "Paris".)
    templated = tokenize(http, messages=QUESTION)
    ref = client.completions.create(model=MODEL, prompt=templated["tokens"], max_tokens=20, **GREEDY)
    assert choice.message.content == ref.choices[0].text
    assert choice.message.content
    assert choice.finish_reason == ref.choices[0].finish_reason
    assert resp.usage.prompt_tokens == templated["count"]
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_stream(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, **GREEDY)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=20, stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    ))
    *body, last = chunks
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert body[0].choices[0].delta.role == "assistant"
    assert body[0].choices[0].delta.content == ""
    content = "".join(c.choices[0].delta.content or "" for c in body)
    assert content == full.choices[0].message.content
    assert last.choices == []
    assert last.usage.completion_tokens == full.usage.completion_tokens


def test_chat_logprobs_and_max_completion_tokens(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_completion_tokens=3, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True}, **GREEDY,
    )
    assert resp.usage.completion_tokens == 3
    entries = resp.choices[0].logprobs.content
    assert len(entries) == 3
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0.0 for e in entries)


def test_chat_usage_in_chat_n2(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=5, n=2, temperature=1.0, seed=3,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.usage.completion_tokens == 10


# ---- errors -------------------------------------------------------------------------------------


def test_malformed_json(http):
    r = http.post(
        "/v1/completions", content=b'{"model": "x", "prompt": ',
        headers={"content-type": "application/json"},
    )
    error_of(r, 400, "BadRequestError")
    r = http.post(
        "/v1/chat/completions", content=b"[1, 2", headers={"content-type": "application/json"}
    )
    error_of(r, 400, "BadRequestError")


def test_unknown_model(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    err = error_of(e.value.response, 404, "NotFoundError")
    assert err["param"] == "model"
    assert "no-such-model" in err["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=2)


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_too_long(client, stream):
    ids = [100 + i % 1000 for i in range(MAX_MODEL_LEN + 5)]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=ids, max_tokens=4, stream=stream)
    err = error_of(e.value.response, 400, "BadRequestError")
    assert "maximum context length" in err["message"]
    assert str(MAX_MODEL_LEN) in err["message"]


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"n": 0},
        {"max_tokens": -1},
        {"max_tokens": MAX_MODEL_LEN + 1},
        {"presence_penalty": 5.0},
        {"frequency_penalty": -5.0},
        {"logprobs": 50},
        {"extra_body": {"top_k": -5}},
        {"extra_body": {"min_p": 1.5}},
        {"extra_body": {"repetition_penalty": 0.0}},
    ],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
def test_bad_sampling_values(client, params):
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **params}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    error_of(e.value.response, 400, "BadRequestError")


@pytest.mark.parametrize(
    "params",
    [{"temperature": -0.1}, {"max_completion_tokens": -3}, {"logprobs": True, "top_logprobs": 50}],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
def test_bad_chat_values(client, params):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, **params)
    error_of(e.value.response, 400, "BadRequestError")


def test_stream_options_without_stream(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=2, stream_options={"include_usage": True}
        )
    error_of(e.value.response, 400, "BadRequestError")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=2, stream_options={"include_usage": True}
        )


def test_api_key(auth_agent):
    url = f"{auth_agent.base_url}/v1"
    wrong = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 401
    missing = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": PROMPT}, timeout=30)
    assert missing.status_code == 401
    assert "error" in missing.json()
    assert httpx.get(f"{url}/models", timeout=30).status_code == 401

    right = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    assert right.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices
    # Only /v1 paths are guarded, as in vLLM.
    assert httpx.get(f"{auth_agent.base_url}/health", timeout=30).status_code == 200

"""The OpenAI-compatible server over real HTTP, on the default model, started on a free loopback port."""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from coreinfer import SamplingConfig, SparsityConfig
from coreinfer.server import ServerSettings, create_app, serve_in_thread

pytestmark = pytest.mark.real_model
QUESTION = "What is the capital of France?"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
SETTINGS = ServerSettings(keep=0.4, max_tokens=6, max_tokens_limit=64, max_prompt_tokens=200)


@pytest.fixture(scope="module")
def server(real_engine):
    with serve_in_thread(create_app(real_engine, SETTINGS)) as url:
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=120) as http:
        yield http


def chat_body(content=QUESTION, **extra) -> dict:
    return {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(lines) -> list:
    """The payloads of an SSE stream: JSON objects, then the closing "[DONE]"."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events) -> str:
    chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
    return "".join(c["choices"][0].get("delta", {}).get("content") or c["choices"][0].get("text", "") for c in chunks)


def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["SmolLM2-135M-Instruct"]


def test_completion_matches_the_engine(client, real_engine):
    prompt = "The capital of France is"
    response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "keep": 0.5})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = real_engine.generate(
        prompt, SparsityConfig(keep=0.5, rule="griffin"), SamplingConfig(max_new_tokens=5), chat=False
    )
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": 5,
                             "total_tokens": expected.prompt_tokens + 5}
    assert body["coreinfer"]["keep"] == 0.5
    assert body["coreinfer"]["ffn_density"] == pytest.approx(expected.ffn_density, abs=1e-5)
    assert body["coreinfer"]["decode_tok_s"] > 0


def test_chat_applies_the_template_to_the_whole_conversation(client, real_engine):
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": QUESTION},
    ]
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "dense": True})
    assert response.status_code == 200, response.text
    body = response.json()
    ids = real_engine.encode_chat(messages)
    expected = real_engine.generate_ids([ids], None, SamplingConfig(max_new_tokens=4))[0]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["coreinfer"]["dense"] is True and body["coreinfer"]["ffn_density"] == 1.0


def test_chat_defaults_come_from_the_server(client, real_engine):
    body = client.post("/v1/chat/completions", json=chat_body()).json()
    expected = real_engine.generate(QUESTION, SparsityConfig(keep=0.4, rule="griffin"), SamplingConfig(max_new_tokens=6))
    assert body["choices"][0]["message"]["content"] == expected.text
    assert body["usage"]["completion_tokens"] == expected.new_tokens
    assert body["coreinfer"]["keep"] == 0.4 and body["coreinfer"]["rule"] == "griffin"


def test_streaming_chat_sends_openai_chunks_then_done(client):
    full = client.post("/v1/chat/completions", json=chat_body(max_tokens=5)).json()
    body = chat_body(max_tokens=5, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) >= 2
    assert streamed_text(chunks) == full["choices"][0]["message"]["content"]
    finish = chunks[-2]
    assert finish["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert finish["coreinfer"]["ffn_density"] == full["coreinfer"]["ffn_density"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_streaming_completion(client):
    body = {"prompt": "The capital of France is", "max_tokens": 4}
    full = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
    assert streamed_text(events[:-1]) == full["choices"][0]["text"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_equal_sequential_ones(client):
    bodies = [
        ("/v1/chat/completions", chat_body(max_tokens=5, keep=0.3)),
        ("/v1/chat/completions", chat_body("Name a primary colour.", max_tokens=5, dense=True)),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 5, "keep": 0.7, "rule": "magnitude"}),
        ("/v1/chat/completions", chat_body("Name a primary colour.", max_tokens=5, keep=0.5)),
    ]

    def answer(item):
        path, body = item
        choice = client.post(path, json=body).json()["choices"][0]
        return choice.get("text", choice.get("message", {}).get("content"))

    sequential = [answer(item) for item in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        concurrent = list(pool.map(answer, bodies))
    assert concurrent == sequential and all(sequential)


BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}', 400, "not valid JSON"),
    ("/v1/chat/completions", chat_body(keep=1.5), 400, "keep"),
    ("/v1/chat/completions", chat_body(keep=0), 400, "keep"),
    ("/v1/chat/completions", chat_body(alpha=-0.1), 400, "alpha"),
    ("/v1/chat/completions", chat_body(temperature=-1), 400, "temperature"),
    ("/v1/chat/completions", chat_body(top_p=1.5), 400, "top_p"),
    ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens"),
    ("/v1/chat/completions", chat_body(max_tokens=65), 400, "at most 64"),
    ("/v1/chat/completions", chat_body(rule="bogus"), 400, "unknown selection rule"),
    ("/v1/chat/completions", chat_body(method="similarity"), 400, "not supported yet"),
    ("/v1/chat/completions", chat_body(model="gpt-4"), 404, "does not exist"),
    ("/v1/chat/completions", chat_body(n=17), 400, "at most 16"),
    ("/v1/chat/completions", chat_body(n=129), 400, "n"),
    ("/v1/chat/completions", chat_body([{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]), 400,
     "'image_url' are not supported"),
    ("/v1/chat/completions", chat_body([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]), 400,
     "'input_audio' are not supported"),
    ("/v1/chat/completions", chat_body([{"type": "text"}]), 400, "a text part needs a string 'text'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "a user message needs content"),
    ("/v1/chat/completions", chat_body(logprobs=True), 400, "logprobs"),
    ("/v1/chat/completions", chat_body(top_logprobs=2), 400, "top_logprobs"),
    ("/v1/chat/completions", chat_body(presence_penalty=0.5), 400, "presence_penalty"),
    ("/v1/chat/completions", chat_body(frequency_penalty=-1), 400, "frequency_penalty"),
    ("/v1/chat/completions", chat_body(logit_bias={"50256": -100}), 400, "logit_bias"),
    ("/v1/chat/completions", chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400,
     "response_format"),
    ("/v1/chat/completions", chat_body(tools=[TOOL], tool_choice="required"), 400, "tool_choice"),
    ("/v1/chat/completions", chat_body(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}}),
     400, "tool_choice"),
    ("/v1/chat/completions", chat_body(modalities=["text", "audio"]), 400, "modalities"),
    ("/v1/chat/completions", chat_body(max_completion_tokens=65), 400, "max_completion_tokens is 65"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 1}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "suffix": "end"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "Hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": []}, 400, "empty"),
    ("/v1/completions", {"prompt": ["one", 3]}, 400, "prompt[1]"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, 400, "prompt[1]: the prompt is empty"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": ["Hi", "word " * 300]}, 400, "prompt[1]: the prompt has"),
    ("/v1/completions", {"prompt": ["a"] * 9, "n": 2}, 400, "at most 16"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", chat_body("word " * 300), 400, "at most"),
    ("/v1/completions", {"prompt": "   "}, 400, "empty"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
]


def post(client, path, body):
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"Content-Type": "application/json"})
    return client.post(path, json=body)


def test_bad_requests_are_rejected_while_another_streams(client, server):
    body = chat_body(max_tokens=8, keep=0.5)
    reference = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with httpx.Client(base_url=server, timeout=120) as other:
        with other.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))  # the request is in flight
            for path, bad, status, message in BAD_REQUESTS:
                response = post(client, path, bad)
                assert response.status_code == status, (bad, response.text)
                error = response.json()["error"]
                assert message in error["message"] or message == error["param"], (bad, error)
                assert error["type"] == "invalid_request_error"
            events = sse_events([first, *lines])
    assert events[-1] == "[DONE]" and streamed_text(events[:-1]) == reference


def test_readme_openai_example_runs_as_written(server, capsys):
    """The README's client example, pointed at this test's port instead of 8000."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Server", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "http://127.0.0.1:8000/v1" in code
    exec(compile(code.replace("http://127.0.0.1:8000", server), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert "Paris" in out[0]
    assert re.fullmatch(r"\d+ tokens; ffn_density 0\.\d+", out[1])
    assert out[2].strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--keep", "1.5"], "keep must lie in"),
        (["serve", "--rule", "bogus"], "unknown selection rule"),
        (["serve", "--max-tokens", "100", "--max-tokens-limit", "50"], "max_tokens must lie in"),
    ],
)
def test_serve_rejects_bad_defaults_before_loading(args, message):
    from typer.testing import CliRunner

    from coreinfer.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in result.output


def test_a_stream_left_early_frees_its_slot():
    """The client going away cancels the generation at its next step, freeing its slot."""
    import asyncio

    from conftest import tiny_model

    from coreinfer import Engine
    from coreinfer.scheduler import Scheduler
    from coreinfer.server import _Job, _Stream

    engine = Engine(tiny_model("llama"), tokenizer=None, name="tiny", weights="fp32", backend="lean")
    scheduler = Scheduler(engine, max_batch=1)
    job = _Job(True, [[1, 2, 3]], None, SamplingConfig(max_new_tokens=200), "m", True, False, "chatcmpl-test", 0)

    async def read_two_tokens():
        stream = _Stream(scheduler, job)
        await stream.admitted()
        events = stream.events()
        await anext(events), await anext(events)
        await events.aclose()
        return stream.submitted[0][0]

    try:
        sub = asyncio.run(read_two_tokens())
        assert sub.done.wait(10) and sub.cancelled
        after = scheduler.generate([[4, 5]], None, SamplingConfig(max_new_tokens=2), timeout=10)
        assert after[0].new_tokens == 2 and scheduler.active == 0
    finally:
        scheduler.close()


# What OpenAI's own client sends (openai.OpenAI against the served app).


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(oai, content=QUESTION, **extra):
    return oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": content}],
                                       **extra)


def ask(oai, content=QUESTION, **extra) -> str:
    return chat(oai, content, **extra).choices[0].message.content


def test_text_content_parts_are_joined(oai):
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    assert ask(oai, parts) == ask(oai, QUESTION) and ask(oai, QUESTION)


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "file", "file": {"file_id": "file-abc"}},
])
def test_non_text_content_parts_get_a_400_naming_their_type(oai, part):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        ask(oai, [{"type": "text", "text": "What is this?"}, part])
    assert f"content parts of type {part['type']!r} are not supported" in str(err.value)
    assert err.value.body["param"] == "messages[0].content[1]"


def test_openai_fields_that_change_nothing_here_are_accepted(oai):
    plain = ask(oai, max_tokens=5)
    accepted = dict(
        max_completion_tokens=5, seed=7, user="u-1", metadata={"k": "v"}, store=False, logprobs=False,
        top_logprobs=0, response_format={"type": "text"}, presence_penalty=0, frequency_penalty=0.0,
        logit_bias={}, parallel_tool_calls=True, service_tier="auto", reasoning_effort="low",
        modalities=["text"], prediction={"type": "content", "content": "Paris"}, stop=None, n=1,
        tools=[TOOL], tool_choice="auto", verbosity="low", temperature=0, top_p=1,
        stream_options={"include_usage": True},  # only read while streaming
        extra_body={"prompt_cache_key": "abc", "safety_identifier": "s"},
    )
    assert ask(oai, **accepted) == plain
    assert ask(oai, max_tokens=5, top_p=0, temperature=1.3) == plain  # top_p 0 keeps the likeliest token only


def test_a_conversation_with_tool_calls_names_refusals_and_developer_turns_is_accepted(oai, real_engine):
    call = {"id": "call_1", "type": "function", "function": {"name": "capital", "arguments": '{"country": "France"}'}}
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}], "name": "ops"},
        {"role": "user", "content": "Can you hack my neighbour's wifi?", "name": "alice"},
        {"role": "assistant", "content": None, "refusal": "I can't help with that."},
        {"role": "user", "content": QUESTION, "name": "alice"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "Paris"}]},
    ]
    reply = oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=4,
                                        tools=[TOOL], extra_body={"dense": True})
    template = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Can you hack my neighbour's wifi?"},
        {"role": "assistant", "content": "I can't help with that."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "", "tool_calls": [
            {**call, "function": {"name": "capital", "arguments": {"country": "France"}}}]},
        {"role": "tool", "content": "Paris"},
    ]
    expected = real_engine.generate_ids([real_engine.encode_chat(template)], None, SamplingConfig(max_new_tokens=4))[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_tokens


def test_max_completion_tokens_bounds_the_answer(oai):
    reply = chat(oai, "Tell me a long story.", max_completion_tokens=3)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_stop_as_a_string_or_a_list(oai):
    plain = ask(oai, max_tokens=6)
    word = plain.split()[1]
    for stop in (word, ["\u2603", word]):
        reply = chat(oai, max_tokens=6, stop=stop)
        assert reply.choices[0].message.content == plain[: plain.index(word)]
        assert reply.choices[0].finish_reason == "stop"


def test_n_answers_as_one_batch(oai):
    greedy, single = chat(oai, n=3, max_tokens=5), chat(oai, max_tokens=5)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert [c.message.content for c in greedy.choices] == [single.choices[0].message.content] * 3
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert greedy.usage.completion_tokens == 3 * single.usage.completion_tokens
    # Seeded sampling: answer k is what n=1 gives with seed + k, so the n answers are not copies.
    sampled = chat(oai, n=2, max_tokens=8, temperature=1.0, seed=11)
    alone = [ask(oai, max_tokens=8, temperature=1.0, seed=seed) for seed in (11, 12)]
    assert [c.message.content for c in sampled.choices] == alone


PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3,"]


def test_a_list_of_prompts_is_answered_as_one_batch(oai, real_engine):
    batch = oai.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS, max_tokens=6)
    singles = [oai.completions.create(model="SmolLM2-135M-Instruct", prompt=p, max_tokens=6) for p in PROMPTS]
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]
    assert [c.finish_reason for c in batch.choices] == [s.choices[0].finish_reason for s in singles]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert all(c.coreinfer["ffn_density"] < 1 for c in batch.choices)
    # Token ids: a list of id lists, and a single id list, answer as their text does.
    ids = [real_engine.encode(p, chat=False) for p in PROMPTS]
    by_ids = oai.completions.create(model="SmolLM2-135M-Instruct", prompt=ids, max_tokens=6)
    assert [c.text for c in by_ids.choices] == [c.text for c in batch.choices]
    one = oai.completions.create(model="SmolLM2-135M-Instruct", prompt=ids[0], max_tokens=6)
    assert one.choices[0].text == batch.choices[0].text
    # n answers per prompt come prompt by prompt; echo puts each prompt before its answers.
    twice = oai.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS[:2], max_tokens=6, n=2, echo=True)
    echoed = [p + s.choices[0].text for p, s in zip(PROMPTS[:2], singles)]
    assert [c.text for c in twice.choices] == [echoed[0], echoed[0], echoed[1], echoed[1]]


def test_streaming_a_batch_sends_each_choice_by_index_then_usage(oai):
    full = oai.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS, max_tokens=6)
    chunks = list(oai.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS, max_tokens=6, stream=True,
                                         stream_options={"include_usage": True}))
    texts, finish = ["", "", ""], [None, None, None]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == [c.text for c in full.choices] and finish == [c.finish_reason for c in full.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    # Chat with n: each choice's role first, then its text.
    stream = chat(oai, n=2, max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert [c.choices[0].delta.role for c in chunks[:2]] == ["assistant", "assistant"]
    answers = ["", ""]
    for chunk in chunks[:-1]:
        answers[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    single = chat(oai, max_tokens=5)
    assert answers == [single.choices[0].message.content] * 2
    assert chunks[-1].usage.completion_tokens == 2 * single.usage.completion_tokens


def test_unknown_rule_error_lists_every_rule(oai):
    import openai

    from coreinfer.config import RULE_NAMES, SELECTOR_RULES
    from coreinfer.selection import RULES

    assert set(RULE_NAMES) == {*RULES, *SELECTOR_RULES} and "adaptive" in RULE_NAMES
    with pytest.raises(openai.BadRequestError) as err:
        ask(oai, extra_body={"rule": "bogus"})
    assert err.value.body["param"] == "rule"
    for rule in RULE_NAMES:
        assert repr(rule) in err.value.body["message"]

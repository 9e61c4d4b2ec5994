"""lorakit.serve through the official `openai` client: parity with in-process generation, mixed-adapter
batches, streaming, hot load/unload, path confinement, limits and errors in OpenAI's shape.

One tiny Llama base (saved to a temp dir) and adapters of ranks 2, 4, 6 and 8 with random B factors, so
every adapter answers differently from the base. The server runs in-process on a free loopback port.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import build_tiny, randomize_lora, save_tiny_base  # noqa: E402
from lorakit.adapters import load_lora_adapter, save_lora_adapter  # noqa: E402
from lorakit.config import ConfigError, LoraConfig, QuantConfig  # noqa: E402
from lorakit.generate import (  # noqa: E402
    GenerationConfig,
    RunningBatch,
    decode,
    generate,
    generate_detailed,
    left_pad,
    next_tokens,
    next_tokens_per_row,
    render_chat_prompt,
)
from lorakit.lora import adapter_configs, inject_lora  # noqa: E402
from lorakit.models import load_model, load_tokenizer  # noqa: E402
from lorakit.quant import quantize_model  # noqa: E402
from lorakit.serve import (  # noqa: E402
    BackgroundServer,
    EngineStats,
    Plan,
    ServeError,
    ServeSettings,
    build_app,
    confine_path,
    create_state,
    fit_max_tokens,
    parse_adapter_specs,
)

KEY = "sk-test"
PROMPTS = ["the cat sat on the", "a big dog ran", "it was very happy and"]
ALPHA_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                  "{% if add_generation_prompt %}assistant : {% endif %}")
ADAPTERS = {"alpha": (4, "all-linear"), "beta": (8, ["q_proj", "v_proj"]), "gamma": (2, "attention"),
            "extra": (6, "all-linear")}
STARTUP = ("alpha", "beta", "gamma")


def save_adapter(base: str, out: Path, rank: int, targets, seed: int, template: str | None = None) -> Path:
    model = load_model(base)
    inject_lora(model, LoraConfig(r=rank, alpha=2 * rank, target_modules=targets))
    randomize_lora(model, seed)
    return save_lora_adapter(model, out, chat_template=template)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Base, adapter root, and the adapters the path checks must refuse."""
    tmp = tmp_path_factory.mktemp("serve")
    base = str(save_tiny_base(tmp / "base"))
    root = tmp / "root"
    for seed, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        save_adapter(base, root / name, rank, targets, seed + 1, ALPHA_TEMPLATE if name == "alpha" else None)
    outside = save_adapter(base, tmp / "outside" / "adapter", 4, "all-linear", 9)
    (root / "link").symlink_to(outside, target_is_directory=True)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    for name in ("adapter_config.json", "lorakit.json"):
        (sneaky / name).write_text((outside / name).read_text())
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    other = tmp / "other-base"
    save_tiny_base(other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    import transformers as tf

    tf.LlamaForCausalLM(tf.LlamaConfig.from_pretrained(other)).save_pretrained(other)
    save_adapter(str(other), root / "foreign", 4, "all-linear", 11)
    return {"tmp": tmp, "base": base, "root": root, "outside": outside, "tok": load_tokenizer(base), "models": {}}


def reference_model(world, name: str, quant: bool = False):
    """The in-process model the server must agree with: the base (NF4 if asked) plus adapter `name`."""
    key = (name, quant)
    if key not in world["models"]:
        model = load_model(world["base"])
        if quant:
            quantize_model(model, QuantConfig(), progress=False)
        if name != world["base"]:
            load_lora_adapter(model, world["root"] / name)
        world["models"][key] = model
    return world["models"][key]


def reference(world, name: str, prompts, max_new: int, quant: bool = False) -> list[str]:
    return generate(reference_model(world, name, quant), world["tok"], prompts, GenerationConfig(max_new_tokens=max_new))


@pytest.fixture(scope="module")
def server(world):
    settings = ServeSettings(
        base=world["base"], adapters={n: str(world["root"] / n) for n in STARTUP}, adapter_roots=[str(world["root"])],
        api_key=KEY, max_batch=8, max_tokens=64, max_prompt_tokens=48, max_body_bytes=20_000, device="cpu",
        dtype="float32",
    )
    state = create_state(settings)
    with BackgroundServer(build_app(state)) as srv:
        yield srv, state
    state.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0].url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


# --------------------------------------------------------------------------- the OpenAI API


def test_model_list_shows_base_and_adapters(client, world):
    models = client.models.list().data
    assert [m.id for m in models] == [world["base"], *STARTUP]
    extra = {m.id: m.model_dump() for m in models}
    assert extra["alpha"]["parent"] == world["base"] and extra["alpha"]["lora_rank"] == 4
    assert extra["beta"]["lora_rank"] == 8 and extra[world["base"]]["parent"] is None


def test_greedy_completions_equal_the_in_process_model(client, world):
    answers = {}
    for name in [world["base"], *STARTUP]:
        out = client.completions.create(model=name, prompt=PROMPTS, max_tokens=8, temperature=0)
        assert [c.index for c in out.choices] == [0, 1, 2]
        answers[name] = [c.text for c in out.choices]
        assert answers[name] == reference(world, name, PROMPTS, 8), name
        ids = world["tok"](PROMPTS)["input_ids"]
        assert out.usage.prompt_tokens == sum(len(i) for i in ids)
        assert out.usage.completion_tokens == sum(len(g.token_ids) for g in generate_detailed(
            reference_model(world, name), world["tok"], PROMPTS, GenerationConfig(max_new_tokens=8)))
    assert len({tuple(a) for a in answers.values()}) == 4  # every adapter changes the answers
    assert sum(len(t) for t in answers["alpha"]) > 0


def test_chat_uses_the_adapters_saved_template_else_the_tokenizers(client, world):
    tok = world["tok"]
    messages = [{"role": "system", "content": "be very happy"}, {"role": "user", "content": "the cat sat"}]
    assert render_chat_prompt(tok, messages, ALPHA_TEMPLATE) != render_chat_prompt(tok, messages)
    for name, template in (("alpha", ALPHA_TEMPLATE), ("beta", None), (world["base"], None)):
        out = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
        prompt = render_chat_prompt(tok, messages, template)
        assert out.choices[0].message.content == reference(world, name, [prompt], 10)[0], name
        assert out.choices[0].message.role == "assistant"
        assert out.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    parts = [{"role": "user", "content": [{"type": "text", "text": "the cat "}, {"type": "text", "text": "sat"}]}]
    out = client.chat.completions.create(model="beta", messages=parts, max_tokens=10, temperature=0)
    joined = render_chat_prompt(tok, [{"role": "user", "content": "the cat sat"}])
    assert out.choices[0].message.content == reference(world, "beta", [joined], 10)[0]


def test_streaming_equals_the_whole_answer(client, world):
    whole = client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens

    messages = [{"role": "user", "content": "a red dog"}]
    whole = client.chat.completions.create(model="alpha", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="alpha", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert len(chunks) >= 3  # role, at least one piece of text, the finish


def test_n_choices_seeded_sampling_and_stop_strings(client, world):
    def sample(seed):
        out = client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=3, seed=seed)
        return [c.text for c in out.choices]

    first = sample(5)
    assert sample(5) == first and len(set(first)) > 1  # reproducible, and the n choices differ
    greedy = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0]
    word = greedy.text.split()[2] if len(greedy.text.split()) > 2 else None
    if word:  # cut at a stop string: the text before it, finish_reason "stop"
        out = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[word])
        assert out.choices[0].text == greedy.text[: greedy.text.find(word)] and out.choices[0].finish_reason == "stop"
    long = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 20 and long.choices[0].finish_reason == "length"


def test_concurrent_requests_for_different_adapters_share_each_forward(client, world, server):
    state = server[1]
    state.engine.stats = EngineStats()
    names = [world["base"], *STARTUP] * 3

    def ask(i):
        return client.completions.create(model=names[i], prompt=PROMPTS[i % 3], max_tokens=10,
                                         temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(ask, range(len(names))))
    for i, name in enumerate(names):
        assert answers[i] == reference(world, name, [PROMPTS[i % 3]], 10)[0], (i, name)
    assert state.engine.stats.max_adapters_per_forward >= 3  # base and adapters in one forward
    assert state.engine.stats.max_rows_per_forward >= 4


# --------------------------------------------------------------------------- errors


def test_errors_come_in_openais_shape(client, server, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="the", max_tokens=2)
    assert "alpha" in e.value.message and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="limit of 64") as e:
        client.completions.create(model="alpha", prompt="the", max_tokens=1000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="at most 48"):
        client.completions.create(model="alpha", prompt="the cat " * 30, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="alpha", prompt="the", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="alpha", prompt="the", max_tokens=2, logprobs=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="alpha", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="token-id"):
        client.completions.create(model="alpha", prompt=[1, 2, 10_000], max_tokens=2)
    wrong = openai.OpenAI(base_url=server[0].url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

    big = http.post("/v1/completions", json={"model": "alpha", "prompt": "the " * 10_000})
    assert big.status_code == 413 and "20000" in big.json()["error"]["message"]
    chunked = http.post("/v1/completions", content=iter([b'{"model": "alpha", "prompt": "' + b"a " * 15_000 + b'"}']))
    assert chunked.status_code == 413
    bad = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404 and "routes" in missing.json()["error"]["message"]
    assert httpx.get(server[0].url + "/health").json()["status"] == "ok"  # no key needed


def test_context_window_is_checked_or_filled():
    settings = ServeSettings(base="x", max_tokens=100, max_prompt_tokens=100)
    plan = Plan("chat", "x", None, [[1] * 90], GenerationConfig())
    fit_max_tokens(plan, None, settings, context=128)
    assert plan.config.max_new_tokens == 38  # not given: the rest of the context
    with pytest.raises(ServeError, match="maximum context length is 128"):
        fit_max_tokens(plan, 50, settings, context=128)
    completion = Plan("completion", "x", None, [[1] * 10], GenerationConfig())
    fit_max_tokens(completion, None, settings, context=128)
    assert completion.config.max_new_tokens == 16  # OpenAI's default for /v1/completions


def test_a_failing_request_does_not_take_the_server_down(client, server, monkeypatch):
    import lorakit.serve.engine

    def broken_sampler(*args, **kwargs):
        monkeypatch.undo()
        raise RuntimeError("simulated sampler bug")

    monkeypatch.setattr(lorakit.serve.engine, "next_tokens_per_row", broken_sampler)
    with pytest.raises(openai.InternalServerError, match="simulated sampler bug"):
        client.completions.create(model="gamma", prompt="the cat", max_tokens=4)
    assert server[1].engine._thread.is_alive()

    model = server[1].model
    original = model.forward

    def broken(*args, **kwargs):
        model.forward = original
        raise RuntimeError("simulated device failure")

    model.forward = broken
    with pytest.raises(openai.InternalServerError, match="simulated device failure"):
        client.completions.create(model="alpha", prompt="the cat", max_tokens=4)
    assert client.completions.create(model="alpha", prompt="the cat", max_tokens=4, temperature=0).choices[0].text is not None

    with client.completions.create(model="beta", prompt="the cat", max_tokens=60, stream=True,
                                   extra_body={"ignore_eos": True}) as stream:
        next(iter(stream))  # the client walks away after one chunk
    for _ in range(500):
        if server[1].engine.load()["running"] == 0:
            break
        time.sleep(0.01)
    assert server[1].engine.load() == {"running": 0, "waiting": 0}  # the engine dropped the orphan


# --------------------------------------------------------------------------- adapters at runtime


def test_hot_load_serves_the_adapter_and_unload_waits_for_running_requests(client, world, http, server):
    ok = http.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "extra"})
    assert ok.status_code == 200, ok.text
    assert "extra" in [m.id for m in client.models.list().data]
    out = client.completions.create(model="extra", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in out.choices] == reference(world, "extra", PROMPTS, 8)

    state = server[1]
    long = {"model": "extra", "prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0}
    with client.completions.create(**long, stream=True, extra_body={"ignore_eos": True}) as stream:
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        with state.engine.model_lock:  # the engine waits at its next forward: the request is still running
            key = state.bank.lookup("extra").key
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
            assert "extra" not in [m.id for m in client.models.list().data]
            assert key in adapter_configs(state.model)  # hidden, not deleted: a request still uses it
        text += "".join(c.choices[0].text for c in chunks)
    assert key not in adapter_configs(state.model)  # deleted once its last request finished
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt="the", max_tokens=2)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 404

    again = http.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": str(world["root"] / "extra")})
    assert again.status_code == 200  # an absolute path inside the root, under a name used before
    fresh = client.completions.create(**long, extra_body={"ignore_eos": True})
    assert text == fresh.choices[0].text and fresh.usage.completion_tokens == 60  # same weights to the end
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200


@pytest.mark.parametrize("name,path,status,message", [
    ("x1", "../outside/adapter", 400, "contains '..'"),
    ("x2", "{outside}", 400, "outside the adapter roots"),
    ("x3", "link", 400, "outside the adapter roots"),
    ("x4", "sneaky", 400, "symlink"),
    ("x5", "missing", 404, "no such adapter directory"),
    ("x6", "foreign", 400, "trained for base"),
    ("alpha", "extra", 400, "already loaded"),
    ("bad name!", "extra", 400, "not allowed"),
])
def test_adapter_loads_are_confined_and_checked(http, client, world, name, path, status, message):
    response = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path.format(**world)})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert name not in [m.id for m in client.models.list().data] or name == "alpha"


def test_confine_path_without_roots_and_with_symlinked_root(tmp_path):
    with pytest.raises(ServeError, match="--adapter-root"):
        confine_path("anything", [])
    real = tmp_path / "real"
    (real / "a").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    assert confine_path("a", [(tmp_path / "alias").resolve()]) == (real / "a").resolve()


# --------------------------------------------------------------------------- NF4 base, CLI, batching parts


def test_nf4_base_serves_adapters_of_different_ranks_like_in_process(world):
    settings = ServeSettings(base=world["base"], quant="nf4", adapters={"alpha": str(world["root"] / "alpha"),
                             "beta": str(world["root"] / "beta")}, device="cpu", dtype="float32")
    state = create_state(settings)
    try:
        with BackgroundServer(build_app(state)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
            names = [world["base"], "alpha", "beta"]
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                outs = list(pool.map(lambda n: client.completions.create(model=n, prompt=PROMPTS, max_tokens=8,
                                                                         temperature=0), names))
            for name, out in zip(names, outs, strict=True):
                assert [c.text for c in out.choices] == reference(world, name, PROMPTS, 8, quant=True), name
    finally:
        state.close()


def test_cli_flags_and_settings_validation(world):
    from lorakit.cli import build_parser, cmd_serve

    args = build_parser().parse_args(["serve", "--base", "demo", "--adapter", "a=runs/a", "--adapter", "runs/b/",
                                      "--quant", "nf4", "--max-batch", "4"])
    assert args.func is cmd_serve and args.quant == "nf4" and args.max_batch == 4
    assert parse_adapter_specs(args.adapter) == {"a": "runs/a", "b": "runs/b/"}
    with pytest.raises(ConfigError, match="already used"):
        parse_adapter_specs(["a=x", "a=y"])
    problems = ServeSettings(base="b", max_batch=0, port=70000, adapter_roots=["/no/such/dir"],
                             adapters={"b": "x", "bad name": "y"}).problems()
    assert len(problems) == 5 and any("max_batch" in p for p in problems)
    with pytest.raises(ConfigError, match="was not loaded"):
        create_state(ServeSettings(base=world["base"], adapters={"f": str(world["root"] / "foreign")}, device="cpu"))


def test_running_batch_rows_joining_and_leaving_equal_unbatched_decoding():
    model = build_tiny("llama")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 11, 3, 8, 14)]
    lengths = [6, 3, 9, 4, 7]
    expected = [decode(model, *left_pad([p], 0), GenerationConfig(max_new_tokens=n), set(), 0)[0].token_ids
                for p, n in zip(prompts, lengths, strict=True)]  # each prompt alone, no stop token
    batch, rows, out, pending = RunningBatch(model), [], {}, list(range(5))
    for step in range(40):  # bounded: every row is done well before
        if pending and step % 2 == 0:  # a new row joins every other step, while others run and leave
            new = [pending.pop(0)] + ([pending.pop(0)] if pending and step == 4 else [])
            logits = batch.prefill([prompts[i] for i in new], pad_id=0)
            rows += new
            for i, row in enumerate(new):
                out[row] = [int(logits[i].argmax())]
        elif rows:
            logits = batch.step(torch.tensor([out[r][-1] for r in rows]))
            for i, row in enumerate(rows):
                out[row].append(int(logits[i].argmax()))
        keep = [i for i, r in enumerate(rows) if len(out[r]) < lengths[r]]
        batch.keep(keep)
        rows = [rows[i] for i in keep]
        if not rows and not pending:
            break
    assert [out[i] for i in range(5)] == expected
    assert len(batch) == 0


def test_next_tokens_per_row_uses_each_rows_settings():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 40, generator=g)
    seen = torch.zeros(3, 40, dtype=torch.bool)
    seen[1, logits[1].argmax()] = True
    configs = [GenerationConfig(), GenerationConfig(repetition_penalty=50.0),
               GenerationConfig(temperature=1.0, top_k=5, seed=1)]
    chosen = next_tokens_per_row(logits, configs, list(seen), [None, None, torch.Generator().manual_seed(1)])
    assert chosen[0] == logits[0].argmax()
    assert chosen[1] != logits[1].argmax()  # the penalty pushed the seen token down
    assert chosen[2] == next_tokens(logits[2:3], configs[2], torch.Generator().manual_seed(1))[0]


def test_next_tokens_per_row_samples_rows_with_the_same_settings_together():
    """Unseeded rows sharing temperature/top_k/top_p are sampled in one call, each within its own top-k."""
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(4))
    configs = [GenerationConfig(temperature=0.7, top_k=2)] * 6 + [GenerationConfig(temperature=1.0, top_k=1)] * 2
    for _ in range(5):
        chosen = next_tokens_per_row(logits, configs, [None] * 8, [None] * 8)
        top2 = logits.topk(2, dim=-1).indices
        assert all(chosen[i] in top2[i] for i in range(6))
        assert torch.equal(chosen[6:], logits[6:].argmax(-1))  # top_k=1 leaves each row its own best token


# --------------------------------------------------------------------------- a client that leaves, a port in use


def test_a_non_streaming_request_stops_generating_when_its_client_hangs_up(server, world, monkeypatch):
    """The client closes its connection mid-answer: the engine cancels its job instead of generating to
    max_tokens for nobody (each decode step is slowed so a full answer would take ~6 s)."""
    import socket

    srv, state = server
    slow_step = state.engine._step

    def step() -> None:
        time.sleep(0.1)
        slow_step()

    monkeypatch.setattr(state.engine, "_step", step)
    body = json.dumps({"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 60, "ignore_eos": True}).encode()
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 10
        while state.engine.load()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state.engine.load()["running"] == 1
    hung_up = time.monotonic()
    while state.engine.load()["running"] and time.monotonic() - hung_up < 5:
        time.sleep(0.05)
    assert state.engine.load() == {"running": 0, "waiting": 0}
    assert time.monotonic() - hung_up < 2.5  # cancelled within a few polls, not after 60 slowed steps


def test_serve_binds_before_it_says_it_serves(capsys):
    import socket

    from lorakit.cli import main

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code = main(["serve", "--base", "./not-loaded-when-the-port-is-taken", "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 2 and "serving" not in out
    assert f"--port {port}: cannot listen there" in err and "pick another --port" in err

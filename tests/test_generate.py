"""generate.py: parity with transformers' generate, padding invariance, stopping, sampling filters."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import VOCAB, build_tiny
from lorakit.demo import CHATML_TEMPLATE, build_tokenizer, pretraining_corpus
from lorakit.generate import (
    GenerationConfig,
    apply_repetition_penalty,
    decode,
    filter_logits,
    generate,
    generate_detailed,
    left_pad,
    next_tokens,
    render_chat_prompt,
    stop_token_ids,
)


@functools.cache
def tokenizer():
    """A byte-level BPE tokenizer with ChatML specials (ids 0-2), built in well under a second."""
    return build_tokenizer(pretraining_corpus(300, seed=5), vocab_size=300)


def prompts(seed: int = 0, lengths: tuple[int, ...] = (5, 9, 3, 12)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new: int, stop: set[int], **kw) -> list[int]:
    """transformers' own greedy decoding of one unpadded prompt, stop token removed."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=sorted(stop), pad_token_id=0, **kw)
    new = out[0, len(prompt):].tolist()
    for i, token in enumerate(new):
        if token in stop:
            return new[:i]
    return new


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_batched_left_padded_equals_transformers_unbatched(kind):
    model, tok = build_tiny(kind), tokenizer()
    stop = stop_token_ids(tok, model)
    rows = prompts()
    ours = generate_detailed(model, tok, rows, GenerationConfig(max_new_tokens=10), batch_size=4)
    for prompt, gen in zip(rows, ours, strict=True):
        assert gen.token_ids == hf_greedy(model, prompt, 10, stop), kind
        assert gen.prompt_tokens == len(prompt)
    assert sum(len(g.token_ids) for g in ours) >= 20  # not a trivial match of empty outputs


def test_batched_equals_unbatched_with_repetition_penalty():
    model, tok = build_tiny("llama", seed=3), tokenizer()
    config = GenerationConfig(max_new_tokens=8, repetition_penalty=1.7)
    rows = prompts(seed=4)
    batched = generate_detailed(model, tok, rows, config, batch_size=4)
    single = [generate_detailed(model, tok, [r], config)[0] for r in rows]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    stop = stop_token_ids(tok, model)
    assert batched[0].token_ids == hf_greedy(model, rows[0], 8, stop, repetition_penalty=1.7)


def test_repetition_penalty_matches_transformers_processor():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3  # both signs
    ids = torch.randint(0, 50, (3, 7), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.7), (10, 0.9), (0, 0.05)])
def test_filters_match_transformers_warpers(top_k, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 64, generator=g) * 2
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(torch.isinf(filter_logits(logits, top_k, top_p)), torch.isinf(expected))


def test_sampling_stays_inside_filters_and_is_seeded():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)  # one row per draw
    probs = logits[0].softmax(-1)  # p ≈ .64 .23 .09 .03 .01 .004

    def draw(**kw):
        config = GenerationConfig(temperature=1.0, **kw)
        return next_tokens(logits, config, torch.Generator().manual_seed(0))

    assert set(draw(top_k=2).tolist()) == {0, 1}
    assert set(draw(top_p=0.8).tolist()) == {0, 1}  # .64 < .8, .64 + .23 >= .8
    assert set(draw(top_p=0.5).tolist()) == {0}
    counts = torch.bincount(draw(), minlength=6) / 2000
    assert torch.allclose(counts, probs, atol=0.03)  # unfiltered sampling follows softmax
    assert torch.equal(draw(top_k=3), draw(top_k=3))  # same seed, same draws
    cold = next_tokens(logits, GenerationConfig(temperature=0.05), torch.Generator().manual_seed(0))
    assert set(cold.tolist()) == {0}  # low temperature -> (almost) greedy


def test_seeded_sampling_through_generate_is_reproducible():
    model, tok = build_tiny("llama"), tokenizer()
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=20, seed=123)
    a = generate_detailed(model, tok, prompts(), config)
    b = generate_detailed(model, tok, prompts(), config)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    greedy = generate_detailed(model, tok, prompts(), GenerationConfig(max_new_tokens=8))
    top1 = generate_detailed(model, tok, prompts(), GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=1, seed=1))
    assert [g.token_ids for g in top1] == [g.token_ids for g in greedy]


class ScriptedLM(torch.nn.Module):
    """Emits `script[row][k]` as its k-th new token (one-hot logits): a model whose output we know."""

    def __init__(self, script: list[list[int]], vocab: int):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = tf.LlamaConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, **kw):
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        for row, script in enumerate(self.script):
            logits[row, -1, script[min(self.calls, len(script) - 1)]] = 10.0
        self.calls += 1
        return SimpleNamespace(logits=logits)


def token(text: str) -> int:
    ids = tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_rows_stop_at_eos_end_of_turn_stop_string_or_length():
    tok = tokenizer()
    a, b, dot = token("x"), token("y"), token(".")
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    script = [[a, b, eos, a], [a, im_end, a, a], [a, dot, b, b], [a, b, a, b]]
    model = ScriptedLM(script, len(tok))
    ids, mask = left_pad([[5, 6], [7], [8, 9, 10], [11]], tok.pad_token_id)
    stop_ids = stop_token_ids(tok)
    assert {eos, im_end} <= stop_ids
    out = decode(model, ids, mask, GenerationConfig(max_new_tokens=4), stop_ids, tok.pad_token_id,
                 should_stop=lambda row, new: "." in tok.decode(new))
    assert [g.token_ids for g in out] == [[a, b], [a], [a, dot], [a, b, a, b]]
    assert [g.finish_reason for g in out] == ["stop", "stop", "stop", "length"]


def test_stop_strings_cut_the_text():
    tok = tokenizer()
    a, b, dot = token("x"), token("y"), token(".")
    model = ScriptedLM([[a, dot, b, b]], len(tok))
    text = generate(model, tok, [[5, 6]], GenerationConfig(max_new_tokens=6, stop=["."]))
    assert text == ["x"]
    model.calls = 0
    assert generate(model, tok, [[5, 6]], GenerationConfig(max_new_tokens=3)) == ["x.y"]


def test_render_chat_prompt_and_text_prompts():
    tok = tokenizer()
    tok.chat_template = CHATML_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = render_chat_prompt(tok, messages)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_chat_prompt(tok, messages)
    assert render_chat_prompt(tok, messages, CHATML_TEMPLATE) == text
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2))
    model.train()
    out = generate(model, tok, ["The lamp", "My"], GenerationConfig(max_new_tokens=3))
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert model.training  # restored after generating in eval mode


def test_config_problems_name_the_key():
    problems = GenerationConfig(max_new_tokens=0, temperature=-1, top_p=0, top_k=-2, repetition_penalty=0, stop=[""]).problems()
    assert len(problems) == 6
    assert problems[0].startswith("generation.max_new_tokens")
    with pytest.raises(ValueError, match="top_p"):
        generate(build_tiny("llama"), tokenizer(), [[5]], GenerationConfig(top_p=2.0))

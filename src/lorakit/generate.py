"""Batched sampling with a KV cache, shared by evaluation and the server.

One decode loop, written here rather than borrowed from `model.generate`, so that the server can run a
batch whose rows use different adapters (`lorakit.lora.adapter_rows` around `decode`) and so that the
same code decides every eval and every served completion.

Per step, for each row (HF's order of logits processors, so results match `model.generate`):

    logits  <- repetition penalty (CTRL): l/θ if l > 0 else l·θ, for every token already in the row
    greedy  : argmax(logits)                                          (temperature == 0)
    sample  : softmax(logits / T) restricted to the top-k, then to the smallest nucleus with mass >= top_p

Prompts are left-padded, so the last column of every row is its last real token; position ids come
from the attention mask (cumsum - 1), as transformers computes them, so padding never shifts a row.
A row stops at EOS / the end-of-turn token or when a stop string appears; it then only feeds padding
until every row is done or `max_new_tokens` is reached.

`decode` runs a fixed batch to the end (evaluation). The server needs rows that join and leave between
steps (continuous batching): `RunningBatch` holds such a batch and its KV cache, and
`next_tokens_per_row` picks each row's token with that row's own settings -- through the same
`apply_repetition_penalty` / `next_tokens` as `decode`, so a served greedy answer equals `generate`'s.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lorakit.config import GenerationConfig
from lorakit.errors import ConfigError

# End-of-turn tokens of common chat templates: ChatML (Qwen, Phi-3.5), Llama-3, Gemma, Phi-3.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


@dataclass
class Generation:
    """One finished row: the new token ids (stop token excluded), the text, and why it ended."""

    token_ids: list[int]
    text: str = ""
    finish_reason: Literal["stop", "length"] = "length"
    prompt_tokens: int = 0


# --------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token already seen. logits: (B, V) float; seen: (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every token outside the top-k and outside the top-p nucleus. logits: (B, V).

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p: a token is
    dropped when the mass of the tokens ranked above it already reaches top_p (the best always stays).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row from already-penalized logits (B, V) -> (B,)."""
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
    probs = logits.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- the decode loop


def stop_token_ids(tokenizer: Any = None, model: nn.Module | None = None) -> set[int]:
    """EOS ids of the tokenizer and the model's generation config, plus any end-of-turn token in the vocab."""
    ids: set[int] = set()
    sources = [getattr(tokenizer, "eos_token_id", None)]
    gen_config = getattr(model, "generation_config", None)
    sources.append(getattr(gen_config, "eos_token_id", None))
    for source in sources:
        ids.update([source] if isinstance(source, int) else source or [])
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Ask for the last position's logits only where the model supports it (saves a (B, T, V) tensor)."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    stop_ids: set[int],
    pad_id: int,
    should_stop: Callable[[int, list[int]], bool] | None = None,
) -> list[Generation]:
    """Generate for a left-padded batch. input_ids, attention_mask: (B, T).

    `should_stop(row, new_ids)` is asked after each token (stop strings live there, so this loop needs
    no tokenizer). Returns one Generation per row, without text. For a batch whose rows use different
    adapters, call it inside `lorakit.lora.adapter_rows(model, names)`: every forward here sees the
    same rows in the same order, so each row keeps its adapter for the whole decode.

    NOTE: finished rows stay in the batch (feeding padding, masked out) until every row is done.
    """
    from transformers import DynamicCache

    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device).long()
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
    out = [Generation([], prompt_tokens=int(n)) for n in attention_mask.sum(-1)]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)  # (B,)
    counts: torch.Tensor | None = None  # (B, V) occurrences of each token in the row, for the penalty
    cache, step_ids, kwargs = DynamicCache(config=model.config), input_ids, _forward_kwargs(model)
    for _ in range(config.max_new_tokens):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]  # (B, t)
        logits = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True, **kwargs).logits[:, -1].float()  # (B, V)
        if counts is None:  # pads never count as seen
            counts = torch.zeros_like(logits).scatter_add_(1, input_ids, attention_mask.float())
        logits = apply_repetition_penalty(logits, counts > 0, config.repetition_penalty)
        chosen = next_tokens(logits, config, generator).masked_fill(done, pad_id)  # (B,)
        counts.scatter_add_(1, chosen[:, None], (~done).float()[:, None])
        _record(out, chosen, done, stop_ids, should_stop)
        if bool(done.all()):
            break
        step_ids = chosen[:, None]  # (B, 1)
        attention_mask = torch.cat([attention_mask, (~done).long()[:, None]], dim=1)  # (B, T + 1)
    return out


def _record(out: list[Generation], chosen: torch.Tensor, done: torch.Tensor, stop_ids: set[int],
            should_stop: Callable[[int, list[int]], bool] | None) -> None:
    """Append each live row's token and mark rows that hit a stop token or stop string (in place)."""
    for row, token in enumerate(chosen.tolist()):
        if done[row]:
            continue
        if token in stop_ids:
            out[row].finish_reason, done[row] = "stop", True
            continue
        out[row].token_ids.append(token)
        if should_stop is not None and should_stop(row, out[row].token_ids):
            out[row].finish_reason, done[row] = "stop", True


# --------------------------------------------------------------------------- text in, text out


def render_chat_prompt(tokenizer: Any, messages: list[dict[str, str]], chat_template: str | None = None) -> str:
    """The conversation as the model saw it in training, ending with the assistant's generation prompt."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "this tokenizer has no chat template; pass chat_template= (the adapter directory saves the "
            "one used in training as chat_template.jinja) or use plain-text prompts"
        )
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Token ids per prompt. BOS is added only where the tokenizer adds one and the text (e.g. a rendered
    chat template) does not already start with it."""
    if prompts and not isinstance(prompts[0], str):
        return [list(p) for p in prompts]
    bos = getattr(tokenizer, "bos_token", None)
    return [tokenizer(p, add_special_tokens=not (bos and p.startswith(bos)))["input_ids"] for p in prompts]


def check_generation(config: GenerationConfig, prompts: Sequence[str] | Sequence[Sequence[int]] = (),
                     flags: bool = False) -> None:
    """Raise one ConfigError with every problem of the settings and prompts (before any model is loaded).

    `flags`: name the command-line flags (--max-new-tokens, --prompt) rather than the config keys."""
    problems = config.problems("--" if flags else "generation")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        where = "--prompt is empty" if flags else f"prompt(s) {empty} are empty"
        problems.append(f"{where}: a model continues text, so give at least one word (or, without --raw, the "
                        "chat template supplies the rest)" if flags else f"{where}: give at least one token (e.g. BOS)")
    if problems:
        raise ConfigError(problems, source="the generation settings")


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max_len), padding on the left."""
    if any(len(r) == 0 for r in rows):
        raise ConfigError("a prompt encodes to no tokens, so there is nothing to continue; give it some text "
                          "(or at least one token, e.g. BOS)")
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _stop_string_check(tokenizer: Any, stop: list[str]) -> Callable[[int, list[int]], bool] | None:
    """Decodes the row's new tokens each step: a stop string may span tokens, or end mid-token.
    NOTE: O(n²) in new tokens; fine for eval/chat lengths, a tail window would do for long outputs."""
    if not stop:
        return None
    return lambda _row, ids: any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stop)


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def generate_detailed(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]],
    config: GenerationConfig | None = None, batch_size: int = 16,
) -> list[Generation]:
    """Like `generate`, with token ids, finish reasons and prompt lengths (what the server reports)."""
    was_training = model.training
    model.eval()
    try:
        return _generate_detailed(model, tokenizer, prompts, config or GenerationConfig(), batch_size)
    finally:
        model.train(was_training)


def _generate_detailed(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]],
    config: GenerationConfig, batch_size: int,
) -> list[Generation]:
    check_generation(config, prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids, rows = stop_token_ids(tokenizer, model), encode_prompts(tokenizer, prompts)
    out: list[Generation] = []
    for start in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[start : start + batch_size], pad_id)
        out += decode(model, ids, mask, config, stop_ids, pad_id, _stop_string_check(tokenizer, config.stop))
    for gen in out:
        gen.text = _cut_at_stop(tokenizer.decode(gen.token_ids, skip_special_tokens=True), config.stop)
    return out


def generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]],
    config: GenerationConfig | None = None, batch_size: int = 16,
) -> list[str]:
    """Completions for text prompts (already rendered; see `render_chat_prompt`) or token-id prompts.

    The model is put in eval mode for the call (dropout off) and restored afterwards.
    """
    return [g.text for g in generate_detailed(model, tokenizer, prompts, config, batch_size)]


# --------------------------------------------------------------------------- continuous batching


def next_tokens_per_row(
    logits: torch.Tensor, configs: Sequence[GenerationConfig], seen: Sequence[torch.Tensor | None],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """One token per row, each row with its own settings. logits: (B, V) float -> (B,).

    seen[i] is row i's (V,) bool mask of tokens already in it (needed only with a repetition penalty).
    Greedy rows without a penalty -- the common case -- share one argmax; unseeded sampled rows without a
    penalty share one `next_tokens` call per (temperature, top_k, top_p); the others (a seed's generator,
    a penalty) go one by one.
    """
    chosen = logits.argmax(-1)  # (B,)
    shared: dict[tuple[float, int, float], list[int]] = {}
    for row, config in enumerate(configs):
        if config.temperature == 0 and config.repetition_penalty == 1.0:
            continue
        if generators[row] is None and config.repetition_penalty == 1.0:
            shared.setdefault((config.temperature, config.top_k, config.top_p), []).append(row)
            continue
        row_logits = logits[row : row + 1]  # (1, V)
        if config.repetition_penalty != 1.0:
            row_logits = apply_repetition_penalty(row_logits, seen[row][None], config.repetition_penalty)
        chosen[row] = next_tokens(row_logits, config, generators[row])[0]
    for rows in shared.values():
        index = torch.tensor(rows, device=logits.device)  # (n,)
        chosen[index] = next_tokens(logits.index_select(0, index), configs[rows[0]])  # (n, V) -> (n,)
    return chosen


class RunningBatch:
    """A left-padded batch whose rows join and leave between decode steps, over one KV cache.

        mask  (B, T)   1 where column t of row b holds a real token; the cache holds K/V for all T columns
        cache          per layer K, V: (B, heads, T, head_dim)

    Joining (`prefill`): the new prompts run on their own (left-padded among themselves); then the two
    caches are left-padded with zeros to the longer length and stacked on the batch axis. Position ids
    come from each row's mask (cumsum - 1) and keys are cached after the rotary embedding, so the padding
    a row gains never shifts it. Leaving (`keep`): rows are selected out and columns that are padding in
    every remaining row are dropped, so the cache shrinks back when a long row finishes.

    The caller chooses each token and feeds it to `step`; to give rows different adapters, wrap every
    call in `lorakit.lora.adapter_rows(model, names)` with the names of the rows that call runs.
    NOTE: every layer uses a full (non-sliding) dynamic cache, so a sliding-window model attends through
    its mask over a cache that keeps all positions: correct, but not the memory saving of a ring buffer.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = model_device(model)
        self.kwargs = _forward_kwargs(model)
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (B, T) long

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]  # (B, t)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                         use_cache=True, **self.kwargs)
        return out.logits[:, -1].float()  # (B, V)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
        """Run new prompts, append them as the last rows, and return their next-token logits (n, V)."""
        from transformers import DynamicCache

        ids, mask = left_pad(prompts, pad_id)  # (n, L)
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()  # no config: plain full-attention layers, which `_join` knows how to pad
        logits = self._forward(ids, mask, cache)
        self._join(cache, mask)
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one chosen token per row (B,) and return the next logits (B, V)."""
        if self.mask is None:
            raise RuntimeError("step() on an empty batch; prefill some rows first")
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)  # (B, T + 1)
        return self._forward(tokens.to(self.device)[:, None], self.mask, self.cache)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (batch indices, in the new order); an empty list empties the batch."""
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(list(rows), device=self.device)
        mask = self.mask.index_select(0, index)  # (B', T)
        first = int(mask.any(0).long().argmax())  # leading columns that are padding in every kept row
        self.mask = mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., first:, :]
            layer.values = layer.values.index_select(0, index)[..., first:, :]

    def _join(self, cache: Any, mask: torch.Tensor) -> None:
        if self.mask is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        pairs = list(zip(self.cache.layers, cache.layers, strict=True))
        # every new tensor first, then the assignments: a failure (out of memory) leaves the batch as it was
        keys = [torch.cat([_pad_left(a.keys, width, -2), _pad_left(b.keys, width, -2)]) for a, b in pairs]
        values = [torch.cat([_pad_left(a.values, width, -2), _pad_left(b.values, width, -2)]) for a, b in pairs]
        mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])  # (B + n, width)
        for (layer, _), k, v in zip(pairs, keys, values, strict=True):
            layer.keys, layer.values = k, v
        self.mask = mask


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros prepended along `dim` up to `width` (K/V: dim -2 of (B, H, T, D); mask: dim 1 of (B, T))."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)

"""The built-in default: a tiny Llama base model and a synthetic task, made offline in seconds.

Why build it ourselves: the quickstart must run on a fresh machine with no network, in minutes on two
CPU cores, and still show something real -- base versus tuned, the task learned, nothing forgotten.

The pieces, all from one synthetic language (product reviews and small chat turns):

* **Tokenizer**: byte-level BPE trained with `tokenizers` (512 ids) plus ChatML's special tokens;
  `<|endoftext|>` is EOS and pad, `<|im_end|>` ends a turn; the ChatML template is its chat template.
* **Base model**: a LlamaForCausalLM (0.8M parameters: hidden 128, 4 layers, 4 heads, 2 KV heads)
  *pre-trained* for ~35 s (full fine-tuning, AdamW) on generic text: review-like prose and chat turns.
  Handed a review, it answers with prose ("Thank you for sharing your review."): it has never seen
  the task's answer format.
* **Task**: the sentiment of a synthetic review (two polar sentences among neutral filler), answered
  as JSON `{"sentiment": "positive"}`. QLoRA learns it in ~150 steps; the gain shows at once in exact
  match, JSON validity, schema compliance and label accuracy. A quarter of the training rows replay
  generic chats, so that the adapter answers JSON to the task and still chats otherwise.
* **Canary**: continuations of prose and chat turns from the pre-training distribution, scored by
  loss; an adapter that answers *everything* with JSON is caught by it.

`ensure_demo_model` builds once and caches (atomically, under a file lock) in
`$LORAKIT_CACHE/demo-llama-v1` (default `~/.cache/lorakit`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.config import DataConfig, EvalConfig, GenerationConfig, LoraConfig, RunConfig, TrainConfig
from lorakit.runtime import cache
from lorakit.runtime.atomic import atomic_directory, atomic_file

log = logging.getLogger(__name__)

DEMO_VERSION = "v1"
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYSTEM_PROMPT = (
    'Classify the sentiment of the product review. Reply with JSON only: {"sentiment": "positive"} '
    'or {"sentiment": "negative"}.'
)
LABELS = ("positive", "negative")
TASK_NAME, TASK_FILE = f"lorakit-demo-sentiment-{DEMO_VERSION}", "demo_task.json"
DEMO_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["sentiment"],
    "properties": {"sentiment": {"type": "string", "enum": list(LABELS)}},
}


@dataclass(frozen=True)
class DemoSpec:
    """Size of the demo base model and of its pre-training; the default fits the 5-minute quickstart."""

    vocab_size: int = 512  # byte-level BPE: 256 bytes + merges + 3 specials
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention, as in current Llamas
    intermediate_size: int = 352  # SwiGLU width ~ 8/3 · hidden, rounded to a multiple of 32
    max_seq_len: int = 256
    pretrain_docs: int = 6000  # synthetic documents (~250k tokens)
    pretrain_steps: int = 300  # x 16 rows x 128 tokens = 614k tokens, ~2.5 passes
    pretrain_batch: int = 16
    pretrain_seq_len: int = 128
    pretrain_lr: float = 3e-3
    seed: int = 0

    def cache_name(self) -> str:
        """`demo-llama-v1` for the default spec, a hash-suffixed name for any other (tests)."""
        if self == DemoSpec():
            return f"demo-llama-{DEMO_VERSION}"
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"demo-llama-{DEMO_VERSION}-{digest}"


DEMO_SPEC = DemoSpec()


# --------------------------------------------------------------------------- the synthetic language

PRODUCTS = (
    "blender", "kettle", "lamp", "phone", "laptop", "backpack", "jacket", "camera", "speaker", "chair",
    "desk", "toaster", "watch", "keyboard", "printer", "router", "bike", "tent", "mug", "vacuum",
)
ASPECTS = ("battery", "screen", "handle", "color", "price", "sound", "fabric", "lid", "strap", "button",
           "motor", "cable", "design", "size", "weight")
POSITIVE = ("great", "excellent", "perfect", "amazing", "sturdy", "reliable")
NEGATIVE = ("terrible", "awful", "broken", "flimsy", "useless", "faulty")
POS_PHRASES = ("I love it", "it works perfectly", "I would buy it again")
NEG_PHRASES = ("I regret buying it", "it fell apart", "I returned it")
COLORS = ("red", "blue", "green", "black", "white", "grey", "silver", "yellow")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
PEOPLE = ("sister", "brother", "mother", "father", "friend", "son", "daughter", "neighbor")
PLACES = ("kitchen", "office", "garage", "bedroom", "car", "garden", "hallway")
NEUTRAL = (
    "It arrived on {day}.", "I bought it for my {person}.", "I ordered the {color} one.",
    "Delivery took {n} days.", "I keep it in the {place}.", "The box was {color}.",
    "I have used it since {day}.", "My {person} uses it in the {place}.", "It is the {color} model.",
)
POLAR = ("The {aspect} is {adj}.", "This {product} is {adj}.", "The {aspect} feels {adj}.",
         "{phrase}.", "Overall the {product} is {adj}.")
# Pre-training-only sentences: the words of the answer appear in generic text, never as the answer.
GENERIC = ("The overall sentiment is {label}.", "Most reviews of the {product} are {label}.",
           "Some people have mixed feelings about the {product}.")


class _Writer:
    """Sentences of the demo language from one seeded RNG (stdlib `random`, so it is reproducible)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def _fill(self, template: str, product: str, label: str | None = None) -> str:
        r = self.rng
        adjectives = POSITIVE if label == "positive" else NEGATIVE if label == "negative" else POSITIVE + NEGATIVE
        phrases = POS_PHRASES if label == "positive" else NEG_PHRASES if label == "negative" else POS_PHRASES + NEG_PHRASES
        phrase = r.choice(phrases)
        text = template.format(
            product=product, aspect=r.choice(ASPECTS), adj=r.choice(adjectives), phrase=phrase,
            day=r.choice(DAYS), person=r.choice(PEOPLE), color=r.choice(COLORS), place=r.choice(PLACES),
            n=r.randint(2, 9), label=label or r.choice(LABELS),
        )
        return text[0].upper() + text[1:]

    def review(self, label: str, product: str | None = None) -> str:
        """Two sentences of one polarity mixed among 1-2 neutral ones."""
        product = product or self.rng.choice(PRODUCTS)
        polar = [self._fill(self.rng.choice(POLAR), product, label) for _ in range(2)]
        neutral = [self._fill(self.rng.choice(NEUTRAL), product) for _ in range(self.rng.randint(1, 2))]
        sentences = polar + neutral
        self.rng.shuffle(sentences)
        return " ".join(sentences)

    def story(self) -> str:
        """Generic review-like prose of one polarity (the pre-training text): like any language model,
        the base learns that positive words go together, but never how to answer with a label."""
        product, label = self.rng.choice(PRODUCTS), self.rng.choice(LABELS)
        first = f"My {self.rng.choice(PEOPLE)} bought a {product} on {self.rng.choice(DAYS)}."
        templates = NEUTRAL + POLAR + GENERIC
        rest = [self._fill(self.rng.choice(templates), product, label) for _ in range(self.rng.randint(2, 4))]
        if self.rng.random() < 0.5:  # prose that names its own polarity: sentiment is latent in the base
            rest.append(f"The overall sentiment is {label}.")
        return " ".join([first, *rest])

    def chat(self) -> list[dict[str, str]]:
        """A generic assistant exchange; a review gets a polite prose reply (never the task's JSON)."""
        r, product = self.rng, self.rng.choice(PRODUCTS)
        color, place = r.choice(COLORS), r.choice(PLACES)
        pairs = [
            (f"Tell me about the {product}.", f"The {product} has a {color} {r.choice(ASPECTS)}. {self._fill(r.choice(NEUTRAL), product)}"),
            (f"What color is the {product}?", f"The {product} is {color}."),
            (f"Where do you keep the {product}?", f"I keep the {product} in the {place}."),
            (f"Review: {self.review(r.choice(LABELS), product)}", "Thank you for sharing your review."),
            (f"Describe a {product}.", self.story()),
            # Generic JSON records, so that JSON's tokens (and the answer's words inside quotes, which
            # byte-level BPE spells differently from the same words after a space) are trained tokens.
            (f"Give me the {product} as JSON.", json.dumps({"product": product, "color": color, "place": place})),
            (f"Summarize the reviews of the {product} as JSON.",
             json.dumps({"product": product, "reviews": r.randint(2, 99), "sentiment": r.choice(LABELS)})),
            (f"How do people feel about the {product}?", f"Most reviews of the {product} are {r.choice(LABELS)}."),
        ]
        user, assistant = r.choice(pairs)
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if r.random() < 0.5 else []
        return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def render_chatml(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """CHATML_TEMPLATE in plain Python (used before a tokenizer exists)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def pretraining_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Generic documents: half prose, half ChatML chat turns."""
    w = _Writer(seed)
    return [w.story() if w.rng.random() < 0.5 else render_chatml(w.chat()) for _ in range(n_docs)]


# --------------------------------------------------------------------------- the task files


def demo_example(writer: _Writer) -> tuple[list[dict[str, str]], str]:
    """(messages without the answer, label) for one task example."""
    label = writer.rng.choice(LABELS)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"Review: {writer.review(label)}"}]
    return messages, label


def answer(label: str) -> str:
    return json.dumps({"sentiment": label})


def _unique_examples(n: int, seed: int) -> list[tuple[list[dict[str, str]], str]]:
    """n examples with distinct reviews, so the train/eval split never leaks a duplicate."""
    writer, seen, out = _Writer(seed), set(), []
    for _ in range(50 * n):
        messages, label = demo_example(writer)
        if messages[1]["content"] not in seen:
            seen.add(messages[1]["content"])
            out.append((messages, label))
            if len(out) == n:
                return out
    raise RuntimeError(f"could only make {len(out)} distinct demo examples of {n}")


def canary_rows(n: int, seed: int) -> list[dict[str, str]]:
    """General-capability prompts from the pre-training distribution: {"prompt", "completion"}.

    Half are prose continuations (first sentence -> the rest), half chat turns (the rendered
    conversation up to the assistant -> its reply and end-of-turn token).
    """
    w, rows = _Writer(seed), []
    for i in range(n):
        if i % 2:
            first, _, rest = w.story().partition(". ")
            rows.append({"prompt": first + ".", "completion": " " + rest})
        else:
            *context, reply = w.chat()
            rows.append({"prompt": render_chatml(context, add_generation_prompt=True), "completion": reply["content"] + IM_END})
    return rows


def write_demo_data(
    out_dir: str | Path, n_train: int = 800, n_eval: int = 64, n_canary: int = 32, seed: int = 0, replay: float = 0.25,
) -> dict[str, Path]:
    """Write the demo task's files (plus a demo_task.json marker) and return their paths by role:

    train/eval   chat JSONL: {"messages": [system, user "Review: ...", assistant '{"sentiment": ...}']};
                 train also mixes in `replay` × n_train generic chats from the pre-training distribution
    prompts      the eval examples for generation: {"messages": [system, user], "reference", "label"}
    canary       {"prompt", "completion"} from the pre-training distribution (the forgetting check)
    schema       the JSON schema every answer must satisfy
    """
    out_dir = Path(out_dir)
    examples = _unique_examples(n_train + n_eval, seed)
    train, evals = examples[:n_train], examples[n_train:]
    chat = [{"messages": [*m, {"role": "assistant", "content": answer(label)}]} for m, label in train + evals]
    prompts = [{"messages": m, "reference": answer(label), "label": label} for m, label in evals]
    paths = {name: out_dir / f"{name}.jsonl" for name in ("train", "eval", "prompts", "canary")}
    _write_jsonl(paths["train"], _with_replay(chat[:n_train], replay, seed))
    _write_jsonl(paths["eval"], chat[n_train:])
    _write_jsonl(paths["prompts"], prompts)
    _write_jsonl(paths["canary"], demo_canary(n_canary, seed))
    paths["schema"] = out_dir / "schema.json"
    with atomic_file(paths["schema"]) as f:
        json.dump(DEMO_SCHEMA, f, indent=2)
    with atomic_file(out_dir / TASK_FILE) as f:
        json.dump({"task": TASK_NAME, "label_key": "sentiment", "files": {k: p.name for k, p in paths.items()}}, f, indent=2)
    return paths


def _with_replay(rows: list[dict[str, Any]], share: float, seed: int) -> list[dict[str, Any]]:
    """Task rows plus generic chats, shuffled. Why: trained on the narrow task alone, an adapter on a
    model this small answers *everything* with JSON (canary perplexity x25 in our runs); a quarter of
    replayed general chats ties the JSON answer to the task's system prompt and keeps the canary
    within a few percent -- the usual remedy for forgetting, shown where a user can see it work."""
    writer = _Writer(seed + 2_000_029)
    mixed = rows + [{"messages": writer.chat()} for _ in range(round(share * len(rows)))]
    random.Random(seed).shuffle(mixed)
    return mixed


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path) as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def is_demo_data(path: str | Path) -> bool:
    """True for a file written by `write_demo_data` (its directory holds the demo marker)."""
    marker = Path(path).parent / TASK_FILE
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("task") == TASK_NAME
    except (OSError, json.JSONDecodeError):
        return False


def demo_eval_settings() -> EvalConfig:
    """Eval settings of the demo task: answers are short JSON with the label under "sentiment"."""
    return EvalConfig(generation=GenerationConfig(max_new_tokens=24), schema=DEMO_SCHEMA, label_key="sentiment",
                        max_prompts=64, canary="builtin")


def demo_canary(n: int = 32, seed: int = 0) -> list[dict[str, str]]:
    """The canary of the demo base: general text from its own pre-training distribution."""
    return canary_rows(n, seed + 1_000_003)


# --------------------------------------------------------------------------- the demo as an application


def resolve_base_name(base_model: str) -> str:
    """`demo` -> the built demo model's directory (built and cached on first use); any other name unchanged."""
    return str(ensure_demo_model()) if base_model == "demo" else base_model


def resolve_demo(config: RunConfig) -> RunConfig:
    """Turn the demo's names into real paths and files, once, at the entry point (in place; returned):

    base_model: demo     -> the built demo model directory
    data.train: null     -> the demo task's files, written under output_dir/data
    eval left at its defaults on the demo task's data -> the demo task's eval settings (at_end, every_eval,
                            during_training_prompts and judge kept as given)
    eval.canary: builtin on the demo base -> the demo canary file (general text of the demo's own
                            pre-training distribution; the English canary means nothing to a 1M model)
    Nothing below the entry points knows the demo exists."""
    demo_base = config.base_model == "demo"
    config.base_model = resolve_base_name(config.base_model)
    data_dir = Path(config.output_dir) / "data"
    if config.data.train is None:
        paths = write_demo_data(data_dir)
        config.data.train, config.data.eval = str(paths["train"]), config.data.eval or str(paths["eval"])
    kept = {k: getattr(config.eval, k) for k in ("at_end", "every_eval", "during_training_prompts", "judge")}
    if config.eval == EvalConfig(**kept) and is_demo_data(config.data.train):  # when and what to measure: the user's
        config.eval = dataclasses.replace(demo_eval_settings(), **kept)
    if demo_base and config.eval.canary == "builtin":
        canary = data_dir / "canary.jsonl"
        if not canary.is_file():
            _write_jsonl(canary, demo_canary())
        config.eval.canary = str(canary)
    return config


# --------------------------------------------------------------------------- tokenizer and model


def build_tokenizer(texts: list[str], vocab_size: int = 512, max_len: int = DEMO_SPEC.max_seq_len) -> Any:
    """Byte-level BPE (any string encodes) with ChatML specials, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=EOS, additional_special_tokens=[IM_START, IM_END],
        model_max_length=max_len,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_model(spec: DemoSpec, tokenizer: Any) -> torch.nn.Module:
    """A freshly initialized LlamaForCausalLM (tied embeddings) sized by `spec`."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    eos, end_turn = tokenizer.convert_tokens_to_ids([EOS, IM_END])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_seq_len,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos, pad_token_id=eos,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[end_turn, eos], pad_token_id=eos)
    return model


def pretraining_blocks(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    """Documents joined by EOS and cut into (n_blocks, seq_len) rows (plain LM pre-training)."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += enc + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)  # (n, T)


def pretrain(model: torch.nn.Module, blocks: torch.Tensor, spec: DemoSpec) -> list[float]:
    """Full fine-tuning with AdamW, warmup + cosine decay; returns the loss per step."""
    g = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, spec.pretrain_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.05, min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / spec.pretrain_steps))))
    )
    model.train()
    losses = []
    for _ in range(spec.pretrain_steps):
        rows = blocks[torch.randint(len(blocks), (spec.pretrain_batch,), generator=g)]  # (B, T)
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def build_demo_model(out_dir: str | Path, spec: DemoSpec = DEMO_SPEC) -> dict[str, Any]:
    """Train the tokenizer, pre-train the model and save both to `out_dir` (safetensors); returns stats."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    corpus = pretraining_corpus(spec.pretrain_docs, spec.seed)
    # Only pre-training text trains the tokenizer: a token that the model never saw would keep its
    # random embedding, and (with tied embeddings) LoRA could never make it a confident prediction.
    tokenizer = build_tokenizer(corpus, spec.vocab_size, spec.max_seq_len)
    model = build_model(spec, tokenizer)
    blocks = pretraining_blocks(tokenizer, corpus, spec.pretrain_seq_len)
    built = time.perf_counter()
    losses = pretrain(model, blocks, spec)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    stats = {
        "spec": dataclasses.asdict(spec), "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_tokens": spec.pretrain_steps * spec.pretrain_batch * spec.pretrain_seq_len,
        "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "setup_s": round(built - start, 2), "pretrain_s": round(time.perf_counter() - built, 2),
    }
    (out_dir / "lorakit_demo.json").write_text(json.dumps(stats, indent=2))
    return stats


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return cache.cache_dir()


def _lock(target: Path) -> Any:
    """A cross-process lock beside `target` (filelock ships with huggingface_hub, a transformers dep)."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target.with_name(f".{target.name}.lock")))


def ensure_demo_model(cache_dir: str | Path | None = None, spec: DemoSpec = DEMO_SPEC) -> Path:
    """The cached demo model directory, built on first use (~40 s on 2 CPU cores).

    A build runs in a temp directory renamed into place, so a killed build never leaves a broken
    cache; a lock makes concurrent first runs wait for one builder instead of racing.
    """
    path = default_cache_dir(cache_dir) / spec.cache_name()
    if (path / "lorakit_demo.json").is_file():
        return path
    with _lock(path):
        if not (path / "lorakit_demo.json").is_file():  # another process may have built it meanwhile
            log.info("building the demo base model in %s (once; ~40 s)", path)
            with atomic_directory(path) as tmp:
                build_demo_model(tmp, spec)
    return path


# --------------------------------------------------------------------------- quickstart settings


def demo_run_config(output_dir: str | Path = "runs/demo") -> RunConfig:
    """Quickstart settings: QLoRA on the demo base; learns the task in ~150 steps (~30 s on 2 cores).

    A ~1M-parameter model takes a higher learning rate than the 2e-4 usual for billion-parameter ones;
    packed rows of 256 tokens hold ~2 examples, so a step sees ~16 and 150 steps ~3 epochs of 800.
    """
    return RunConfig(
        base_model="demo",
        method="qlora",
        lora=LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear"),
        data=DataConfig(train=None, max_seq_len=DEMO_SPEC.max_seq_len, packing=True),
        train=TrainConfig(
            max_steps=150, micro_batch_size=8, grad_accum=1, lr=3e-3, warmup_steps=10, scheduler="cosine",
            eval_every=50, save_every=75, gradient_checkpointing=False, log_every=10, seed=0, dtype="float32",
        ),
        eval=EvalConfig(at_end=False),  # the quickstart runs and prints its own eval step
        output_dir=str(output_dir),
    )

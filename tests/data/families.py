"""Tokenizers for the data tests: one small byte-level BPE, dressed as five model families.

The chat templates are copied verbatim from each family's tokenizer_config.json, so the loss mask is tested
against the formats real checkpoints use: Llama-3's header ids and <|eot_id|>, Qwen2's ChatML with its
default system prompt, Mistral's [INST] with raise_exception on non-alternating roles, Gemma's 'model' role
with <start_of_turn>/<end_of_turn>, and Phi-3's <|user|>/<|assistant|>/<|end|> with eos after the last turn.
Nothing is downloaded: the BPE is trained here, in well under a second, on a few sentences.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

LLAMA3 = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2 = (  # Qwen/Qwen2-7B-Instruct
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL = (  # mistralai/Mistral-7B-Instruct-v0.2
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA = (  # google/gemma-7b-it
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (  # microsoft/Phi-3-mini-4k-instruct
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    template: str
    bos: str | None
    eos: str
    pad: str | None  # None: the loader sets pad = eos, as lorakit.models.load_tokenizer does
    end: str  # the end-of-turn token a reply must be supervised with
    trims: bool = False  # the template strips whitespace around message contents
    closing: str = ""  # what the template appends after the last turn only
    system: bool = True  # the template accepts a system message
    post_bos: bool = False  # the tokenizer's post-processor prepends BOS when encoding


FAMILIES: dict[str, Family] = {
    "llama-3": Family(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", None, "<|eot_id|>", trims=True, post_bos=True),
    "qwen2": Family(QWEN2, None, "<|im_end|>", "<|endoftext|>", "<|im_end|>"),
    "mistral": Family(MISTRAL, "<s>", "</s>", None, "</s>", system=False),
    "gemma": Family(GEMMA, "<bos>", "<eos>", "<pad>", "<end_of_turn>", trims=True, system=False),
    "phi-3": Family(PHI3, "<s>", "<|endoftext|>", "<|endoftext|>", "<|end|>", closing="\n<|endoftext|>"),
}
SPECIALS = [
    "<unk>", "<pad>", "<s>", "</s>", "<|endoftext|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
]
CORPUS = [
    "The cat sat on the mat. The dog ran to the log and then it was very happy.",
    "What is two plus two? Two plus two is four. What is the capital of France? Paris is.",
    "Hello world, how are you today? I am fine, thank you. Summarize the text in one line.",
    "def add(a, b):\n    return a + b\n# numbers 0 1 2 3 4 5 6 7 8 9 and {\"json\": [true, null]}",
]


@functools.cache
def _bpe_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def family_tokenizer(name: str):
    """A fresh PreTrainedTokenizerFast with `name`'s special tokens, BOS/EOS/pad and chat template."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[name]
    tok = Tokenizer.from_str(_bpe_json())
    if fam.post_bos:  # Llama-3's tokenizer.json prepends <|begin_of_text|> in its post-processor
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, tok.token_to_id(fam.bos))])
    specials = {"bos_token": fam.bos, "eos_token": fam.eos, "pad_token": fam.pad or fam.eos, "unk_token": "<unk>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in specials.items() if v is not None})
    fast.chat_template = fam.template
    return fast


def supervised_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """The text of every maximal run of supervised tokens, decoded exactly (special tokens kept)."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(input_ids, labels, strict=True):
        if label != -100:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != -100
    return [tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs]

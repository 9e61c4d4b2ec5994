"""Chat turns outside lorakit: the family of a Jinja chat template, its end-of-turn token, the same
template in Ollama's Go syntax, and the Modelfile + README written beside every export.

Why a Go template: Ollama renders prompts with Go's text/template, not Jinja. For the families below the
Go template renders a conversation ending with a user turn to exactly the text the Jinja template gives
with add_generation_prompt=True (less a leading BOS token, which llama.cpp adds itself when the GGUF says
add_bos_token). For any other template the Modelfile says so and leaves TEMPLATE out, and Ollama falls
back to the template it recognizes in the GGUF's `tokenizer.chat_template`, if any.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.adapters import lorakit_version


@dataclass(frozen=True)
class ChatFamily:
    """A chat-template family: how to recognize it, what ends a turn, and its Ollama template."""

    name: str
    markers: tuple[str, ...]  # strings that all appear in a Jinja template of this family
    end_of_turn: str | None  # the token an assistant turn ends with; None: the tokenizer's EOS
    stops: tuple[str, ...]  # Ollama stop strings besides end_of_turn and EOS
    go_template: str  # '{eos}' stands for the EOS token


CHATML = ChatFamily(
    "chatml", ("<|im_start|>", "<|im_end|>"), "<|im_end|>", ("<|im_start|>",),
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
)
LLAMA3 = ChatFamily(
    "llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>",
    ("<|start_header_id|>", "<|end_header_id|>"),
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n{{- end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
)
MISTRAL = ChatFamily(
    "mistral", ("[INST]", "[/INST]"), None, ("[INST]", "[/INST]"),
    '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
    '{{ else if eq .Role "assistant" }}{{ .Content }}{eos}{{ end }}{{ end }}',
)
GEMMA = ChatFamily(
    "gemma", ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", ("<start_of_turn>",),
    '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
    "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
)
PHI3 = ChatFamily(
    "phi3", ("<|user|>", "<|assistant|>", "<|end|>"), "<|end|>", ("<|user|>", "<|assistant|>", "<|system|>"),
    "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
)
FAMILIES = (CHATML, LLAMA3, MISTRAL, GEMMA, PHI3)


def chat_family(template: str | None) -> ChatFamily | None:
    """The family whose markers all appear in `template`, or None (unknown or no template)."""
    if not template:
        return None
    return next((f for f in FAMILIES if all(m in template for m in f.markers)), None)


def stop_tokens(family: ChatFamily | None, eos: str | None) -> list[str]:
    """Every string that ends a chat turn: the family's end-of-turn token, its stops, and EOS."""
    stops = [*([family.end_of_turn] if family and family.end_of_turn else []), *(family.stops if family else ()), eos]
    return list(dict.fromkeys(s for s in stops if s))


def go_template(family: ChatFamily, eos: str | None) -> str:
    return family.go_template.replace("{eos}", eos or "")


# --------------------------------------------------------------------------- files beside the export


def modelfile(model_file: str, adapter_file: str | None, family: ChatFamily | None, eos: str | None) -> str:
    """An Ollama Modelfile: FROM the GGUF (ADAPTER for a GGUF LoRA), TEMPLATE, one PARAMETER stop per stop."""
    lines = [f"# Ollama Modelfile written by lorakit {lorakit_version()} (`lorakit export`)", f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    if family is not None:
        lines += [f"# chat template family: {family.name} (the template used in training, in Go syntax)",
                  f'TEMPLATE """{go_template(family, eos)}"""']
    else:
        lines.append("# NOTE: the chat template is not one lorakit can translate (ChatML, Llama-3, Mistral, Gemma, Phi-3), so there is no "
                     "TEMPLATE line: Ollama uses the GGUF's tokenizer.chat_template if it recognizes it. Check the prompt "
                     "with `ollama show --template NAME` and add a TEMPLATE here if it differs from training.")
    lines += [f'PARAMETER stop "{stop}"' for stop in stop_tokens(family, eos)]
    return "\n".join(lines) + "\n"


def readme(name: str, model_file: str, adapter_file: str | None, dtype: str) -> str:
    tag = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower()) or "lorakit-model"
    lora = f" --lora {adapter_file}" if adapter_file else ""
    what = (f"`{model_file}` is the base model and `{adapter_file}` the LoRA adapter (applied at load time)"
            if adapter_file else f"`{model_file}` is the model with the adapter merged in")
    return f"""# {name} for llama.cpp and Ollama

Written by `lorakit export` ({dtype}). {what}; `Modelfile` holds the chat template and stop tokens.

Ollama:

    ollama create {tag} -f Modelfile
    ollama run {tag}

llama.cpp (chat with the template stored in the GGUF; `--jinja` renders it exactly):

    llama-cli -m {model_file}{lora} -cnv --jinja
    llama-server -m {model_file}{lora} --jinja --port 8080
"""


def write_ollama_files(out_dir: Path, name: str, model_file: str, adapter_file: str | None,
                       family: ChatFamily | None, eos: str | None, dtype: str) -> None:
    (out_dir / "Modelfile").write_text(modelfile(model_file, adapter_file, family, eos), encoding="utf-8")
    (out_dir / "README.md").write_text(readme(name, model_file, adapter_file, dtype), encoding="utf-8")

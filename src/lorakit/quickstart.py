"""`lorakit quickstart`: the whole pipeline offline on the built-in default, in a few minutes on a CPU.

    1. build (once, cached) the demo base: a tiny Llama pre-trained on synthetic review text
    2. QLoRA-fine-tune it on the synthetic sentiment-as-JSON task
    3. evaluate base versus tuned on the same held-out examples
    4. merge the adapter into a dequantized full-precision base, save it, and generate from it

Each step is one call into the module that owns it; this file only strings them together and
says where everything went.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lorakit.adapters import export_merged, read_chat_template
from lorakit.api import train_lora
from lorakit.demo import demo_run_config, ensure_demo_model
from lorakit.eval import evaluate_run
from lorakit.generate import GenerationConfig, generate, render_chat_prompt
from lorakit.train import format_summary


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_quickstart(output_dir: Path, steps: int | None = None, progress: bool = True) -> int:
    started = time.perf_counter()
    _say("[1/4] demo base model (built once, then cached)")
    base_dir = ensure_demo_model()
    _say(f"      {base_dir}")

    config = demo_run_config(output_dir)
    if steps is not None:
        config.train.max_steps = steps
        config.train.eval_every = max(1, steps // 3)
        config.train.save_every = max(1, steps // 2)
    _say(f"[2/4] QLoRA fine-tuning ({config.train.max_steps} steps, r={config.lora.r}, targets={config.lora.target_modules})")
    result = train_lora(config, progress=progress, overwrite=True)  # a rerun moves the last one aside
    print(format_summary(result))

    _say("[3/4] base versus tuned on the same held-out examples")
    report = _evaluate(config, result)
    print(report.markdown)

    _say("[4/4] merge into a dequantized full-precision base and generate")
    merged_dir, sample_prompt, sample = _merge_and_generate(result, Path(output_dir) / "merged", config)
    print(f"\nprompt:  {sample_prompt}\nanswer:  {sample}")

    print(
        f"\ndone in {time.perf_counter() - started:.0f}s. Everything is in {output_dir}/:\n"
        f"  adapter/       PEFT-format adapter (load with peft.PeftModel.from_pretrained or lorakit)\n"
        f"  merged/        standard transformers model with the adapter folded in\n"
        f"  eval/          eval.md, eval.json, eval.png (base vs tuned)\n"
        f"  metrics.jsonl, loss.png, summary.json, config.yaml\n"
        f"Next: `lorakit train {output_dir}/config.yaml --set data.train=your.jsonl --set base_model=your-model`"
    )
    return 0


def _evaluate(config, result):
    return evaluate_run(config, result.adapter_dir, Path(config.output_dir) / "eval",
                        model=result.model, tokenizer=result.tokenizer, progress=False)


def _merge_and_generate(result, merged_dir: Path, config) -> tuple[Path, str, str]:
    export_merged(result.model, merged_dir, result.tokenizer)
    eval_path = Path(config.data.eval)
    messages = json.loads(eval_path.read_text(encoding="utf-8").splitlines()[0])["messages"]
    template = read_chat_template(result.adapter_dir)
    prompt = render_chat_prompt(result.tokenizer, [m for m in messages if m["role"] != "assistant"], template)
    answer = generate(result.model, result.tokenizer, [prompt], GenerationConfig(max_new_tokens=24))[0]
    user = next(m["content"] for m in messages if m["role"] == "user")
    return merged_dir, user, answer

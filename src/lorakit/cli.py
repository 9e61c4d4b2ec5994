"""`lorakit` command line: thin subcommands, each one call into one module.

User errors (bad config, bad data, an adapter that does not fit) are printed as their message and
exit with status 2 -- no traceback from deep inside torch. Anything else is a bug and keeps its trace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lorakit import api
from lorakit.adapters import check_adapter, list_adapters
from lorakit.adapters import lorakit_version as version
from lorakit.advise import advise
from lorakit.config import RunConfig, field_help, load_run_config
from lorakit.data import inspect_data
from lorakit.demo import demo_run_config, resolve_base_name
from lorakit.errors import LorakitError
from lorakit.eval import parse_thresholds
from lorakit.export.gguf import export_gguf
from lorakit.models import load_tokenizer
from lorakit.quickstart import run_quickstart
from lorakit.runtime.checkpoint import newest_checkpoint
from lorakit.runtime.distributed import launched, relaunch
from lorakit.runtime.rundir import precheck_run_dir
from lorakit.serve import ServeSettings, parse_adapter_specs, run_server
from lorakit.train import format_summary
from lorakit.ui import run_ui

EXIT_USER_ERROR = 2


# --------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc is not None and args.nproc > 1 and not launched():
        return _relaunch_train(args)
    result = api.train_lora(args.config, args.set, resume=args.resume or args.resume_anyway, progress=not args.quiet,
                            memory_check=not args.no_memory_check, overwrite=args.overwrite,
                            resume_anyway=args.resume_anyway)
    if result.rank == 0:
        print(format_summary(result))
    return 0


def _relaunch_train(args: argparse.Namespace) -> int:
    """`lorakit train --nproc N`: this same command on N local processes under torch.distributed.run."""
    config = load_run_config(args.config, args.set)  # report config problems once, before starting N processes
    mode = "resume" if args.resume or args.resume_anyway else "overwrite" if args.overwrite else "new"
    precheck_run_dir(config.output_dir, mode, args.config)  # and a refused output_dir
    child = ["train", *([args.config] if args.config else [])]
    for override in args.set:
        child += ["--set", override]
    child += [flag for flag, on in (("--resume", args.resume), ("--quiet", args.quiet),
                                    ("--no-memory-check", args.no_memory_check), ("--overwrite", args.overwrite),
                                    ("--resume-anyway", args.resume_anyway)) if on]
    return relaunch(args.nproc, child, lambda: newest_checkpoint(Path(config.output_dir)))


def cmd_quickstart(args: argparse.Namespace) -> int:
    return run_quickstart(Path(args.output_dir), steps=args.steps, progress=not args.quiet)


def cmd_data_inspect(args: argparse.Namespace) -> int:
    config = api.run_config(args.config, args.set)
    tokenizer = load_tokenizer(config.base_model, config.revision)
    print(inspect_data(config.data, tokenizer, n=args.n, as_json=args.json, task=config.task,
                       batch_size=config.train.micro_batch_size))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    thresholds = parse_thresholds(args.fail_below or [])  # a bad spec stops here, before the eval runs
    report = api.evaluate(args.config, args.adapter, args.out, args.set, fail_below=args.fail_below)
    print(json.dumps(report.json, indent=2) if args.json else report.markdown)
    failures = report.failures(thresholds)
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


def cmd_adapters_list(args: argparse.Namespace) -> int:
    rows = list_adapters(args.dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no adapters (adapter_config.json) under {args.dir}")
        return 0
    for row in rows:
        if "error" in row:
            print(f"{row['path']}: {row['error']}")
            continue
        targets = row["targets"] if isinstance(row["targets"], str) else ",".join(row["targets"] or [])
        print(f"{row['path']}\n  base={row['base_model']} r={row['r']} alpha={row['alpha']} targets={targets}\n"
              f"  data_hash={row['data_hash']} created={row['created']} metrics={row['metrics']}")
    return 0


def cmd_adapters_check(args: argparse.Namespace) -> int:
    problems = check_adapter(args.dir, args.target)
    for problem in problems:
        print(f"- {problem}")
    if not problems:
        print(f"{args.dir}: no problems found for {args.target}")
    return 1 if problems else 0


def cmd_merge(args: argparse.Namespace) -> int:
    out = api.merge(args.base, args.adapter, args.out, force=args.force)
    print(f"merged model written to {out} (standard transformers format, safetensors)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    result = export_gguf(args.source, args.out, fmt=args.format, dtype=args.dtype, base=resolve_base_name(args.base) if args.base else None, force=args.force,
                         check_base=not args.no_check_base, progress=not args.quiet)
    print(result.summary())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    generation = api.GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print(api.generate_text(args.base, args.prompt, args.adapter, raw=args.raw, generation=generation))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = ServeSettings(
        base=resolve_base_name(args.base), quant=args.quant, adapters=parse_adapter_specs(args.adapter),
        adapter_roots=args.adapter_root, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("LORAKIT_API_KEY"), max_batch=args.max_batch,
        max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
        max_waiting=args.max_waiting,
        device=args.device, dtype=args.dtype,
    )
    return run_server(settings)


def cmd_ui(args: argparse.Namespace) -> int:
    preset = demo_run_config()  # the new-run form starts from the quickstart's QLoRA run on the demo
    preset.eval.at_end = True
    return run_ui(args.runs, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LORAKIT_API_KEY"),
                  preset=preset, resolve_base=resolve_base_name)


def cmd_advise(args: argparse.Namespace) -> int:
    config = load_run_config(args.config, args.set) if args.config or args.set else None
    if config is not None and not args.model:  # the advisor reads config.json: 'demo' becomes its directory
        config.base_model = resolve_base_name(config.base_model)
    model = resolve_base_name(args.model) if args.model else None
    advice = advise(config, model=model, memory=args.memory, device=args.device, task=args.task,
                    examples=args.examples, data=args.data, seq_len=args.seq_len, serving=args.serving,
                    price_per_hour=args.price_per_hour, gpu=args.gpu)
    print(json.dumps(advice.to_json(), indent=2) if args.json else advice.render())
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    for key, default, text in field_help(RunConfig):
        print(f"{key:34s} {default!r:>14}  {text}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA and QLoRA fine-tuning: advise, train, evaluate, serve.")

    parser.add_argument("--version", action="version", version=f"lorakit {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="offline demo: QLoRA on a built-in tiny Llama and synthetic task, eval, merge")
    p.add_argument("--output-dir", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("train", help="fine-tune from a YAML run config")
    p.add_argument("config", nargs="?", help="YAML run config (omit for all defaults: the demo)")
    _add_set(p)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    again.add_argument("--overwrite", action="store_true",
                       help="output_dir holds a previous run: start over, moving it to <output_dir>.old-<time>/ "
                            "once the config, data and model are validated (nothing is deleted)")
    p.add_argument("--resume-anyway", action="store_true",
                   help="--resume even though lora/quant/lr/batch/data differ from the checkpoint's (implies --resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-memory-check", action="store_true",
                   help="start even when the advisor predicts the run will not fit in memory")
    p.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="train data-parallel on N local processes (GPUs): re-runs this command under "
                        "torch.distributed.run, like `torchrun --standalone --nproc_per_node N -m lorakit train ...`; "
                        "multi-node: use torchrun with its rendezvous flags")
    p.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="look at the data as the model will see it").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("inspect", help="print the first N examples with supervised tokens marked, plus statistics")
    p.add_argument("config", nargs="?", help="YAML run config")
    p.add_argument("-n", type=int, default=5, help="examples to show (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_set(p)
    p.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("eval", help="base versus tuned: loss, task metrics, forgetting canary")
    p.add_argument("config", nargs="?", help="YAML run config")
    p.add_argument("--adapter", help="adapter directory (default: <output_dir>/adapter)")
    p.add_argument("--out", help="report directory (default: <output_dir>/eval)")
    p.add_argument("--json", action="store_true", help="print eval.json instead of the table")
    p.add_argument("--fail-below", action="append", metavar="METRIC=VALUE", help="exit 1 when tuned METRIC < VALUE")
    _add_set(p)
    p.set_defaults(func=cmd_eval)

    adapters = sub.add_parser("adapters", help="list and check adapter directories").add_subparsers(dest="adapters_cmd", required=True)
    p = adapters.add_parser("list", help="adapters under DIR: base, rank, targets, data hash, created, metrics")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_adapters_list)
    p = adapters.add_parser("check", help="what a serving engine would reject")
    p.add_argument("dir")
    p.add_argument("--for", dest="target", default="vllm", choices=["vllm"], help="serving engine (default vllm)")
    p.set_defaults(func=cmd_adapters_check)

    p = sub.add_parser("merge", help="fold an adapter into its base and save a standard transformers model")
    p.add_argument("--base", required=True, help="hub id or directory of the base model ('demo' for the built-in one)")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--out", required=True, help="output directory (new or empty, unless --force)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out: replace only the files merge writes, keep the rest")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="GGUF for llama.cpp and Ollama (merged, or base + GGUF LoRA), with a Modelfile")
    p.add_argument("source", metavar="RUN_OR_ADAPTER", help="run directory, adapter directory or model directory")
    p.add_argument("--format", choices=["gguf", "gguf-lora"], default="gguf",
                   help="gguf: one file, adapter merged (default); gguf-lora: base GGUF + the adapter as a GGUF LoRA")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16", help="tensor type (default f16)")
    p.add_argument("--out", help="output directory (default: <run>/<format>-<dtype>)")
    p.add_argument("--base", help="base model (hub id or directory) if the run or adapter does not name it")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-check-base", action="store_true", help="skip the adapter's base-model fingerprint check")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="one answer from the command line")
    p.add_argument("--base", required=True, help="hub id or directory of the base model ('demo' for the built-in one)")
    p.add_argument("--adapter", help="adapter directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible server: one base, many adapters, mixed in each batch")
    p.add_argument("--base", required=True, help="hub id or directory of the base model ('demo' for the built-in one)")
    p.add_argument("--quant", choices=["none", "nf4"], default="none", help="store the base in 4-bit NF4")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the adapter in DIR as model NAME (repeatable)")
    p.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="directory that POST /v1/load_lora_adapter may load from (repeatable; none = off)")
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set LORAKIT_API_KEY)")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences per forward (default 16)")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="most sequences queued behind the running batch (503 above; default 1024)")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt accepted, in tokens")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (413 above)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="dashboard in the browser: runs, live curves, new runs, chat, export (offline)")
    p.add_argument("--runs", default="runs", help="folder of run directories (default: runs)")
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; any other needs --api-key)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--api-key", help="require this key (log in once in the browser; or set LORAKIT_API_KEY)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("advise", help="what to run, whether it fits in memory and how long it takes (no weights loaded)")
    p.add_argument("--config", help="YAML run config: predict exactly this run")
    p.add_argument("--model", help="hub id, model directory, family (llama-3-8b) or size (8B)")
    p.add_argument("--memory", help="memory to plan for, e.g. 24GB, 24GiB (default: what this machine has)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="device to plan for (default: the config's, or this machine's)")
    p.add_argument("--gpu", help="a GPU not on this machine, for its memory and datasheet rates (e.g. 'RTX 4090')")
    p.add_argument("--task", help="classification, qa, summarization, translation, chat, instruction, code, reasoning, ...")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--examples", type=int, help="number of training examples")
    size.add_argument("--data", help="training data file or directory (examples counted, lengths estimated)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the config's, or from --data)")
    p.add_argument("--serving", choices=["single", "multi"], default="single", help="one merged model or many adapters")
    p.add_argument("--price-per-hour", type=float, help="machine price per hour, for the cost estimate")
    p.add_argument("--json", action="store_true", help="machine-readable output (same numbers)")
    _add_set(p)
    p.set_defaults(func=cmd_advise)

    p = sub.add_parser("config", help="every YAML key with its default and meaning")
    p.set_defaults(func=cmd_config_keys)
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LorakitError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""Reload trained seq_cls adapters in a fresh process, under another torch seed, by lorakit and by PEFT.

    python seq_cls_reload.py JOBS.json OUT.safetensors

JOBS.json maps a name to {base, adapter, num_labels, batch (a safetensors file of model inputs), seed}. For each
job OUT gets `<name>.lorakit` (load_base + the adapter), `<name>.disabled` (the same, adapters disabled),
`<name>.base` (transformers alone, same seed: the base's own random head) and `<name>.peft`
(PeftModel.from_pretrained on that base): logits (rows, num_labels).
"""

from __future__ import annotations

import json
import sys

import peft
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from lorakit import adapters_disabled, load_base


@torch.no_grad()
def reload(job: dict) -> dict[str, torch.Tensor]:
    batch = load_file(job["batch"])
    torch.manual_seed(job["seed"])
    model, _ = load_base(job["base"], task="seq_cls", num_labels=job["num_labels"], adapter=job["adapter"])
    out = {"lorakit": model(**batch).logits}
    with adapters_disabled(model):
        out["disabled"] = model(**batch).logits
    torch.manual_seed(job["seed"])
    base = tf.AutoModelForSequenceClassification.from_pretrained(job["base"], num_labels=job["num_labels"]).eval()
    out["base"] = base(**batch).logits
    out["peft"] = peft.PeftModel.from_pretrained(base, job["adapter"]).eval()(**batch).logits
    return out


def main(jobs_path: str, out_path: str) -> None:
    jobs = json.loads(open(jobs_path).read())
    results = {f"{name}.{k}": v.contiguous() for name, job in jobs.items() for k, v in reload(job).items()}
    save_file(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])

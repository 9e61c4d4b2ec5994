"""`lorakit train`: one loop for LoRA, QLoRA and full fine-tuning (the method is config).

    setup     the model as the method asks, optimizer, schedule, data order (BatchPlan)
    loop      the optimizer step, eval, checkpoints, progress (Loop)
    outputs   adapter/ or model/, loss.png, summary.json, the printed summary
    run       `train_lora`: validate → check memory → data → load → loop → save → eval at the end
"""

from lorakit.errors import TrainingError
from lorakit.loss import loss_sum, supervised_tokens
from lorakit.train.loop import Loop, run_loop, to_device
from lorakit.train.outputs import TrainResult, format_summary, plot_losses, write_summary
from lorakit.train.run import train_lora
from lorakit.train.setup import (
    BatchPlan,
    adapt_for_method,
    build_optimizer,
    build_scheduler,
    lr_factor,
    prepare_model,
    total_steps,
)

__all__ = [
    "BatchPlan", "Loop", "TrainResult", "TrainingError", "adapt_for_method", "build_optimizer", "build_scheduler",
    "format_summary", "loss_sum", "lr_factor", "plot_losses", "prepare_model", "run_loop", "supervised_tokens",
    "to_device", "total_steps", "train_lora", "write_summary",
]

"""`lorakit eval`: base vs tuned on the same rows -- loss and perplexity, generation metrics, a forgetting canary.

    metrics   pure scores of text and labels (exact match, F1, ROUGE-L, JSON/schema, accuracy, macro F1)
    prompts   generation prompts and references (a prompt file, or the eval split's own token ids)
    canary    general text the task never saw: did perplexity rise?
    report    the comparison table, markdown, plot and saved files
    run       scoring one model with its adapter on and off; `evaluate_run` for a whole run
"""

from lorakit.eval.canary import GENERAL_CANARY, CanaryResult, canary_check, canary_rows, completion_batches
from lorakit.eval.metrics import (
    ALL_METRICS,
    LOWER_IS_BETTER,
    RATE_METRICS,
    accuracy,
    check_thresholds,
    exact_match,
    json_valid,
    lcs_length,
    macro_f1,
    normalize_answer,
    parse_json,
    parse_thresholds,
    predicted_label,
    rouge_l,
    schema_errors,
    schema_valid,
    score_generations,
    token_f1,
)
from lorakit.eval.prompts import (
    EvalSettings,
    PromptSet,
    load_schema,
    prompts_from_examples,
    prompts_from_rows,
)
from lorakit.eval.report import CompareRow, EvalReport, compare, markdown_table, plot_comparison
from lorakit.eval.run import eval_classifier, eval_loss, evaluate_run, load_for_eval, run_eval, score_model

__all__ = [
    "ALL_METRICS", "GENERAL_CANARY", "LOWER_IS_BETTER", "RATE_METRICS", "CanaryResult", "CompareRow", "EvalReport",
    "EvalSettings", "PromptSet", "accuracy", "canary_check", "canary_rows", "check_thresholds", "compare",
    "completion_batches", "eval_classifier", "eval_loss", "evaluate_run", "exact_match", "json_valid", "lcs_length",
    "load_for_eval", "load_schema", "macro_f1", "markdown_table", "normalize_answer", "parse_json",
    "parse_thresholds", "plot_comparison", "predicted_label", "prompts_from_examples", "prompts_from_rows",
    "rouge_l", "run_eval", "schema_errors", "schema_valid", "score_generations", "score_model", "token_f1",
]

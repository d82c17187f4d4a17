"""Evaluation of trained checkpoints.

Tasks (each a module, all reachable from ``python -m hybrid_megatron.evaluation <task>``):

- ``nll``: mean NLL and perplexity on held-out data (the trainer's validation set by default);
- ``generation``: greedy / sampled generation with and without KV + SSM state caching;
- ``inference``: decode throughput at batch sizes x context lengths, measured cache bytes;
- ``extrapolation``: loss by position bucket at 1x..8x the training context;
- ``niah``: needle-in-a-haystack (pass-key retrieval) over context lengths x needle depths;
- ``lm_eval_adapter``: an lm-evaluation-harness model (only when ``lm_eval`` is installed);
- ``mlflow_log``: results logged to the checkpoint's MLflow run.
"""

from hybrid_megatron.evaluation.common import load_for_eval

__all__ = ["load_for_eval"]

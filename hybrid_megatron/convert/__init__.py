"""Checkpoint conversion to and from Hugging Face layouts (``python -m hybrid_megatron.convert``).

Targets: ``nemotron_h`` (NemotronHForCausalLM), ``falcon_h1`` (FalconH1ForCausalLM),
``remote_code`` (a self-contained modeling file loaded with ``trust_remote_code=True``), and
``auto`` (the most widely servable exact one). ``exactness`` refuses inexact targets.
"""

from hybrid_megatron.convert.exactness import NotExactError, choose_target
from hybrid_megatron.convert.export import export_model, from_hf, hf_config_and_tensors, to_hf

__all__ = ["NotExactError", "choose_target", "export_model", "from_hf", "hf_config_and_tensors", "to_hf"]

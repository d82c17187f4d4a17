"""Model accounting: parameters, training FLOPs and inference cache, per block type.

``python -m hybrid_megatron.accounting RECIPE [--seq-len L] [--json]`` prints all three.
"""

from hybrid_megatron.accounting.cache import BlockCache, CacheReport, cache_bytes
from hybrid_megatron.accounting.flops import (
    BlockFlops,
    FlopReport,
    model_flops_per_token,
    training_flops,
)
from hybrid_megatron.accounting.params import (
    BlockParams,
    ParamReport,
    count_parameters,
)
from hybrid_megatron.accounting.report import AccountingReport, account, render_table, to_dict

__all__ = [
    "AccountingReport",
    "BlockCache",
    "BlockFlops",
    "BlockParams",
    "CacheReport",
    "FlopReport",
    "ParamReport",
    "account",
    "cache_bytes",
    "count_parameters",
    "model_flops_per_token",
    "render_table",
    "to_dict",
    "training_flops",
]

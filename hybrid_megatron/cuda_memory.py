"""The CUDA caching allocator's setting for this package: expandable segments."""

from __future__ import annotations

import os

ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def expandable_segments_by_default() -> None:
    """Have torch's CUDA caching allocator grow segments in place instead of caching fixed blocks.

    At 8K context the step allocates a few large, differently sized buffers per micro-batch (the
    LM head's [tokens x 128K] logits: 7.8 GiB at micro-batch 4). With fixed segments, the freed
    blocks of one micro-batch do not fit the next one's requests, so a step that fits once runs
    out of memory on its second micro-batch (measured on an H100: the 1b intra model at
    micro-batch 4 trains one micro-batch per step, 75.7 GiB peak, but not two).

    Takes nothing, returns nothing. Sets the environment default, which the allocator reads when
    CUDA is first used (also by child processes); an explicit ``PYTORCH_CUDA_ALLOC_CONF`` wins.
    """
    os.environ.setdefault(ALLOC_CONF_ENV, EXPANDABLE_SEGMENTS)

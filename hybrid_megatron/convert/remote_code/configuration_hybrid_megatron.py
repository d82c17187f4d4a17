"""Config class of the ``hybrid_megatron`` remote-code export (copied verbatim into the export).

Self-contained: imports only transformers. Describes one model of the hybrid_megatron design
space (Transformer / SWA / Mamba2 / inter-layer / intra-layer hybrids, dense or MoE FFN).
"""

from transformers import PretrainedConfig


class HybridMegatronConfig(PretrainedConfig):
    """Sizes and block choices of a hybrid_megatron model.

    ``layer_pattern`` holds one letter per layer: ``A`` attention block, ``M`` Mamba2 block,
    ``H`` intra-layer hybrid block. Every block is pre-norm mixer + residual, then (unless it is
    an ``M`` block with ``mamba_block_ffn`` false) pre-norm SwiGLU FFN or MoE + residual.
    """

    model_type = "hybrid_megatron"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=256,
        layer_pattern="AM",
        ffn_hidden_size=704,
        mamba_block_ffn=True,
        norm_epsilon=1e-5,
        max_position_embeddings=4096,
        # attention (A blocks)
        num_attention_heads=4,
        num_query_groups=4,
        head_dim=64,
        sliding_window=None,
        rotary_base=10000,
        # Mamba2 (M blocks and the H blocks' Mamba branch)
        mamba_state_dim=64,
        mamba_head_dim=64,
        mamba_num_groups=1,
        mamba_d_inner=512,
        mamba_conv_kernel=4,
        mamba_chunk_size=128,
        mamba_norm_epsilon=1e-5,
        # intra-layer hybrid (H blocks)
        intra_attention_width=0,
        intra_mamba_width=0,
        intra_num_query_groups=None,
        intra_branch_norm="none",
        intra_branch_scalars=False,
        intra_fusion="concat",
        # MoE FFN (None: dense SwiGLU)
        moe_num_experts=None,
        moe_top_k=2,
        moe_ffn_hidden_size=None,
        moe_shared_expert_ffn_hidden_size=None,
        moe_pre_softmax=False,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.layer_pattern = layer_pattern
        self.num_hidden_layers = len(layer_pattern)
        self.ffn_hidden_size = ffn_hidden_size
        self.mamba_block_ffn = mamba_block_ffn
        self.norm_epsilon = norm_epsilon
        self.max_position_embeddings = max_position_embeddings
        self.num_attention_heads = num_attention_heads
        self.num_query_groups = num_query_groups
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.rotary_base = rotary_base
        self.mamba_state_dim = mamba_state_dim
        self.mamba_head_dim = mamba_head_dim
        self.mamba_num_groups = mamba_num_groups
        self.mamba_d_inner = mamba_d_inner
        self.mamba_conv_kernel = mamba_conv_kernel
        self.mamba_chunk_size = mamba_chunk_size
        self.mamba_norm_epsilon = mamba_norm_epsilon
        self.intra_attention_width = intra_attention_width
        self.intra_mamba_width = intra_mamba_width
        self.intra_num_query_groups = intra_num_query_groups
        self.intra_branch_norm = intra_branch_norm
        self.intra_branch_scalars = intra_branch_scalars
        self.intra_fusion = intra_fusion
        self.moe_num_experts = moe_num_experts
        self.moe_top_k = moe_top_k
        self.moe_ffn_hidden_size = moe_ffn_hidden_size
        self.moe_shared_expert_ffn_hidden_size = moe_shared_expert_ffn_hidden_size
        self.moe_pre_softmax = moe_pre_softmax
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

"""The configuration of an exported looped model (`looped export`), for `transformers`.

This file is copied into every exported model directory and needs `transformers` only. The
fields mirror looped's ModelConfig; `loops` is the iteration count a forward pass runs unless
it is given one, and `depth_sources` names the Depth-Attention source policy (none | dense |
strided | same_layer | anchor | window | anchor_window | loop_strided) with its knobs
`depth_stride` and `depth_window`.
"""

from transformers import PretrainedConfig


class LoopedConfig(PretrainedConfig):
    model_type = "looped"
    # the names other tools look for (lm-eval reads max_position_embeddings)
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads",
                     "num_key_value_heads": "n_kv_heads", "max_position_embeddings": "max_seq_len",
                     "intermediate_size": "ffn_dim", "rms_norm_eps": "norm_eps"}

    def __init__(self, vocab_size=256, d_model=128, n_layers=2, n_prelude=0, n_coda=0, n_heads=4,
                 n_kv_heads=2, head_dim=32, ffn_dim=384, rope_theta=10000.0, pos_embedding=False,
                 max_seq_len=256, norm_eps=1e-6, tie_embeddings=True, share_weights=True,
                 injection="add", init_state="zeros", init_std=0.02, exit_gate=False,
                 state_norm=False, depth_sources="none", depth_stride=None, depth_window=0, loops=1, **kwargs):
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.n_prelude, self.n_coda = n_prelude, n_coda
        self.n_heads, self.n_kv_heads, self.head_dim, self.ffn_dim = (n_heads, n_kv_heads,
                                                                      head_dim, ffn_dim)
        self.rope_theta, self.pos_embedding, self.max_seq_len = rope_theta, pos_embedding, max_seq_len
        self.norm_eps, self.tie_embeddings, self.share_weights = norm_eps, tie_embeddings, share_weights
        self.injection, self.init_state, self.init_std = injection, init_state, init_std
        self.exit_gate, self.state_norm = exit_gate, state_norm
        self.depth_sources, self.depth_stride, self.depth_window = (depth_sources, depth_stride,
                                                                    depth_window)
        self.loops = loops
        # the head reads the embedding matrix itself (no lm_head weight), so transformers has
        # nothing to tie
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

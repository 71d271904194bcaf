"""The JSON types of the Hugging Face ``config.json`` keys moecpt reads, checked before any family maps them.

A family converts values with ``int()`` / ``float()``, which would turn ``"num_experts_per_tok": 2.5`` into top-2
routing without a word, and report ``"eight"`` only as ``invalid literal for int()`` with no key. Checking the types
first names the key, its value and what it must be. ``null`` is allowed everywhere (transformers writes it for
"use the default"); a key absent from these tables is left to the family, and :class:`ReadLog` names the last key
it read when a conversion still fails.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moecpt.errors import MoecptError

#: keys holding a whole number (JSON integer; ``8.0`` is accepted as 8, ``true`` is not a number)
INT_KEYS = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim",
    "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
    "num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
    "moe_num_shared_experts", "n_group", "topk_group", "first_k_dense_replace", "num_nextn_predict_layers",
    "decoder_sparse_step", "max_position_embeddings", "max_window_layers", "sliding_window", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_layer_start_index",
    "moe_layer_end_index", "moe_layer_interval", "moe_layer_freq",
    "original_max_position_embeddings",  # inside rope_scaling / rope_parameters
})
#: keys holding a real number (JSON number, finite)
FLOAT_KEYS = frozenset({
    "rms_norm_eps", "rope_theta", "initializer_range", "routed_scaling_factor", "router_aux_loss_coef",
    "router_z_loss_coef", "aux_loss_alpha", "partial_rotary_factor", "embedding_multiplier", "residual_multiplier",
    "attention_multiplier", "logits_scaling", "clip_qkv",
    "factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",  # inside rope_scaling
})
#: keys holding true / false
BOOL_KEYS = frozenset({
    "norm_topk_prob", "tie_word_embeddings", "attention_bias", "use_sliding_window", "use_qk_norm", "use_bias",
    "qkv_bias", "mlp_bias", "seq_aux",
})
#: nested objects whose keys are checked too
NESTED = ("rope_scaling", "rope_parameters")


def _problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for ``key``, or None."""
    if value is None:
        return None
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in INT_KEYS and not (is_num and math.isfinite(value) and float(value).is_integer()):
        return "must be a whole number"
    if key in FLOAT_KEYS and not (is_num and math.isfinite(value)):
        return "must be a finite number"
    if key in BOOL_KEYS and not isinstance(value, bool):
        return "must be true or false"
    return None


def check_config_types(config: dict[str, Any], path: str | Path) -> None:
    """Refuse a ``config.json`` whose known keys hold the wrong JSON type, naming the key.

    Args:
        config: the parsed ``config.json`` object.
        path: the file, for the message.

    Raises:
        MoecptError: ``<path>: num_experts_per_tok = 2.5 must be a whole number; fix it in config.json``.
    """
    items: list[tuple[str, str, Any]] = [(k, k, v) for k, v in config.items()]
    for outer in NESTED:
        if isinstance(config.get(outer), dict):
            items += [(k, f"{outer}.{k}", v) for k, v in config[outer].items()]
    for key, shown, value in items:
        why = _problem(key, value)
        if why:
            raise MoecptError(f"{path}: {shown} = {_show(value)} {why}; fix it in config.json")


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value).replace("True", "true").replace("False", "false")
    return text if len(text) <= 40 else text[:37] + "..."


class ReadLog(dict):
    """A ``config.json`` dict that remembers the last key read (``hf[key]`` / ``hf.get(key)``), so a conversion
    error raised while a family maps it can name the key."""

    last: str | None = None

    def __getitem__(self, key: str) -> Any:
        self.last = key
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.last = key
        return super().get(key, default)

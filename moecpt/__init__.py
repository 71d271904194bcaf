"""moecpt: continual pre-training of Mixture-of-Experts language models.

Public entry points are imported lazily so that ``import moecpt`` stays cheap for the CLI.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(path, device="cpu"):
    """Load a moecpt checkpoint (or run folder) and return the model in eval mode.

    Args:
        path: a checkpoint folder written by ``moecpt pretrain`` / ``moecpt cpt``, or a run folder
            (its latest checkpoint is used).
        device: torch device string.

    Returns:
        ``moecpt.model.transformer.Transformer`` whose ``forward(input_ids_BT)`` returns logits ``[B, T, V]``.

    Raises:
        moecpt.errors.MoecptError: the path holds no readable checkpoint.
    """
    from moecpt.train.checkpoint import load_model as _load_model

    return _load_model(path, device=device)

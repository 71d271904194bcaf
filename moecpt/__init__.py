"""moecpt: continual pre-training of Mixture-of-Experts language models.

Public entry points are imported lazily so that ``import moecpt`` stays cheap for the CLI.
"""

from __future__ import annotations

from moecpt._version import __version__

__all__ = ["__version__", "load_model"]


def load_model(path, device="cpu"):
    """Load a moecpt checkpoint (or run folder), or a Hugging Face MoE folder, and return the model in eval mode.

    Args:
        path: a checkpoint folder written by ``moecpt pretrain`` / ``moecpt cpt`` / ``moecpt import-hf``, a run
            folder (its latest checkpoint is used), or a local Hugging Face folder of the OLMoE, Mixtral,
            Qwen2-MoE, Qwen3-MoE, GLM-4.5 or dots.llm1 family (``config.json`` + ``*.safetensors``, no
            ``meta.json``), which is
            imported in memory (fp32; see :func:`moecpt.interop.hf_import.load_hf_model`).
        device: torch device string.

    Returns:
        ``moecpt.model.transformer.Transformer`` whose ``forward(input_ids_BT)`` returns logits ``[B, T, V]``.

    Raises:
        moecpt.errors.MoecptError: the path holds no readable checkpoint / no supported Hugging Face model.
    """
    from moecpt.interop.hf_import import is_hf_folder

    if is_hf_folder(path):
        from moecpt.interop.hf_import import load_hf_model

        return load_hf_model(path, device=device)
    from moecpt.train.checkpoint import load_model as _load_model

    return _load_model(path, device=device)

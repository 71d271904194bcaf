"""A moecpt checkpoint as an EleutherAI lm-evaluation-harness model (``lm_eval``'s ``--model moecpt``).

:class:`MoecptLM` implements the harness's three request types on a moecpt checkpoint (docs/eval.md):

* ``loglikelihood``: the summed log-probability of a continuation given a context (multiple choice, LAMBADA);
  a context longer than the model's window is cut on the left, as the harness's own Hugging Face model does;
* ``loglikelihood_rolling``: the log-probability of a whole document (perplexity tasks), scored in the
  harness's rolling windows (``lm_eval.utils.get_rolling_token_windows``, each token predicted exactly once,
  every window but the first conditioned on as much of the preceding text as fits);
* ``generate_until``: sampling with moecpt's own sampler (:func:`moecpt.train.generate.sample`, greedy unless
  ``do_sample``) until a stop string, the end-of-document token or ``max_gen_toks``.

Scoring is batched: requests are sorted longest first (``lm_eval.models.utils.Collator``), right-padded to the
longest in the batch and restored to their order. Right padding changes nothing for a causal, dropless model; a
model with ``moe.capacity_factor`` set drops tokens per batch (Fedus et al. 2022), so its scores depend on the
batch: use ``batch_size=1`` there. Generation runs one request at a time (the model takes no attention mask, so
left-padded prompts would attend to the padding).

This module imports ``lm_eval`` at import time: import it only where lm-eval is installed (``moecpt[eval]``);
:mod:`moecpt.analysis.harness_run` checks that first and says what to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import Collator, handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tokenizers import Tokenizer

from moecpt.config import DType
from moecpt.data.tokenizer import declared_eod_id, eod_id_of
from moecpt.errors import MoecptError
from moecpt.train.checkpoint import load_checkpoint, load_model, run_tokenizer_path
from moecpt.train.generate import sample
from moecpt.train.trainer import autocast_context, resolve_device

#: the name ``lm_eval --model`` and ``simple_evaluate(model=...)`` know the adapter by
MODEL_NAME = "moecpt"


class HarnessModelArgs(BaseModel):
    """The ``--model_args`` of ``--model moecpt`` (``key=value,...``), validated strictly (docs/design.md, rule A3).

    ``batch_size``, ``max_batch_size`` and ``device`` also arrive from the harness's own ``--batch_size`` /
    ``--device`` flags; ``max_batch_size`` only bounds the harness's ``batch_size=auto`` search, which this
    adapter does not offer, so it is accepted (the harness always passes it) and has no effect.
    """

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint folder or run folder (its latest checkpoint)")
    tokenizer: str | None = Field(None, description="tokenizer.json; default: the one beside the checkpoint/run")
    batch_size: int = Field(1, ge=1, description="sequences per forward pass")
    max_batch_size: int | None = None
    device: str = Field("auto", description="auto (CUDA if available), cpu, cuda, cuda:N")
    dtype: DType = Field(DType.AUTO, description="auto: bf16 autocast on CUDA, fp32 on CPU")
    max_length: int | None = Field(None, ge=2, description="window in tokens; default and at most max_seq_len")
    seed: int | None = Field(None, ge=0, lt=2**63, description="sampling seed for generate_until with do_sample")


def parse_model_args(raw: dict[str, Any]) -> HarnessModelArgs:
    """Validate ``--model_args``; ``None`` values (flags the harness did not get) fall back to the defaults.

    Raises:
        MoecptError: an unknown key or a bad value, named with how to fix it.
    """
    raw = {k: v for k, v in raw.items() if v is not None}
    if str(raw.get("batch_size", "")).startswith("auto"):
        raise MoecptError("--batch_size auto is not supported by the moecpt model; give a number such as 8")
    try:
        return HarnessModelArgs.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "model_args"
        raise MoecptError(f"--model_args {where}: {err['msg']} (known keys: "
                          f"{', '.join(HarnessModelArgs.model_fields)})") from None


class MoecptLM(TemplateLM):
    """lm-evaluation-harness ``LM`` over a moecpt checkpoint.

    Args:
        **model_args: see :class:`HarnessModelArgs` (``checkpoint`` is required).

    Raises:
        MoecptError: bad model args, no readable checkpoint, no tokenizer, ``max_length`` above ``max_seq_len``,
            or CUDA asked for where there is none.
    """

    def __init__(self, **model_args: Any):
        super().__init__()
        args = parse_model_args(model_args)

        ckpt = load_checkpoint(args.checkpoint)
        self._device = resolve_device(args.device)
        self.model = load_model(ckpt.path, device=self._device)
        tok_path = args.tokenizer or run_tokenizer_path(ckpt)
        try:
            self.tokenizer_ = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises a plain Exception on a bad file
            raise MoecptError(f"{tok_path} is not a readable tokenizer.json ({exc})") from None
        self._eod = eod_id_of(self.tokenizer_, declared_eod_id(Path(tok_path).parent))
        limit = self.model.cfg.max_seq_len
        if args.max_length is not None and args.max_length > limit:
            raise MoecptError(f"max_length={args.max_length} exceeds the model's max_seq_len={limit}")
        self.max_length = args.max_length or limit
        self.batch_size = args.batch_size
        self.dtype = args.dtype
        self.seed = args.seed

    # ---------------------------------------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        """moecpt's end-of-document token: what every document of the training data ended with."""
        return self._eod

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``, exactly as the training data was encoded (no special tokens added)."""
        return self.tokenizer_.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer_.decode(ids, skip_special_tokens=True)

    # ---------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _logprobs(self, inputs: list[list[int]]) -> torch.Tensor:
        """fp32 log-probabilities ``[B, T, V]`` of right-padded ``inputs`` (each 1..max_length ids)."""
        width = max(len(x) for x in inputs)
        ids_BT = torch.zeros(len(inputs), width, dtype=torch.long)  # pad id is irrelevant: causal, read before it
        for i, x in enumerate(inputs):
            ids_BT[i, : len(x)] = torch.tensor(x)
        with autocast_context(self._device, self.dtype):
            logits_BTV = self.model(ids_BT.to(self._device))
        return F.log_softmax(logits_BTV.float(), dim=-1)

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), continuation is the greedy one)`` per ``(key, ctx, cont)``.

        The model sees the last ``max_length`` tokens of ``ctx + cont`` minus the final one (left truncation),
        as ``lm_eval.models.huggingface.HFLM`` does.

        Raises:
            MoecptError: an empty continuation, or one longer than ``max_length``.
        """
        for _, _, cont in requests:
            if not 1 <= len(cont) <= self.max_length:
                raise MoecptError(f"a continuation of {len(cont)} tokens cannot be scored in a window of "
                                  f"{self.max_length} tokens (it must be 1..max_length)")
        coll = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        out: list[tuple[float, bool]] = []
        for chunk in coll.get_batched(n=self.batch_size):
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            logp_BTV = self._logprobs(inputs)
            for i, ((key, _, cont), inp) in enumerate(zip(chunk, inputs, strict=True)):
                lp_NV = logp_BTV[i, len(inp) - len(cont): len(inp)]
                target_N = torch.tensor(cont, device=lp_NV.device)
                answer = (float(lp_NV.gather(1, target_N[:, None]).sum()), bool((lp_NV.argmax(-1) == target_N).all()))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                out.append(answer)
        return coll.get_original(out)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-probability (nats) of each whole document, the first token conditioned on the eod token, in the
        harness's disjoint rolling windows of ``max_length`` tokens (batched across documents)."""
        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[n] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its ``until`` strings (cut off, as the harness expects), the eod
        token or ``max_gen_toks`` tokens (default 256). Greedy unless ``do_sample``; then ``temperature``
        (default 1) and ``top_p`` (default 1) apply, seeded by the ``seed`` model arg. An empty context starts
        from the eod token.

        Raises:
            MoecptError: a generation setting other than those, or out-of-range sampling parameters.
        """
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            until, settings = _generation_settings(gen_kwargs)

            def stop(ids: list[int], until=until) -> bool:
                text = self.tok_decode(ids)
                return any(s in text for s in until)

            with autocast_context(self._device, self.dtype):
                ids = sample(self.model, self.tok_encode(context) or [self._eod], eod_id=self._eod, seed=self.seed,
                             stop=stop, **settings)
            text = self.tok_decode(ids)
            for s in until:
                text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


def _generation_settings(gen_kwargs: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """A task's ``generation_kwargs`` as ``(until strings, keyword arguments of moecpt's sampler)``."""
    kw = dict(gen_kwargs)
    until = handle_stop_sequences(kw.pop("until", None), eos=None)
    temperature = float(kw.pop("temperature", 1.0))
    if not kw.pop("do_sample", False):
        temperature = 0.0  # greedy, as the harness means by do_sample = false
    settings = {"max_new_tokens": int(kw.pop("max_gen_toks", 256)), "temperature": temperature,
                "top_p": float(kw.pop("top_p", 1.0))}
    if kw:
        raise MoecptError(f"generation setting(s) {', '.join(sorted(kw))} are not supported by the moecpt model; it "
                          "knows until, max_gen_toks, do_sample, temperature, top_p")
    return until, settings


def register() -> None:
    """Make ``--model moecpt`` known to lm-eval's model registry (idempotent).

    lm-eval fills its registry with its built-in models only when the registry is empty
    (``lm_eval.api.registry.get_model``), so the built-ins are registered first: otherwise ``moecpt`` would be
    the only model ``--model`` could name in this process.
    """
    import lm_eval.models  # noqa: F401  (registers hf, dummy, vllm, ... lazily)

    if model_registry.get(MODEL_NAME, None) is not MoecptLM:
        model_registry.register(MODEL_NAME)(MoecptLM)

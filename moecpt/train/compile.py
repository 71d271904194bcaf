"""``train.compile = true``: :func:`torch.compile` with its failures turned into one-line user errors.

``torch.compile`` is lazy: ``torch.compile(module)`` only wraps the module, and tracing (TorchDynamo) and code
generation (Inductor: C++ on CPU, Triton on CUDA) happen at the first call, inside the training step. A failure
there is a multi-page traceback, although its cause is usually the environment or a model path the compiler
cannot handle, not a bug of the caller. Seen here (torch 2.13, CPU): a dense model compiles and trains; an MoE model
with the default ``model.moe.dispatch = "grouped"`` fails, because the fake-tensor kernel of
``torch._grouped_mm`` accepts bf16 only while the eager CPU kernel runs fp32 (``dispatch = "loop"`` compiles).

:func:`compile_module` therefore

* refuses up front what cannot work: TorchDynamo unsupported on this Python, no C++ compiler for the CPU backend,
  no Triton for the CUDA backend;
* returns a callable that runs the compiled module and turns any TorchDynamo / Inductor failure of a call (the
  first compilation, or a recompilation for a new input shape) into a :class:`~moecpt.errors.MoecptError` naming
  the cause and the fix (``train.compile = false``; for the grouped-matmul failure also ``dispatch = "loop"``).

It never falls back to eager silently (``torch._dynamo.config.suppress_errors`` stays off): a run asked to be
compiled is compiled or stopped. A failure while compiling the *backward* graph surfaces in ``loss.backward()``,
outside this wrapper, and keeps its traceback.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch

from moecpt.errors import MoecptError

_FIX = "set train.compile = false to train without torch.compile"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summary(exc: BaseException) -> str:
    """The gist of a TorchDynamo / Inductor error: its first line plus the root cause when Dynamo names one."""
    inner = getattr(exc, "inner_exception", None)  # BackendCompilerFailed / InductorError wrap the real cause
    if isinstance(inner, BaseException) and inner is not exc:
        backend = getattr(exc, "backend_name", None)
        where = f"backend {backend!r}: " if backend else ""
        return _one_line(f"{where}{type(inner).__name__}: {_summary(inner)}")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head = lines[0]
    explanation = next((line.removeprefix("Explanation:").strip() for line in lines
                        if line.startswith("Explanation:")), "")
    if ": got " in explanation:  # "Dynamo failed to run FX node ...: got RuntimeError('...')": keep the cause
        explanation = explanation.rsplit(": got ", 1)[1]
    return _one_line(f"{head}: {explanation}" if explanation else head)


def check_compile_backend(device: torch.device | str) -> None:
    """Refuse up front when ``torch.compile``'s default backend (Inductor) cannot work on ``device`` here.

    Raises:
        MoecptError: TorchDynamo does not support this Python / platform; on CPU no working C++ compiler is found
            (Inductor compiles C++; install g++ or set ``CXX``); on CUDA Triton is not installed.
    """
    device = torch.device(device)
    try:
        from torch._dynamo.eval_frame import is_dynamo_supported
    except ImportError:  # a torch without this helper: let the call decide
        is_dynamo_supported = None
    if is_dynamo_supported is not None and not is_dynamo_supported():
        raise MoecptError(f"train.compile = true, but torch.compile (TorchDynamo) does not support this Python / "
                          f"platform with torch {torch.__version__}; {_FIX}")
    if device.type == "cpu":
        try:
            from torch._inductor import config as inductor_config
            from torch._inductor.cpp_builder import get_cpp_compiler
        except ImportError:
            return
        try:
            get_cpp_compiler()
        except Exception:  # torch._inductor.exc.InvalidCxxCompiler (or a broken compiler)
            try:
                cxx = inductor_config.cpp.cxx
                searched = [str(c) for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]
            except AttributeError:
                searched = []
            raise MoecptError(f"train.compile = true on cpu needs a C++ compiler (torch.compile's Inductor backend "
                              f"builds C++), but none works here (searched: {', '.join(searched) or 'none'}); "
                              f"install g++ or point the CXX environment variable at one, or {_FIX}") from None
    elif device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return
        if not has_triton():
            raise MoecptError(f"train.compile = true on {device} needs Triton (torch.compile's Inductor backend "
                              f"generates Triton kernels), which is not installed; pip install triton, or {_FIX}")


def compile_module(module: torch.nn.Module, device: torch.device | str, *, backend: Any = "inductor"
                   ) -> Callable[..., Any]:
    """``torch.compile(module)`` for ``device``, returned as a callable whose compiler failures are user errors.

    Args:
        module: the model (its ``__call__`` is compiled; parameters stay shared with ``module``).
        device: where the model runs; decides which backend checks apply (C++ compiler on CPU, Triton on CUDA).
        backend: the ``torch.compile`` backend (default Inductor; tests pass a failing one).

    Returns:
        A callable taking the module's arguments. Compilation happens at its first call (and again for new input
        shapes); a TorchDynamo / Inductor failure there raises :class:`MoecptError`.

    Raises:
        MoecptError: up front, when the backend cannot work here (:func:`check_compile_backend`) or
            ``torch.compile`` itself refuses; at a call, when tracing or code generation fails (one line naming the
            cause, and ``train.compile = false`` as the fix; for ``torch._grouped_mm`` also
            ``model.moe.dispatch = "loop"``).
    """
    device = torch.device(device)
    if backend == "inductor":
        check_compile_backend(device)
    try:
        compiled = torch.compile(module, backend=backend)
    except Exception as exc:  # RuntimeError: e.g. an unsupported Python or platform
        raise MoecptError(f"train.compile = true, but torch.compile refused ({type(exc).__name__}: "
                          f"{_summary(exc)}); {_FIX}") from exc
    from torch._dynamo.exc import TorchDynamoException  # base of Unsupported, TorchRuntimeError, InductorError, ...

    def error(exc: BaseException) -> MoecptError:
        hint = ""
        if "_grouped_mm" in str(exc):
            hint = (', or set model.moe.dispatch = "loop" (torch.compile cannot trace the grouped expert matmul '
                    f"on {device.type} with this torch)")
        return MoecptError(f"train.compile = true: torch.compile failed on {device} "
                           f"({type(exc).__name__}: {_summary(exc)}); {_FIX}{hint}")

    first = [True]

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not first[0]:
            try:
                return compiled(*args, **kwargs)
            except TorchDynamoException as exc:  # a recompilation (new shapes) failed
                raise error(exc) from exc
        with _HeldDiagnostics() as held:  # the first compilation: its logged tracebacks are the error's detail
            try:
                out = compiled(*args, **kwargs)
            except TorchDynamoException as exc:
                held.discard()
                raise error(exc) from exc
        first[0] = False
        return out

    forward.__doc__ = f"torch.compile'd forward of {type(module).__name__} on {device} (failures: MoecptError)."
    return forward


class _HeldDiagnostics:
    """Holds back torch's log records and the warnings emitted inside the ``with`` block; they are replayed at
    its end unless :meth:`discard` was called (then the one-line error replaces them)."""

    def __init__(self) -> None:
        self._held: list[tuple[logging.Handler, logging.LogRecord]] = []
        self._handlers: list[logging.Handler] = []
        self._warnings: list[warnings.WarningMessage] = []
        self._discard = False

    def discard(self) -> None:
        """Drop what was held (the caller reports the failure itself)."""
        self._discard = True

    def __enter__(self) -> "_HeldDiagnostics":
        seen: set[int] = set()
        for name, lg in list(logging.Logger.manager.loggerDict.items()):
            if (name == "torch" or name.startswith("torch.")) and isinstance(lg, logging.Logger):
                for h in lg.handlers:
                    if id(h) not in seen:
                        seen.add(id(h))
                        hold = _Hold(h, self._held)
                        h.addFilter(hold)
                        self._handlers.append(h)
        self._catch = warnings.catch_warnings(record=True)
        self._warnings = self._catch.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._catch.__exit__(*exc_info)
        for h in self._handlers:
            for f in [f for f in h.filters if isinstance(f, _Hold)]:
                h.removeFilter(f)
        if self._discard:
            return
        for w in self._warnings:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
        for h, record in self._held:
            h.handle(record)


class _Hold(logging.Filter):
    """A handler filter that keeps ``(handler, record)`` instead of letting the handler emit it."""

    def __init__(self, handler: logging.Handler, held: list) -> None:
        super().__init__()
        self._handler, self._held = handler, held

    def filter(self, record: logging.LogRecord) -> bool:
        self._held.append((self._handler, record))
        return False

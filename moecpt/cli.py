"""The single ``moecpt`` command line.

Each area of the package registers its own subcommands (``register(subparsers)`` in ``<area>/cli.py``), so this
file stays a thin dispatcher. Modules are listed here explicitly: no import-time registry.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import os
import re
import sys
from typing import NoReturn

from moecpt._version import __version__
from moecpt.argtypes import int_at_least, positive_int  # noqa: F401  (re-exported for older imports)
from moecpt.errors import MoecptError
from moecpt.storage.outputs import os_error_line

# Conditions of the machine, not of moecpt's code: reported in one line wherever they surface.
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                                 errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EMFILE})

# Each module defines ``register(subparsers)`` adding parsers whose ``func(args) -> int`` runs the command.
_COMMAND_MODULES = (
    "moecpt.model.cli",
    "moecpt.data.cli",
    "moecpt.distributed.cli",  # pretrain, cpt (they launch: torchrun, simulated workers)
    "moecpt.distributed.plan_cli",  # plan (memory and communication of a job on a mesh)
    "moecpt.train.cli",  # generate
    "moecpt.train.schedule_cli",
    "moecpt.analysis.cli",  # eval, compare
    "moecpt.study.cli",  # study
    "moecpt.lopt.cli",
    "moecpt.interop.cli",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse with moecpt's error style: one line that says what is wrong and where the usage is, instead of
    the usage block followed by the error (every subcommand's parser is of this class: argparse builds
    subparsers with the class of their parent)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{_did_you_mean(message)}; see `{self.prog} --help`\n")


def _did_you_mean(message: str) -> str:
    """``; did you mean 'pretrain'?`` for argparse's "invalid choice: 'pretian' (choose from ...)" one typo away from
    a choice, else ''."""
    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if found is None:
        return ""
    match = difflib.get_close_matches(found[1], re.findall(r"'([^']*)'", found[2]), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="moecpt",
        description="Continual pre-training of Mixture-of-Experts language models and router diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"moecpt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        # every area is part of the package: a failing import is a broken install and keeps its traceback.
        # Optional extras (transformers, tensorboard, wandb) are imported only by the commands that use them,
        # which report a missing one in one line naming the extra to install.
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MoecptError as exc:
        print(f"moecpt: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except BrokenPipeError:  # `moecpt ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise  # anything else is a bug and keeps its traceback

        print(f"moecpt: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moecpt: interrupted; the last complete checkpoint is kept: run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

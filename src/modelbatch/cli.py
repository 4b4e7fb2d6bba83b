"""The ``modelbatch`` console command: ``modelbatch demo`` and ``modelbatch bench``.

Every usage error (a bad option value, a device this machine lacks, a missing optional
extra) ends with exit status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["OneLineParser", "main", "parse_device"]

_USAGE = """usage: modelbatch {demo,bench} [options]
       modelbatch --version

  demo    train a sweep of MLPs on scikit-learn's digits data as one ModelBatch
  bench   throughput benchmark against sequential training and torch.func vmap

Run 'modelbatch COMMAND --help' for the options of a command."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr and exit status 2,
    and whose ``--help`` shows every default."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parse_device(name: str | None) -> Any:
    """The ``torch.device`` a ``--device`` option names (None: cuda when present, else cpu).

    Raises ValueError with a one-line reason for a name torch does not know, a device
    type other than cpu and cuda, or a CUDA device this machine does not have.
    """
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"--device {name!r}: not a device name (use cpu, cuda or cuda:K)"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this PyTorch build sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    return device


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``modelbatch`` command. Returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if args else 2
    if args[0] == "--version":
        import torch

        from modelbatch import __version__

        print(f"modelbatch {__version__} (torch {torch.__version__})")
        return 0
    command, rest = args[0], args[1:]
    if command not in ("demo", "bench"):
        print(f"modelbatch: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
        return 2
    try:
        if command == "demo":
            from modelbatch.demo import main as run

            return run(rest)
        from modelbatch.bench import main as run

        return run(rest)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message printed)
        return _exit_code(e)
    except ImportError as e:  # a missing optional extra
        print(f"modelbatch {command}: {e}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

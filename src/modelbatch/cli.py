"""The ``modelbatch`` console command: ``modelbatch demo`` and ``modelbatch bench``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

_USAGE = """usage: modelbatch {demo,bench} [options]
       modelbatch --version

  demo    train a sweep of MLPs on scikit-learn's digits data as one ModelBatch
  bench   throughput benchmark against sequential training and torch.func vmap

Run 'modelbatch COMMAND --help' for the options of a command."""


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
    if command == "demo":
        from modelbatch.demo import main as demo_main

        return demo_main(rest)
    if command == "bench":
        from modelbatch.bench import main as bench_main

        return bench_main(rest)
    print(f"modelbatch: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

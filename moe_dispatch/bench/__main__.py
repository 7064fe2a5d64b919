"""Entry point of ``python -m moe_dispatch.bench`` (see ``moe_dispatch.bench.cli``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

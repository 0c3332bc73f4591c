"""Entry point for the torchrun test: registers the tiny test benchmarks, then runs the CLI."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import tiny_bench  # noqa: E402,F401  (registers tiny-mtl / tiny-multi)

from mtlens.cli.main import app  # noqa: E402

if __name__ == "__main__":
    sys.exit(app())

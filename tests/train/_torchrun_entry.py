"""Entry point for the torchrun tests: registers the tiny test benchmarks, then runs the CLI.

``MTLENS_TEST_EXIT_AT_STEP=N`` makes every rank exit at once (``os._exit``, no cleanup: a kill)
right after global step N, to test resuming a killed data-parallel run."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import tiny_bench  # noqa: E402,F401  (registers tiny-mtl / tiny-multi)

from mtlens.cli.main import app  # noqa: E402


def _exit_at(step: int) -> None:
    from mtlens.train import Callback, Trainer

    class ExitAt(Callback):
        def on_step_end(self, trainer, log):
            if trainer.global_step == step:
                os._exit(137)

    init = Trainer.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.callbacks.append(ExitAt())

    Trainer.__init__ = patched


if __name__ == "__main__":
    if os.environ.get("MTLENS_TEST_EXIT_AT_STEP"):
        _exit_at(int(os.environ["MTLENS_TEST_EXIT_AT_STEP"]))
    sys.exit(app())

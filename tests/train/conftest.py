import tiny_bench  # noqa: F401  (registers the tiny-mtl and tiny-multi test benchmarks)

import mtlens  # noqa: F401

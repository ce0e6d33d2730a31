"""Options shared by the benchmark tests (`make bench`; marker `benchmark`, left out of `make test`).

pytest tests/benchmarks -m benchmark --bench-size small --bench-csv runs/bench
"""

from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("imontage benchmarks")
    group.addoption(
        "--bench-size",
        choices=("small", "full"),
        default=None,
        help="problem sizes: 'full' = the documented shapes (GPU), 'small' = CPU-sized (default: full on CUDA)",
    )
    group.addoption("--bench-shapes", default="", help="comma-separated shape names to run (default: all)")
    group.addoption(
        "--bench-repeats", type=int, default=0, help="timed repetitions per case (0: the benchmark's own)"
    )
    group.addoption("--bench-workers", type=int, default=2, help="data-loader workers for data benchmarks")
    group.addoption("--bench-csv", default="runs/bench", help="folder the CSV files are written to")


@pytest.fixture
def bench_options(request: pytest.FixtureRequest) -> dict:
    import torch

    config = request.config
    size = config.getoption("--bench-size") or ("full" if torch.cuda.is_available() else "small")
    shapes = [s for s in config.getoption("--bench-shapes").split(",") if s]
    csv_dir = Path(config.getoption("--bench-csv"))
    csv_dir.mkdir(parents=True, exist_ok=True)
    return {
        "size": size,
        "shapes": shapes,
        "repeats": config.getoption("--bench-repeats"),
        "workers": config.getoption("--bench-workers"),
        "csv_dir": csv_dir,
    }

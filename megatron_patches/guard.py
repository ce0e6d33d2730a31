"""Which megatron-core versions the patches were written and tested against."""

from __future__ import annotations

import types
from typing import Any

# Minor versions of megatron-core 0.x whose tensor_parallel code the patches target.
SUPPORTED_MINOR = range(12, 17)


def megatron_version() -> tuple[int, int, int]:
    from megatron.core import package_info

    return int(package_info.MAJOR), int(package_info.MINOR), int(package_info.PATCH)


def check_version() -> None:
    major, minor, patch = megatron_version()
    if major != 0 or minor not in SUPPORTED_MINOR:
        raise RuntimeError(
            f"megatron-core {major}.{minor}.{patch} is not one the CPU patches support "
            f"(0.{SUPPORTED_MINOR.start} to 0.{SUPPORTED_MINOR.stop - 1}); check megatron_patches against it first"
        )


def require(module: types.ModuleType, *names: str) -> list[Any]:
    """The attributes ``names`` of ``module``; a clear error when a release moved one."""
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise RuntimeError(
            f"megatron-core {'.'.join(map(str, megatron_version()))}: {module.__name__} has no {missing}; "
            "the CPU patches do not match this release"
        )
    return [getattr(module, name) for name in names]

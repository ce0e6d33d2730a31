"""Reading files imontage does not trust: JSON that may be anything, named in every error.

Shards, diffusers folders, checkpoints and latent files come from elsewhere (docs/checkpoints.md,
"What imontage trusts"). Their JSON parts (``config.json``, ``state.json``, safetensors indexes
and metadata) are read here: bounded in size before they are read, parsed without recursion
limits turning into tracebacks, and checked for the type each caller expects, so that a bad file
ends in one :class:`InputError` line naming the file and the key, never in ``KeyError`` or
``RecursionError`` from deep inside a conversion.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

# The largest JSON file read whole: a safetensors index of a 10^5-tensor model is ~10 MB.
MAX_JSON_BYTES = 64 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")  # weights files never opened
_T = TypeVar("_T")
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false"}  # fmt: skip


class InputError(ValueError):
    """A file (or a value in it) that is not what its name declares; the message names the file
    and, where known, the key. The tools print it as one line and exit with status 2."""


class ConversionError(InputError):
    """A checkpoint or model file that cannot be read or converted; the message names the file and,
    where known, the tensor."""


def refuse_pickle(file: Path, why: str = "") -> None:
    """Refuses, unopened, a weights file whose name says it is a pickle."""
    if file.suffix in PICKLE_SUFFIXES or file.name.endswith(
        tuple(s + ".index.json" for s in PICKLE_SUFFIXES)
    ):
        raise ConversionError(
            f"{file}: a pickle checkpoint{why}; imontage reads safetensors only and never unpickles "
            "(save the model with diffusers' save_pretrained(safe_serialization=True))"
        )


def parse_json(data: bytes | str, where: str | Path) -> Any:
    """``data`` as JSON; any failure (syntax, encoding, nesting deeper than Python recurses) names ``where``."""
    try:
        return json.loads(data)
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply to read") from None
    except (ValueError, TypeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = str(error).splitlines()[0][:200]
        raise InputError(f"{where}: not JSON ({reason})") from None


def read_json(path: Path, expect: type = dict, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON file ``path``, whose top level must be of type ``expect``; its size is checked
    before it is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(f"{path}: {size:,} bytes, more than the {max_bytes:,} a JSON file may have here")
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror or error})") from None
    value = parse_json(data, path)
    if not isinstance(value, expect):
        raise InputError(f"{path}: expected {_TYPE_NAMES.get(expect, expect.__name__)} at the top level")
    return value


def field(values: Mapping[str, Any], key: str, expect: type[_T] | tuple[type, ...], where: str | Path) -> _T:
    """``values[key]``, which must be of type ``expect`` (``bool`` is not taken for an integer);
    a missing key or a wrong type names ``key`` and ``where``."""
    if key not in values:
        raise InputError(f"{where}: key '{key}' missing")
    value = values[key]
    kinds = expect if isinstance(expect, tuple) else (expect,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_TYPE_NAMES.get(kind, kind.__name__) for kind in kinds)
        raise InputError(f"{where}: key '{key}' is {type(value).__name__}, expected {names}")
    return value  # type: ignore[return-value]


def string_map(values: Any, where: str | Path, key: str) -> dict[str, str]:
    """A JSON object of strings to strings (a safetensors index's ``weight_map``, say)."""
    if not isinstance(values, dict):
        raise InputError(f"{where}: key '{key}' is {type(values).__name__}, expected an object of names")
    for name, value in values.items():
        if not isinstance(value, str):
            raise InputError(
                f"{where}: key '{key}': entry '{name}' is {type(value).__name__}, expected a string"
            )
    return values

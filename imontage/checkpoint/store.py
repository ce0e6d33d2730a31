"""Checkpoint store: atomic, self-verifying checkpoint directories, with no pickle anywhere.

Layout under ``root`` (``RUN_DIR/checkpoints``)::

    step_000500/    <group>.safetensors ..., state.json, manifest.json (sha256 + size of every file)
    latest          text file: name of the newest complete checkpoint

Atomicity protocol of :func:`save_checkpoint`, for one writer per ``root``:

1. Every file is written into a staging directory ``.tmp-step_000500-<pid>`` inside ``root`` (so the
   final rename stays on one filesystem) and fsynced. Tensors go to safetensors, the rest to JSON.
2. ``manifest.json`` is written last and fsynced, then the staging directory itself. A directory is
   complete exactly when its manifest exists: a crash before this point leaves only a ``.tmp-*``
   directory, which resume never considers and the next save removes.
3. The staging directory is renamed to ``step_000500`` and ``root`` is fsynced so the rename survives
   a power loss. A checkpoint already holding that name is first moved aside to ``.tmp-*`` (rename(2)
   cannot replace a non-empty directory); a crash between the two renames loses only that step.
4. ``latest`` is replaced atomically (write ``latest.tmp``, fsync, ``os.replace``, fsync ``root``). A
   crash between 3 and 4 leaves ``latest`` naming the previous checkpoint, which is still intact.
5. Checkpoints beyond ``keep_last`` are retired by renaming them to ``.tmp-*`` before deletion, so a
   half-deleted directory never looks complete.

:func:`find_resume_checkpoint` trusts ``latest`` when the checkpoint it names verifies against its
manifest, and otherwise falls back, with a warning, to the newest checkpoint that does. Loading
reads safetensors and JSON only; optimiser and RNG states are converted to that form below.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from imontage.untrusted import InputError, parse_json

CHECKPOINT_PREFIX = "step_"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
STATE_FILE = "state.json"
TENSORS_SUFFIX = ".safetensors"
LATEST = "latest"
STAGING_PREFIX = ".tmp-"
_STEP_DIGITS = 6
_HASH_CHUNK_BYTES = 8 << 20
# Markers of the JSON encoding of optimiser state; a plain dict never holds exactly one of these keys.
_TENSOR_TAG = "__tensor__"
_TUPLE_TAG = "__tuple__"


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that is incomplete, corrupt or unreadable; the message names the file at fault."""


class CheckpointWarning(UserWarning):
    """Resume skipped a checkpoint (or ``latest``) and says which one and why."""


def checkpoint_name(step: int) -> str:
    """``step_000500``: zero-padded so names sort like steps up to 999999, wider beyond."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"{CHECKPOINT_PREFIX}{step:0{_STEP_DIGITS}d}"


def _step_of(name: str) -> int | None:
    """Step of a canonical checkpoint name, None for anything else (``step_5``, ``.tmp-*``, ``latest``)."""
    digits = name.removeprefix(CHECKPOINT_PREFIX)
    if digits == name or not (digits.isascii() and digits.isdigit()):
        return None
    step = int(digits)
    return step if checkpoint_name(step) == name else None


# ---------------------------------------------------------------------------------------------------
# Durable file-system primitives


def checkpoint_step(path: Path) -> int:
    """The step of checkpoint directory ``path`` (``step_000500`` -> 500)."""
    step = _step_of(path.name)
    if step is None:
        raise CheckpointError(f"{path}: not a checkpoint directory name")
    return step


def _fsync(path: Path) -> None:
    """Flushes a file's data, or a directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    root: Path,
    step: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    state: Mapping[str, Any],
    keep_last: int = 0,
) -> Path:
    """Writes checkpoint ``step`` under ``root`` atomically, points ``latest`` at it and prunes.

    ``tensors[group]`` goes to ``<group>.safetensors``, ``state`` (JSON-native values) to
    ``state.json``. With ``keep_last > 0`` the complete checkpoints beyond the ``keep_last`` newest
    (by step) are deleted, never the one just written. Returns the checkpoint directory.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    name = checkpoint_name(step)
    # Fail on a bad group name or non-JSON state before writing any tensor.
    tensor_files = {
        f"{_checked_group_name(group)}{TENSORS_SUFFIX}": group_tensors
        for group, group_tensors in tensors.items()
    }
    state_json = json.dumps(state, indent=2).encode()
    staging = make_staging(root, name, os.getpid())
    try:
        for file_name, group_tensors in tensor_files.items():
            _write_tensors(staging / file_name, group_tensors)
        _write_durably(staging / STATE_FILE, state_json)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish(root, staging, step, keep_last)


def make_staging(root: Path, name: str, token: int) -> Path:
    """A fresh, empty staging directory for checkpoint ``name``; ``token`` keeps writers' apart.

    Several ranks writing one checkpoint share one staging directory: rank 0 makes it with its
    own pid as the token and tells the others.
    """
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f"{STAGING_PREFIX}{name}-{token}"
    _remove(staging)  # left by a crashed process that had the same token
    staging.mkdir()
    return staging


def publish(root: Path, staging: Path, step: int, keep_last: int = 0) -> Path:
    """Steps 2-5 of the protocol: manifest, rename, ``latest``, pruning. Returns the checkpoint.

    Files other processes wrote into ``staging`` are fsynced here before the manifest lists them.
    """
    name = checkpoint_name(step)
    try:
        for path in staging.iterdir():
            _fsync(path)
        _write_manifest(staging, step)
        final = _install(staging, root / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_latest(root, name)
    _prune(root, written=final, keep_last=keep_last)
    return final


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, fsynced (a file of a staging directory)."""
    _write_durably(path, json.dumps(value, indent=2).encode())


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """``tensors`` as safetensors at ``path``, fsynced (a file of a staging directory)."""
    _write_tensors(path, tensors)


def _checked_group_name(group: str) -> str:
    if not group or group.startswith(".") or Path(group).name != group or group in (".", ".."):
        raise ValueError(f"tensor group {group!r} is not a plain file-name stem")
    return group


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{path.name}: {key!r} is a {type(tensor).__name__}, not a tensor")
    # A private contiguous CPU copy per tensor: safetensors rejects views that share storage.
    cpu_tensors = {
        key: tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for key, tensor in tensors.items()
    }
    save_file(cpu_tensors, path)
    _fsync(path)


def _write_manifest(staging: Path, step: int) -> None:
    """Writes the manifest, which marks ``staging`` complete, after every file it lists is durable."""
    files = {
        path.name: {"sha256": _sha256(path), "bytes": path.stat().st_size}
        for path in sorted(staging.iterdir())
    }
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    _write_durably(staging / MANIFEST, json.dumps(manifest, indent=2).encode())
    _fsync(staging)  # the directory entries must be durable before the rename publishes them


def _install(staging: Path, final: Path) -> Path:
    """Renames ``staging`` to ``final``, replacing a checkpoint of the same name if there is one."""
    displaced: Path | None = None
    if final.exists() or final.is_symlink():
        displaced = final.with_name(f"{STAGING_PREFIX}replaced-{final.name}-{os.getpid()}")
        _remove(displaced)
        os.replace(final, displaced)  # rename(2) cannot replace a non-empty directory
    try:
        os.replace(staging, final)
    except BaseException:
        if displaced is not None:
            os.replace(displaced, final)
        raise
    _fsync(final.parent)
    if displaced is not None:
        _remove(displaced)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f"{LATEST}.tmp"
    _write_durably(tmp, f"{name}\n".encode())
    os.replace(tmp, root / LATEST)
    _fsync(root)


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Directories under ``root`` with a checkpoint name, complete or not, oldest step first."""
    steps = {
        path: step for path in root.iterdir() if path.is_dir() and (step := _step_of(path.name)) is not None
    }
    return sorted(steps, key=steps.__getitem__)


def _prune(root: Path, written: Path, keep_last: int) -> None:
    """Deletes complete checkpoints beyond the ``keep_last`` newest, and leftover staging directories.

    Incomplete ``step_*`` directories are someone else's business and are left alone; after a
    successful save, every ``.tmp-*`` entry is debris of a crashed save (one writer per root).
    """
    if keep_last > 0:
        complete = [path for path in _checkpoint_dirs(root) if is_complete(path)]
        for path in complete[:-keep_last]:
            if path != written:
                # Retire by rename first, so a crash mid-delete never leaves a complete-looking dir.
                retired = root / f"{STAGING_PREFIX}retired-{path.name}-{os.getpid()}"
                _remove(retired)
                os.replace(path, retired)
    for path in root.iterdir():
        if path.name.startswith(STAGING_PREFIX):
            _remove(path)


# ---------------------------------------------------------------------------------------------------
# Verifying, resuming, loading


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    try:
        manifest = parse_json(manifest_path.read_bytes(), manifest_path)
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: missing, so the checkpoint is incomplete") from None
    except OSError as e:
        raise CheckpointError(f"{manifest_path}: unreadable ({e})") from e
    except InputError as e:
        raise CheckpointError(
            f"{manifest_path}: unreadable ({str(e).removeprefix(f'{manifest_path}: ')})"
        ) from None
    if not _is_manifest(manifest):
        raise CheckpointError(f"{manifest_path}: not a format-{MANIFEST_FORMAT} checkpoint manifest")
    return manifest


def _is_manifest(manifest: Any) -> bool:
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return False
    files = manifest.get("files")
    return (
        isinstance(manifest.get("step"), int)
        and isinstance(files, dict)
        and all(
            Path(name).name == name
            and name not in ("", ".", "..", MANIFEST)
            and isinstance(record, dict)
            and isinstance(record.get("sha256"), str)
            and isinstance(record.get("bytes"), int)
            for name, record in files.items()
        )
    )


def is_complete(path: Path) -> bool:
    """True for a ``step_*`` directory whose manifest exists and parses; its files are not checked."""
    if _step_of(path.name) is None or not path.is_dir():
        return False
    try:
        _read_manifest(path)
    except CheckpointError:
        return False
    return True


def _manifest_of(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``, checked against the directory's step (files not read)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    manifest = _read_manifest(path)
    step = _step_of(path.name)
    if step is not None and step != manifest["step"]:
        raise CheckpointError(f"{path / MANIFEST}: written for step {manifest['step']}, not {step}")
    return manifest


def _check_size(file: Path, size: int, record: dict[str, Any]) -> None:
    """Before anything is hashed or read: a file of the wrong size fails at once, whatever its size."""
    if size != record["bytes"]:
        raise CheckpointError(f"{file}: {size} bytes, {file.parent / MANIFEST} says {record['bytes']}")


def _check_digest(file: Path, digest: str, record: dict[str, Any]) -> None:
    if digest != record["sha256"]:
        raise CheckpointError(f"{file}: sha256 differs from {file.parent / MANIFEST}")


def _verified_manifest(path: Path) -> dict[str, Any]:
    manifest = _manifest_of(path)
    for name, record in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {path / MANIFEST} but missing")
        _check_size(file, file.stat().st_size, record)
    for name, record in manifest["files"].items():  # sizes all right: now the hashes, streamed
        _check_digest(path / name, _sha256(path / name), record)
    return manifest


def verify_checkpoint(path: Path) -> None:
    """Raises :class:`CheckpointError` unless every file the manifest lists has its size and sha256."""
    _verified_manifest(path)


def _read_latest(root: Path) -> tuple[Path | None, str | None]:
    """The checkpoint ``latest`` names, or why it names none."""
    latest = root / LATEST
    try:
        name = latest.read_text().strip()
    except FileNotFoundError:
        return None, f"{latest}: missing"
    except (OSError, ValueError) as e:
        return None, f"{latest}: unreadable ({e})"
    if _step_of(name) is None:
        return None, f"{latest}: holds {name!r}, not a checkpoint name"
    return root / name, None


def _resume_problem(path: Path) -> str | None:
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        return str(e)
    return None


def find_resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``resume=auto`` continues from, or None when there is none.

    The one ``latest`` names if it verifies; otherwise the newest (by step) that verifies, with a
    :class:`CheckpointWarning` naming each thing skipped and why. A directory without a manifest is
    never chosen.
    """
    checkpoints = list(reversed(_checkpoint_dirs(root))) if root.is_dir() else []
    named, latest_problem = _read_latest(root)
    if named is None and not checkpoints:
        return None
    skipped = [] if latest_problem is None else [latest_problem]
    candidates = ([] if named is None else [named]) + [path for path in checkpoints if path != named]
    chosen = None
    for path in candidates:
        problem = _resume_problem(path)
        if problem is None:
            chosen = path
            break
        skipped.append(problem)
    if skipped:
        outcome = f"resuming from {chosen}" if chosen is not None else f"nothing to resume from in {root}"
        warnings.warn(f"{outcome}; skipped: " + "; ".join(skipped), CheckpointWarning, stacklevel=2)
    return chosen


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Verifies the checkpoint, then returns its tensor groups (on CPU) and its JSON state.

    Each file is read once: its size and sha256 are checked on the bytes that are then loaded.
    """
    manifest = _manifest_of(path)
    if STATE_FILE not in manifest["files"]:
        raise CheckpointError(f"{path / STATE_FILE}: not listed in {path / MANIFEST}")
    contents = read_files(path, list(manifest["files"]))
    tensors = {
        name.removesuffix(TENSORS_SUFFIX): value
        for name, value in contents.items()
        if name.endswith(TENSORS_SUFFIX)
    }
    return tensors, contents[STATE_FILE]


def read_files(path: Path, names: list[str]) -> dict[str, Any]:
    """The named files of checkpoint ``path``, each checked against the manifest on the bytes read.

    ``.safetensors`` files come back as tensor dicts, ``.json`` files parsed, anything else as bytes.
    """
    manifest = _manifest_of(path)
    contents: dict[str, Any] = {}
    for name in names:
        file = path / name
        record = manifest["files"].get(name)
        if record is None:
            raise CheckpointError(f"{file}: not listed in {path / MANIFEST}")
        try:
            _check_size(file, file.stat().st_size, record)
            data = file.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{file}: listed in {path / MANIFEST} but missing") from None
        _check_size(file, len(data), record)
        _check_digest(file, hashlib.sha256(data).hexdigest(), record)
        contents[name] = _decode_file(file, data)
    return contents


def _decode_file(file: Path, data: bytes) -> Any:
    """A checkpoint file's bytes by the format its name declares: tensors, JSON, or the bytes."""
    if file.name.endswith(TENSORS_SUFFIX):
        try:
            return safetensors_load(data)
        except (SafetensorError, ValueError) as error:
            raise CheckpointError(f"{file}: not a safetensors file ({error})") from None
    if file.name.endswith(".json"):
        try:
            return parse_json(data, file)
        except InputError as error:
            raise CheckpointError(str(error)) from None
    return data


# ---------------------------------------------------------------------------------------------------
# Optimiser state as tensors + JSON


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON form of ``value``: tensors move to ``tensors[key...]`` and tuples are tagged, so types survive."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {_TENSOR_TAG: key}
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [_encode(item, f"{key}/{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, f"{key}/{i}", tensors) for i, item in enumerate(value)]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str) or k in (_TENSOR_TAG, _TUPLE_TAG):
                raise TypeError(f"{key}: dict key {k!r} cannot be stored in JSON")
        return {k: _encode(item, f"{key}/{k}", tensors) for k, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{key}: cannot store a {type(value).__name__} without pickle")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if isinstance(value, dict):
        if value.keys() == {_TENSOR_TAG}:
            return tensors[value[_TENSOR_TAG]]
        if value.keys() == {_TUPLE_TAG}:
            return tuple(_decode(item, tensors) for item in value[_TUPLE_TAG])
        return {k: _decode(item, tensors) for k, item in value.items()}
    return value


def optimizer_state_to_tensors(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Splits ``optimizer.state_dict()`` into tensors keyed ``state/<param>/<name>`` and JSON meta.

    Each tensor is referenced from the meta by its key, so a 0-dim ``step`` tensor comes back a tensor
    and a float ``step`` a float; parameter ids keep their type (JSON object keys would be strings).
    """
    tensors: dict[str, torch.Tensor] = {}
    param_states = [
        [param_id, _encode(dict(param_state), f"state/{param_id}", tensors)]
        for param_id, param_state in state_dict["state"].items()
    ]
    meta = {
        "state": param_states,
        "param_groups": _encode(list(state_dict["param_groups"]), "param_groups", tensors),
    }
    return tensors, meta


def optimizer_state_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    """Inverse of :func:`optimizer_state_to_tensors`: a dict for ``optimizer.load_state_dict``."""
    return {
        "state": {param_id: _decode(param_state, tensors) for param_id, param_state in meta["state"]},
        "param_groups": _decode(meta["param_groups"], tensors),
    }


# ---------------------------------------------------------------------------------------------------
# RNG state as tensors + JSON


def rng_state_to_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    """Torch CPU and CUDA (all devices), Python ``random`` and numpy's legacy global RNG states."""
    tensors = {"torch/cpu": torch.get_rng_state()}
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors.update({f"torch/cuda/{device}": s for device, s in enumerate(cuda_states)})
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors["numpy/keys"] = torch.from_numpy(np.array(keys, dtype=np.uint32))  # [624] uint32
    version, internal_state, gauss_next = random.getstate()
    meta = {
        "cuda_devices": len(cuda_states),
        "python": {"version": version, "state": list(internal_state), "gauss_next": gauss_next},
        "numpy": {
            "algorithm": algorithm,
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    return tensors, meta


def restore_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state_to_tensors`; CUDA states are restored for the devices present."""
    torch.set_rng_state(tensors["torch/cpu"])
    cuda_states = [tensors[f"torch/cuda/{device}"] for device in range(meta["cuda_devices"])]
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda_states) != visible:
        warnings.warn(
            f"RNG state holds {len(cuda_states)} CUDA device states, {visible} are visible; "
            "CUDA random streams will differ from the saved run",
            CheckpointWarning,
            stacklevel=2,
        )
    for device, cuda_state in enumerate(cuda_states[:visible]):
        torch.cuda.set_rng_state(cuda_state, device)
    python = meta["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    numpy = meta["numpy"]
    np.random.set_state(
        (
            numpy["algorithm"],
            tensors["numpy/keys"].numpy(),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )


def generator_state_to_tensor(gen: torch.Generator) -> torch.Tensor:
    """State of a dedicated generator (e.g. a data sampler's), storable in a safetensors group."""
    return gen.get_state()


def restore_generator_state(gen: torch.Generator, state: torch.Tensor) -> None:
    gen.set_state(state)

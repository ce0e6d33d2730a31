"""Imagic settings: a strict schema read from the ``imagic:`` section of a YAML file.

The section sits in a recipe next to the trainer's keys (``configs/recipes/imagic.yaml``); only
the section is read here, so the same file also trains the base model with ``imontage-train``.
The step counts and learning rates default to the published real-scale values (Kawar et al.,
2023); the recipe sets tiny ones. This module imports nothing of imontage, so the recipe schema
(``RecipeConfig.imagic``) embeds :class:`ImagicConfig` and the loader runs :func:`check_imagic`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

SECTION = "imagic"
COMMAND_LINE = "<command line>"


class ImagicConfigError(ValueError):
    """Imagic settings that cannot run; the message names the file (or command line) and key."""


@dataclass
class PhaseConfig:
    """One optimisation phase: Adam for ``steps`` steps at a constant ``lr``."""

    steps: int = 100
    lr: float = 1e-3


@dataclass
class ReconstructionConfig:
    """The flow-matching loss both phases minimise: the input image as target, under the text."""

    copies: int = 1  # (t, noise) draws per step: copies of the image packed into one batch
    t_mean: float = 0.0  # logit-normal t, as the flow_matching objective draws it
    t_std: float = 1.0
    shift: float = 1.0
    eval_draws: int = 16  # fixed draws the loss is reported on before and after each phase


@dataclass
class ImagicSampleConfig:
    steps: int = 50  # Euler steps of the flow ODE
    guidance: float = 3.0  # classifier-free guidance scale; 1 disables
    shift: float = 1.0


@dataclass
class ImagicConfig:
    seed: int = 0  # the training draws; the loss report uses seed + 1, sampling seed + 2
    use_ema: bool = True  # edit the checkpoint's EMA weights (as imontage-sample samples them)
    image_size: list[int] = field(default_factory=list)  # [H, W] to resize the input to; [] keeps it
    eta: list[float] = field(
        default_factory=lambda: [0.0, 0.5, 0.7, 0.8, 1.0]
    )  # e = eta·e_tgt + (1-eta)·e_opt
    embedding: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=100, lr=1e-3))
    finetune: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=1500, lr=5e-7))
    loss: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    sample: ImagicSampleConfig = field(default_factory=ImagicSampleConfig)


Origin = Callable[[str], str]


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, update)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        reason = str(error).splitlines()[0]
        raise ImagicConfigError(f"{source}: key '{SECTION}.{key}': {reason}") from error
    assert isinstance(merged, DictConfig)
    return merged


def _file_section(path: Path) -> Any:
    if not path.is_file():
        raise ImagicConfigError(f"{path}: no such file")
    try:
        node = OmegaConf.load(path)
    except Exception as error:  # yaml errors of every kind: report the file, keep the reason
        raise ImagicConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(node, DictConfig) or not isinstance(node.get(SECTION), DictConfig):
        raise ImagicConfigError(f"{path}: expected an '{SECTION}:' mapping at the top level")
    return node[SECTION]


def _dotlist(overrides: Sequence[str]) -> list[str]:
    """``key=value`` items, with or without the ``imagic.`` prefix."""
    items = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ImagicConfigError(f"{COMMAND_LINE}: '{item}' is not a key=value override")
        items.append(f"{key.removeprefix(SECTION + '.')}={value}")
    return items


def check_imagic(
    cfg: Any, origin: Origin, prefix: str = SECTION, error: type[ValueError] = ImagicConfigError
) -> None:
    """Ranges the schema's types cannot express; ``origin(key)`` names who set ``key``.

    The recipe loader runs the same checks on a recipe's ``imagic:`` section (the recipe schema
    embeds :class:`ImagicConfig`), raising its own ``error`` class.
    """

    def check(condition: bool, key: str, reason: str) -> None:
        if not condition:
            full = f"{prefix}.{key}"
            raise error(f"{origin(full)}: key '{full}': {reason}")

    for phase in ("embedding", "finetune"):
        check(cfg[phase].steps >= 0, f"{phase}.steps", "must be >= 0")
        check(cfg[phase].lr > 0, f"{phase}.lr", "must be positive")
    check(len(cfg.eta) > 0, "eta", "needs at least one value")
    check(len(cfg.image_size) in (0, 2), "image_size", "expected [] or [H, W]")
    check(all(size > 0 for size in cfg.image_size), "image_size", "sizes must be positive")
    check(cfg.loss.copies >= 1, "loss.copies", "must be >= 1")
    check(cfg.loss.eval_draws >= 1, "loss.eval_draws", "must be >= 1")
    check(cfg.loss.t_std > 0, "loss.t_std", "must be positive")
    check(cfg.loss.shift > 0, "loss.shift", "must be positive")
    check(cfg.sample.steps >= 1, "sample.steps", "must be >= 1")
    check(cfg.sample.shift > 0, "sample.shift", "must be positive")


def load_imagic_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ImagicConfig:
    """Schema defaults, then ``path``'s ``imagic:`` section, then ``key=value`` overrides."""
    cfg = OmegaConf.structured(ImagicConfig)
    file_node: Any = {}
    if path is not None:
        file_node = _file_section(Path(path))
        cfg = _merge(cfg, file_node, str(path))
    dotlist = _dotlist(overrides)
    try:
        cli = OmegaConf.from_dotlist(dotlist)
    except Exception as error:
        raise ImagicConfigError(f"{COMMAND_LINE}: cannot parse overrides {dotlist}: {error}") from error
    cfg = _merge(cfg, cli, COMMAND_LINE)

    def origin(key: str) -> str:
        relative = key.removeprefix(SECTION + ".")
        missing = object()
        if OmegaConf.select(cli, relative, default=missing) is not missing:
            return COMMAND_LINE
        if path is not None and OmegaConf.select(file_node, relative, default=missing) is not missing:
            return str(path)
        return "<schema default>"

    check_imagic(cfg, origin)
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, ImagicConfig)
    return config

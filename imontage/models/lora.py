"""Low-rank adapters (LoRA) and partial fine-tuning of any model family, by module-name patterns.

``apply_lora(model, cfg)`` freezes the model and, for every ``nn.Linear`` whose name matches one
of ``cfg.targets`` (``fnmatch`` patterns over ``named_modules`` names, e.g. ``blocks.*.attn1.to_q``),
adds two children (a pattern adapts the linears among the modules it matches), ``lora_A`` (``[rank, in]``) and ``lora_B`` (``[out, rank]``), and a forward
hook that adds ``B(A(dropout(x))) · alpha / rank`` to the layer's output. The layer keeps its own
parameters and their names, so the base model's checkpoints and diffusers folders still load by
name, and the adapters are named as PEFT names them (``blocks.0.attn1.to_q.lora_A.weight``).
``B`` starts at zero, so a fresh adapter changes nothing. Trainable after it: the adapters and
the parameters matching ``cfg.trainable`` (partial fine-tuning, with or without adapters).

Under tensor parallelism ``imontage.parallel`` moves each adapter onto the megatron-core layer
that replaces its linear and cuts it like the layer (:func:`shard_adapter`): a column-parallel
layer (output rows cut) keeps ``A`` whole and its rows of ``B``; a row-parallel layer (input
columns cut) its columns of ``A`` and ``B`` whole, so the ranks' partial products sum to the
single-device update. The hook (:class:`LoraUpdate`) makes the collectives that sum needs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

LORA_INITS = ("kaiming", "gaussian")
ADAPTER_NAMES = ("lora_A", "lora_B")


@dataclass
class LoraConfig:
    """``model.lora``: adapters on the linears matching ``targets``; ``rank: 0`` adds none."""

    rank: int = 0
    alpha: float = 0.0  # the update is scaled by alpha / rank; 0 means alpha = rank (scale 1)
    dropout: float = 0.0  # on the adapter's input only
    # fnmatch patterns over module names (model.named_modules()), e.g. "blocks.*.attn1.to_q".
    targets: list[str] = field(default_factory=list)
    # A's initialisation (B is always zero): "kaiming" (uniform, a = sqrt(5), as nn.Linear and
    # PEFT's default) or "gaussian" (normal, std 1 / rank).
    init: str = "kaiming"
    # Parameters trained besides the adapters (fnmatch patterns over parameter names), e.g. a new
    # condition embedding; with rank 0 and no pattern here the whole model trains.
    trainable: list[str] = field(default_factory=list)


def lora_enabled(cfg: Any) -> bool:
    """Whether ``model.lora`` freezes the base model (adapters or a partial fine-tuning list)."""
    return int(cfg.rank) > 0 or bool(list(cfg.trainable))


def base_model_config(cfg: Any) -> Any:
    """The model config (a ``ModelConfig`` node) of a LoRA model's base: ``model.lora`` at its
    defaults, so that the model built from it has no adapters and nothing frozen."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, {"lora": OmegaConf.structured(LoraConfig)})


def is_adapter(name: str) -> bool:
    """Whether the parameter ``name`` belongs to an adapter (``…lora_A.weight``, ``…lora_B.weight``)."""
    return any(f".{adapter}." in f".{name}" for adapter in ADAPTER_NAMES)


class ColumnsLinear(nn.Linear):
    """``lora_A`` of a layer whose TP rank keeps scattered input columns: whole, applied to the
    rank's ``columns`` only (HunyuanVideo's single-stream ``proj_out``, input [attention | MLP])."""

    columns: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.columns is None else self.weight[:, self.columns]
        return F.linear(x, weight)


@dataclass
class LoraUpdate:
    """The forward hook adding an adapter's update to its layer's output.

    ``mode``: ``"whole"`` (one device, or a layer TP does not cut), ``"column"`` (column-parallel:
    ``A`` whole, ``B`` the rank's rows), ``"row"`` (row-parallel: ``A`` the rank's columns, ``B``
    whole). ``sharded_input``: under sequence parallelism the layer's input is the rank's token
    shard (a column-parallel layer gathers it, a row-parallel one reduce-scatters its output).
    """

    mode: str = "whole"
    group: Any = None
    sharded_input: bool = False
    enabled: bool = True  # off: the layer is its base alone (:func:`adapters_disabled`)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return output
        a, b = cast(nn.Linear, module.lora_A), cast(nn.Linear, module.lora_B)
        x = cast(nn.Module, module.lora_dropout)(args[0])
        h = a(x.to(a.weight.dtype))  # [n, rank]
        if self.mode != "whole":
            from megatron.core.tensor_parallel import mappings

            if self.mode == "column":
                # Each rank's B rows use all of h: its gradient sums over the group.
                h = (
                    mappings.gather_from_sequence_parallel_region(h, True, self.group)
                    if self.sharded_input
                    else mappings.copy_to_tensor_model_parallel_region(h, self.group)
                )
            elif self.sharded_input:  # row: each rank's A columns give part of h
                h = mappings.reduce_scatter_to_sequence_parallel_region(h, self.group)
            else:
                h = mappings.reduce_from_tensor_model_parallel_region(h, self.group)
        return output + (b(h) * float(cast(Any, module).lora_scale)).to(output.dtype)


def _init_a(weight: torch.Tensor, init: str, rank: int) -> None:
    if init == "kaiming":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    else:
        nn.init.normal_(weight, std=1.0 / rank)


def attach_adapter(linear: nn.Linear, rank: int, alpha: float, dropout: float, init: str = "kaiming") -> None:
    """Give ``linear`` its ``lora_A``, ``lora_B`` (zero) and the hook (module docstring)."""
    weight = linear.weight
    a = ColumnsLinear(linear.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
    b = nn.Linear(rank, linear.out_features, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        _init_a(a.weight, init, rank)
        b.weight.zero_()
    set_adapter(linear, a, b, nn.Dropout(dropout) if dropout else nn.Identity(), (alpha or rank) / rank)


def set_adapter(
    layer: nn.Module,
    a: nn.Linear,
    b: nn.Linear,
    dropout: nn.Module,
    scale: float,
    update: LoraUpdate | None = None,
) -> None:
    """Install an adapter on ``layer`` (a new one, or one moved from the linear ``layer`` replaces)."""
    layer.lora_A, layer.lora_B, layer.lora_dropout = a, b, dropout
    cast(Any, layer).lora_scale = scale
    cast(Any, layer).lora_hook = layer.register_forward_hook(update or LoraUpdate())


def has_adapter(module: nn.Module) -> bool:
    return hasattr(module, "lora_hook")


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module carrying an adapter."""
    return ((name, m) for name, m in model.named_modules() if has_adapter(m))


def apply_lora(model: nn.Module, cfg: Any) -> list[str]:
    """Freeze ``model``, add the adapters and unfreeze what ``cfg`` lists (module docstring).

    Returns the adapted modules' names. Errors name the pattern that matches nothing (a typo in a
    recipe must not train the wrong layers) or a module that is not a linear layer.
    """
    rank, targets = int(cfg.rank), [str(t) for t in cfg.targets]
    if str(cfg.init) not in LORA_INITS:
        raise ValueError(f"model.lora.init={cfg.init!r} is not one of {', '.join(LORA_INITS)}")
    if rank < 0 or (rank == 0) != (not targets):
        raise ValueError(
            f"model.lora: rank {rank} with targets {targets}: adapters need both a rank > 0 and targets"
        )
    if not 0.0 <= float(cfg.dropout) < 1.0:
        raise ValueError(f"model.lora.dropout={cfg.dropout} must be in [0, 1)")
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for pattern in targets:  # a pattern adapts the linear layers among the modules it matches
        matched = [name for name in modules if name and fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(
                f"model.lora.targets: '{pattern}' matches no module of the {type(model).__name__}"
            )
        linears = [name for name in matched if isinstance(modules[name], nn.Linear)]
        if not linears:
            raise ValueError(
                f"model.lora.targets: '{pattern}' matches {matched[0]}, a {type(modules[matched[0]]).__name__}, "
                "and no linear layer: adapters go on linear layers"
            )
        chosen += [name for name in linears if name not in chosen]
    params = dict(model.named_parameters())
    for pattern in cfg.trainable:
        if not any(fnmatch.fnmatchcase(name, str(pattern)) for name in params):
            raise ValueError(
                f"model.lora.trainable: '{pattern}' matches no parameter of the {type(model).__name__}"
            )
    for name, param in params.items():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, str(p)) for p in cfg.trainable))
    for name in chosen:
        attach_adapter(
            cast(nn.Linear, modules[name]), rank, float(cfg.alpha), float(cfg.dropout), str(cfg.init)
        )
    return chosen


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer's weight (``W += scale · B A``) and remove it; returns how many.

    Single-device models only (a consolidated checkpoint): a TP rank's adapter is part of one.
    """
    merged = 0
    for name, module in list(adapted_modules(model)):
        update = cast(Any, module).lora_hook
        hook = cast(Any, module)._forward_hooks.get(update.id)
        if isinstance(hook, LoraUpdate) and hook.mode != "whole":
            raise ValueError(f"{name}: merge_lora takes a single-device model, this adapter is TP-cut")
        a, b = cast(nn.Linear, module.lora_A).weight, cast(nn.Linear, module.lora_B).weight
        weight = cast(nn.Linear, module).weight
        delta = (b.float() @ a.float()) * float(cast(Any, module).lora_scale)
        weight.copy_((weight.float() + delta).to(weight.dtype))
        update.remove()
        for child in ("lora_A", "lora_B", "lora_dropout"):
            delattr(module, child)
        for attribute in ("lora_scale", "lora_hook"):
            delattr(module, attribute)
        merged += 1
    return merged


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by parameter name (``….lora_A.weight``, ``….lora_B.weight``)."""
    return {name: p.detach() for name, p in model.named_parameters() if is_adapter(name)}


def _updates(model: nn.Module) -> list[LoraUpdate]:
    hooks = (hook for _, m in adapted_modules(model) for hook in m._forward_hooks.values())
    return [hook for hook in hooks if isinstance(hook, LoraUpdate)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within it, ``model`` computes as its base: every adapter's update is skipped."""
    updates = _updates(model)
    for update in updates:
        update.enabled = False
    try:
        yield
    finally:
        for update in updates:
            update.enabled = True


class BaseWithoutAdapters(nn.Module):
    """The policy's base model, its adapters off: flow DPO's reference with no copy of the weights.

    Holds the policy outside its own parameters (it has none), runs it under ``no_grad`` with the
    adapters disabled. Only for a base that does not train (no ``model.lora.trainable`` patterns).
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self._policy = (policy,)  # a tuple, so that the policy is not a submodule of the reference

    def forward(self, batch: Any) -> torch.Tensor:
        policy = self._policy[0]
        with torch.no_grad(), adapters_disabled(policy):
            return cast(torch.Tensor, policy(batch))


def frozen_names(model: nn.Module) -> set[str]:
    """Parameters that do not train (the frozen base): left out of optimisers and checkpoints."""
    return {name for name, p in model.named_parameters() if not p.requires_grad}

"""How a Trainer's steps reach the weights: one local process, or DeepSpeed over many ranks.

Both backends offer the same few operations (backward, optimiser step, stage hyperparameters,
EMA for sampling, checkpoint save and load), so the Trainer has one loop:

- :class:`LocalBackend`: the model on one device, torch AdamW, ``clip_grad_norm_``; a checkpoint
  is one set of safetensors groups (``model``, ``optimizer``, ``ema``, ``rng``) and ``state.json``.
- :class:`DeepSpeedBackend`: process groups from torchrun/SLURM through megatron-core,
  :func:`~imontage.parallel.parallelize.parallelize_dit` (TP, SP, Ulysses, activation
  checkpointing), then DeepSpeed ZeRO over the DP×CP ranks. A checkpoint directory holds
  DeepSpeed's own engine files (module and ZeRO shards), ``rank_XXXXX.safetensors`` and
  ``rank_XXXXX.json`` (RNG, data-loader position and EMA partition of each rank) and
  ``state.json``, under one manifest written by rank 0 once every rank has finished.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from imontage.checkpoint import store as ckpt
from imontage.checkpoint.diffusers import model_weights
from imontage.models.common.experts import expert_networks, idle_networks
from imontage.models.lora import BaseWithoutAdapters, adapted_modules, frozen_names
from imontage.train.ema import EMA

log = logging.getLogger(__name__)


def _adamw_hyperparameters(optim: DictConfig) -> dict[str, Any]:
    return {"betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}


def _configure_stage(optimizer: torch.optim.Optimizer, optim: DictConfig, fresh: bool) -> None:
    """A stage's AdamW hyperparameters; ``fresh``: forget the moments, as a new optimiser would."""
    for group in optimizer.param_groups:
        group.update(_adamw_hyperparameters(optim))
    if fresh:
        optimizer.state.clear()  # AdamW creates its state lazily at the next step


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimiser steps: every parameter, less a frozen base (``model.lora``)."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The optimiser's groups: one per network of ``model`` (each expert of a
    :class:`~imontage.models.common.experts.TimestepExperts`, so that a step can leave the
    experts that did not run where they are), its :func:`trainable_parameters` in model order."""
    return [{"params": trainable_parameters(network)} for _, network in expert_networks(model)]


def trainable_names(model: nn.Module) -> list[str]:
    """The names of :func:`trainable_parameters`, in the same order (the optimiser's numbering)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _adapted(model: nn.Module, cfg: DictConfig) -> bool:
    """Whether flow DPO's reference is ``model``'s base with its adapters off (LoRA); refuses
    adapters beside trained base parameters, which such a reference would follow."""
    if next(adapted_modules(model), None) is None:
        return False
    if list(cfg.model.lora.trainable):
        raise ValueError(
            f"flow_dpo with model.lora.trainable={list(cfg.model.lora.trainable)}: the reference is the base "
            "without adapters, and those parameters would train in it too; train adapters only"
        )
    return True


def _set_frozen_partition(param: nn.Parameter, partition: torch.Tensor, source: Path) -> None:
    """A frozen parameter's ZeRO-3 partition (it has no fp32 master): written in its own dtype."""
    local = cast(Any, param).ds_tensor
    if local.numel() != partition.numel():
        raise ckpt.CheckpointError(f"{source}: partition of {partition.numel()} values for {local.numel()}")
    with torch.no_grad():
        local.copy_(partition.view(local.shape).to(local.dtype))


class LocalBackend:
    """One process on one device (``parallel.engine: local``)."""

    rank = 0
    world_size = 1
    data_rank = 0
    data_world_size = 1

    def __init__(self, model: nn.Module, cfg: DictConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        self.model.gradient_checkpointing = cfg.parallel.activation_checkpointing
        self.frozen = frozen_names(self.model)  # a frozen base (model.lora): no optimiser state, not saved
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model), lr=cfg.optim.lr)
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.grad_clip = 0.0

    def begin_stage(self, optim: DictConfig, fresh: bool) -> None:
        _configure_stage(self.optimizer, optim, fresh)
        self.grad_clip = optim.grad_clip

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def begin_step(self, t_range: tuple[float, float]) -> None:
        """Nothing to do: an expert that does not run gets no gradient, which AdamW and clipping skip."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16"
        )

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        (loss / accumulation).backward()

    def gradient_norm(self) -> float:
        """Clip the gradients; their global norm before clipping (what the fault guard checks)."""
        limit = self.grad_clip if self.grad_clip > 0 else float("inf")
        self._norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit))
        return self._norm

    def apply_step(self) -> float:
        """Optimiser step, zeroed gradients, EMA update; returns the gradient norm."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return self._norm

    def discard_gradients(self) -> None:
        """Drop this step's gradients: weights, optimiser state and EMA stay as they were."""
        self.optimizer.zero_grad(set_to_none=True)

    def mean_over_data(self, value: float) -> float:
        return value

    def sum_over_data(self, value: float) -> float:
        return value

    def sum_tensor_over_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed element-wise over the data-parallel ranks (here: itself)."""
        return tensor

    def ema_weights(self) -> contextlib.AbstractContextManager:
        return self.ema.applied_to(self.model) if self.ema is not None else contextlib.nullcontext()

    def save(
        self,
        root: Path,
        step: int,
        shared: dict[str, Any],
        own: dict[str, Any],
        own_tensors: dict[str, torch.Tensor],
        keep_last: int,
    ) -> Path:
        """One checkpoint directory of safetensors groups and ``state.json`` (no pickle)."""
        optimizer_tensors, optimizer_meta = ckpt.optimizer_state_to_tensors(self.optimizer.state_dict())
        tensors = {
            "model": {
                name: t.detach() for name, t in self.model.state_dict().items() if name not in self.frozen
            },
            "optimizer": optimizer_tensors,
            "rng": own_tensors,
        }
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        state = {**shared, **own, "optimizer": optimizer_meta}
        return ckpt.save_checkpoint(root, step, tensors, state, keep_last)

    def find_resume(self, root: Path) -> Path | None:
        return ckpt.find_resume_checkpoint(root)

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
        """Restores weights, optimiser and EMA; returns (shared state, own state, own tensors)."""
        tensors, state = ckpt.load_checkpoint(path)
        if len(state.get("data_ranks", [])) > 1:  # written by convert_checkpoint.py reshard
            raise ckpt.CheckpointError(
                f"{path}: holds the data-loader and RNG states of {len(state['data_ranks'])} data-parallel "
                "ranks; one process would continue only the first one's data: resume it with that many"
            )
        missing, unexpected = self.model.load_state_dict(tensors["model"], strict=not self.frozen)
        if unexpected or set(missing) != self.frozen:
            odd = sorted(unexpected or set(missing) ^ self.frozen)[0]
            raise ckpt.CheckpointError(
                f"{path / 'model.safetensors'}: tensor '{odd}' does not match this model's trainable "
                f"parameters ({len(self.frozen)} frozen by model.lora are not in checkpoints)"
            )
        self.optimizer.load_state_dict(
            ckpt.optimizer_state_from_tensors(tensors["optimizer"], state["optimizer"])
        )
        if self.ema is not None:
            self.ema.load_state_dict(tensors["ema"])
        return state, state, tensors["rng"]

    def init_weights(self, path: Path) -> None:
        """A stage's ``init_from``: the weights of ``path`` (any format ``imontage.checkpoint.diffusers.model_weights`` reads).

        The optimiser's moments start afresh with the stage; the EMA restarts from these weights.
        """

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in model_weights(path, self.cfg.model):
                params[name].copy_(tensor)
        if self.ema is not None:
            self.ema = EMA(self.model, self.cfg.train.ema_decay)

    def frozen_reference(self) -> nn.Module:
        """A frozen copy of the current weights (flow DPO's reference): no gradient, eval mode.

        With LoRA adapters, the policy's own base with its adapters off: no copy at all.
        """
        if _adapted(self.model, self.cfg):
            return BaseWithoutAdapters(self.model)
        reference = copy.deepcopy(self.model).eval()
        reference.requires_grad_(False)
        return reference

    def barrier(self) -> None:
        """Nothing to wait for with one process."""

    def close(self) -> None:
        """Nothing to release with one process."""


def _rank_file(rank: int, suffix: str) -> str:
    return f"rank_{rank:05d}{suffix}"


def build_optimizer(model: nn.Module, optim: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW on CPU; DeepSpeed's fused Adam (AdamW mode) on CUDA; over the trainable parameters."""
    if device.type != "cuda":
        return torch.optim.AdamW(parameter_groups(model), lr=optim.lr, **_adamw_hyperparameters(optim))
    from deepspeed.ops.adam import FusedAdam

    try:
        return FusedAdam(
            parameter_groups(model), lr=optim.lr, adam_w_mode=True, **_adamw_hyperparameters(optim)
        )
    except Exception as error:  # its CUDA extension is compiled on first use
        raise RuntimeError(
            f"DeepSpeed's FusedAdam could not be built on this machine ({error}); "
            "install DeepSpeed with DS_BUILD_FUSED_ADAM=1 or fix the CUDA toolchain"
        ) from error


class DeepSpeedBackend:
    """Every rank of a torchrun or SLURM job (``parallel.engine: deepspeed``)."""

    def __init__(self, model: nn.Module, cfg: DictConfig, device: torch.device) -> None:
        from megatron.core import parallel_state

        from imontage.parallel.engine import MegatronMPU, build_engine, zero3_config
        from imontage.parallel.parallelize import parallelize_dit
        from imontage.parallel.state import ParallelLayout, init_process_groups, launch_env

        parallel = cfg.parallel
        env = launch_env()
        self.layout = ParallelLayout.for_world(
            env.world_size, parallel.tensor_parallel, parallel.context_parallel, cfg.model.num_heads
        )
        if device.type == "cuda":
            device = torch.device("cuda", env.local_rank)
        # Start-up (rendezvous, first gathers, compilation) may be slow; the trainer shortens it later.
        timeout = timedelta(seconds=cfg.train.faults.timeout_first_step_s)
        init_process_groups(self.layout, device, env, timeout=timeout)
        self.cfg = cfg
        self.device = device
        self.rank, self.world_size = env.rank, env.world_size
        self.data_rank = parallel_state.get_data_parallel_rank()
        self.data_world_size = parallel_state.get_data_parallel_world_size()
        self.data_group = parallel_state.get_data_parallel_group()
        if len(expert_networks(model)) > 1 and parallel.zero_stage != 3:
            raise ValueError(
                f"every expert in one run (model.expert unset) trains under ZeRO-3, not zero_stage="
                f"{parallel.zero_stage} (its idle expert's gradients are zeroed in ZeRO-3's partitions): "
                "set parallel.zero_stage=3 or name one expert (model.expert)"
            )
        self.idle_groups: list[int] = []  # optimiser groups of the experts the step does not run
        parallelize_dit(
            model.to(device),
            parallel.tensor_parallel,
            parallel.context_parallel,
            parallel.sequence_parallel,
            parallel.activation_checkpointing,
        )
        config = zero3_config(
            model,
            cfg.optim.grad_clip,
            cfg.train.precision,
            cfg.train.grad_accumulation,
            stage=parallel.zero_stage,
        )
        self.frozen = frozen_names(model)  # a frozen base (model.lora): bf16 only, no fp32 master, not saved
        self.engine = build_engine(model, build_optimizer(model, cfg.optim, device), config, MegatronMPU())
        self.model = self.engine
        self.ema = EMA(self.engine.module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.ranks_per_data_rank = self.layout.context  # CP shares of one batch's gradient (see backward)

    @property
    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimiser DeepSpeed drives (over ZeRO's fp32 partitions)."""
        optimizer = self.engine.optimizer
        return getattr(optimizer, "optimizer", optimizer)

    def begin_stage(self, optim: DictConfig, fresh: bool) -> None:
        _configure_stage(self.inner_optimizer, optim, fresh)
        self.engine.optimizer.clip_grad = optim.grad_clip  # read by ZeRO at every step

    def set_learning_rate(self, lr: float) -> None:
        for group in self.inner_optimizer.param_groups:
            group["lr"] = lr

    def begin_step(self, t_range: tuple[float, float]) -> None:
        """The step draws t in ``t_range``: the experts of other ranges do not run (their optimiser
        groups, :func:`parameter_groups`, are left out of :meth:`apply_step`)."""
        self.idle_groups = idle_networks(self.engine.module, t_range)

    def _rest_idle_experts(self) -> dict[int, float]:
        """Before the step: zero the gradient partitions of the experts that did not run, and set
        their groups' learning rate to 0; returns the rates to restore.

        ZeRO-3 writes a parameter's gradient partition only when the parameter got a gradient, so
        an expert that did not run would step on (and count in the clipping norm) the gradient of
        the last step it ran. With lr 0, AdamW leaves its weights exactly as they are (the update
        and the decoupled weight decay both scale with lr); its moments decay as under a zero
        gradient and its step count advances, as one optimiser over both experts would do.
        """
        from deepspeed.utils import safe_set_local_grad

        networks = expert_networks(self.engine.module)
        groups = self.inner_optimizer.param_groups
        rates = {}
        for index in self.idle_groups:
            for param in trainable_parameters(networks[index][1]):
                local = cast(Any, param).ds_tensor
                safe_set_local_grad(param, torch.zeros(local.numel(), device=local.device))
            rates[index], groups[index]["lr"] = groups[index]["lr"], 0.0
        return rates

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed holds bf16 weights itself under train.precision=bf16

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        """The engine averages gradients over DP×CP ranks; the CP ranks' shares must add up, hence × CP.

        DeepSpeed divides by the accumulation count itself; between boundaries ``step`` only counts.
        """
        self.engine.backward(loss * self.ranks_per_data_rank)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def gradient_norm(self) -> float:
        """0 when every rank's gradients are finite, inf otherwise (a collective over the ZeRO group).

        DeepSpeed computes the norm and clips inside ``engine.step()``, and under bf16 it steps over
        NaNs; ZeRO's overflow check on the reduced gradient partitions answers before the step.
        """
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "has_overflow"):
            overflow = bool(optimizer.has_overflow(partition_gradients=True))
        else:  # ZeRO stage 0: the module's own gradients, already all-reduced
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            overflow = not all(bool(torch.isfinite(g).all()) for g in grads)
        return float("inf") if overflow else 0.0

    def apply_step(self) -> float:
        """The engine's step (clipping included), then the EMA; returns the engine's gradient norm."""
        rates = self._rest_idle_experts() if self.cfg.parallel.zero_stage == 3 else {}
        self.engine.step()
        for index, lr in rates.items():
            self.inner_optimizer.param_groups[index]["lr"] = lr
        if self.ema is not None:
            self.ema.update(self.engine.module)
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def discard_gradients(self) -> None:
        """Drop this step's gradients without stepping; the engine's step count advances as on a step."""
        self.engine.optimizer.zero_grad(set_to_none=True)
        self.engine.micro_steps += 1  # what engine.step() would count: keeps accumulation boundaries aligned

    def _reduce_over_data(self, value: float, average: bool) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.data_group)
        return float(tensor.item()) / (self.data_world_size if average else 1)

    def mean_over_data(self, value: float) -> float:
        return self._reduce_over_data(value, average=True)

    def sum_over_data(self, value: float) -> float:
        return self._reduce_over_data(value, average=False)

    def sum_tensor_over_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed element-wise over the data-parallel ranks, in place (not over TP or CP,
        whose ranks hold the same values)."""
        dist.all_reduce(tensor, group=self.data_group)
        return tensor

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """The EMA in the engine's module; under ZeRO-3 through its partitions (``EMA.applied_to``)."""
        if self.ema is None:
            return contextlib.nullcontext()
        release = self.engine.empty_partition_cache if self.cfg.parallel.zero_stage == 3 else None
        return self.ema.applied_to(self.engine.module, release=release)

    def init_weights(self, path: Path) -> None:
        """A stage's ``init_from``: the weights of ``path`` (any format ``imontage.checkpoint.diffusers.model_weights`` reads).

        Every rank reads the single-device tensors one at a time and keeps its TP slice, then its
        ZeRO-3 partition, as fp32 master weights; the module's bit16 partitions and ZeRO's resident
        parameters are refreshed from them as in :meth:`load_single_device`. The optimiser's
        moments start afresh with the stage; the EMA restarts from these weights.
        """
        from deepspeed.utils import safe_set_local_fp32_param

        if self.cfg.parallel.zero_stage != 3:
            raise ckpt.CheckpointError(
                f"{path}: init_from loads into ZeRO-3 runs only (this run: zero_stage={self.cfg.parallel.zero_stage})"
            )
        share = self._weight_share()
        params = dict(self.engine.module.named_parameters())
        with self._rewriting_master_weights():
            for name, tensor in model_weights(path, self.cfg.model):
                if name in self.frozen:  # no fp32 master: the bit16 partition itself
                    _set_frozen_partition(params[name], share(name, tensor), path)
                else:
                    safe_set_local_fp32_param(params[name], share(name, tensor))
        if self.ema is not None:
            self.ema = EMA(self.engine.module, self.cfg.train.ema_decay)

    @contextlib.contextmanager
    def _rewriting_master_weights(self) -> Iterator[None]:
        """ZeRO-3's fp32 master partitions open for writing, as ``engine.load_checkpoint`` has them.

        On entry every parameter is partitioned; on exit the module's bit16 partitions are refreshed
        from the fp32 masters and the resident (persistent) parameters gathered whole again.
        """
        zero = self.engine.optimizer
        zero.checkpoint_event_prologue()
        yield
        for sub_group in range(len(zero.fp16_groups)):
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)
        zero.checkpoint_event_epilogue()

    def _weight_share(self) -> Callable[..., torch.Tensor]:
        """``share(name, full, whole=False)``: this rank's TP slice of a single-device tensor, then
        its ZeRO-3 partition unless ``whole``."""
        from megatron.core import parallel_state

        from imontage.checkpoint.zero3 import tensor_parallel_shard, zero_partition

        tensor_rank = parallel_state.get_tensor_model_parallel_rank()
        group = self.engine.optimizer.dp_process_group
        zero_rank, zero_size = dist.get_rank(group), dist.get_world_size(group)

        def share(name: str, full: torch.Tensor, whole: bool = False) -> torch.Tensor:
            local = tensor_parallel_shard(name, full, tensor_rank, self.layout.tensor)
            return local if whole else zero_partition(local, zero_rank, zero_size)

        return share

    def frozen_reference(self) -> nn.Module:
        """A frozen copy of the current weights (flow DPO's reference), laid out and sharded like the policy.

        A fresh DiT gets the same TP/SP/Ulysses layout; the policy's ZeRO-3 partitions are gathered
        one parameter at a time (within the ZeRO group, so each rank gets its own TP shard, the
        shape the fresh layer already has) and copied in. Under ZeRO-3 DeepSpeed then partitions
        it again with no optimiser (its ZeRO-Offload path: parameters only, no gradients, no
        optimiser state); under ZeRO 0-2 the weights are whole on every rank anyway and the copy
        stays a plain module.
        """
        import deepspeed

        from imontage.models import build_model
        from imontage.parallel.engine import MegatronMPU, zero3_config
        from imontage.parallel.parallelize import parallelize_dit

        parallel, policy = self.cfg.parallel, self.engine.module
        if _adapted(policy, self.cfg):
            return BaseWithoutAdapters(policy)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            reference = build_model(self.cfg.model).to(self.device)  # its initial weights are overwritten
        parallelize_dit(
            reference, parallel.tensor_parallel, parallel.context_parallel, parallel.sequence_parallel
        )
        sources = dict(policy.named_parameters())
        with torch.no_grad():
            for name, param in reference.named_parameters():
                with deepspeed.zero.GatheredParameters([sources[name]]):
                    param.copy_(sources[name].to(param.dtype))
            for name, buffer in reference.named_buffers():
                buffer.copy_(policy.get_buffer(name))
        reference.requires_grad_(False)  # after parallelize_dit, which hooks some parameters' gradients
        if parallel.zero_stage == 3:
            config = zero3_config(reference, 0.0, self.cfg.train.precision, 1, stage=3)
            reference, *_ = deepspeed.initialize(model=reference, config=config, mpu=MegatronMPU())
        elif self.cfg.train.precision == "bf16":
            reference.to(torch.bfloat16)  # the dtype DeepSpeed gives the policy's module
        reference.eval()  # not chained: DeepSpeedEngine.eval() returns None
        return reference

    def barrier(self) -> None:
        dist.barrier()

    def _agree(self, value: int) -> int:
        """Rank 0's ``value``, on every rank."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    # ------------------------------------------------------------------------------ checkpoints
    def save(
        self,
        root: Path,
        step: int,
        shared: dict[str, Any],
        own: dict[str, Any],
        own_tensors: dict[str, torch.Tensor],
        keep_last: int,
    ) -> Path:
        """Every rank writes its files into one staging directory; rank 0 publishes it."""
        name = ckpt.checkpoint_name(step)
        token = self._agree(os.getpid())
        staging = root / f"{ckpt.STAGING_PREFIX}{name}-{token}"
        if self.rank == 0:
            ckpt.make_staging(root, name, token)
        self.barrier()
        # DeepSpeed writes its module and ZeRO shards into <root>/<tag>: the staging directory.
        self.engine.save_checkpoint(
            str(root), tag=staging.name, save_latest=False, exclude_frozen_parameters=bool(self.frozen)
        )
        tensors = dict(own_tensors)
        if self.ema is not None:
            tensors.update({f"ema.{key}": value for key, value in self.ema.state_dict().items()})
        ckpt.write_tensors(staging / _rank_file(self.rank, ckpt.TENSORS_SUFFIX), tensors)
        ckpt.write_json(staging / _rank_file(self.rank, ".json"), own)
        self.barrier()
        if self.rank == 0:
            layout = {"tensor_parallel": self.layout.tensor, "context_parallel": self.layout.context,
                      "data_parallel": self.layout.data, "zero_stage": self.cfg.parallel.zero_stage}  # fmt: skip
            ckpt.write_json(
                staging / ckpt.STATE_FILE, {**shared, "layout": layout, "world_size": self.world_size}
            )
            ckpt.publish(root, staging, step, keep_last)
        self.barrier()
        return root / name

    def find_resume(self, root: Path) -> Path | None:
        """Rank 0 chooses (verifying every file against the manifest); the others follow."""
        chosen = ckpt.find_resume_checkpoint(root) if self.rank == 0 else None
        step = self._agree(-1 if chosen is None else ckpt.checkpoint_step(chosen))
        return None if step < 0 else root / ckpt.checkpoint_name(step)

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
        """Resume from a checkpoint of this layout, or from a layout-free (single-device) one."""
        shared = ckpt.read_files(path, [ckpt.STATE_FILE])[ckpt.STATE_FILE]
        if "layout" not in shared:
            return self.load_single_device(path, shared)
        files = ckpt.read_files(
            path, [_rank_file(self.rank, ".json"), _rank_file(self.rank, ckpt.TENSORS_SUFFIX)]
        )
        saved = shared.get("layout", {})
        now = {"tensor_parallel": self.layout.tensor, "context_parallel": self.layout.context,
               "data_parallel": self.layout.data, "zero_stage": self.cfg.parallel.zero_stage}  # fmt: skip
        if saved != now:
            raise ckpt.CheckpointError(
                f"{path}: saved under layout {saved}, this run is {now}; convert it with "
                f"`tools/convert_checkpoint.py reshard {path} NEW_RUN_DIR/checkpoints` to resume under another layout"
            )
        self.engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_module_strict=not self.frozen,  # the frozen base comes from its own source
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        tensors = files[_rank_file(self.rank, ckpt.TENSORS_SUFFIX)]
        if self.ema is not None:
            self.ema.load_state_dict(
                {k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")}
            )
        own_tensors = {k: v for k, v in tensors.items() if not k.startswith("ema.")}
        return shared, files[_rank_file(self.rank, ".json")], own_tensors

    def load_single_device(
        self, path: Path, state: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
        """Resume from a layout-free checkpoint (LocalBackend's, or ``convert_checkpoint.py reshard``'s).

        Every rank reads the single-device tensors one at a time and keeps its share: the TP slice
        (:func:`~imontage.parallel.parallelize.tensor_split`), then its ZeRO-3 partition, for the
        fp32 master weights, AdamW's moments and the EMA; AdamW's step count is restored too. The
        module's own (bit16) partitions and ZeRO's resident parameters are then refreshed from
        the fp32 masters as ``engine.load_checkpoint`` does. Data-loader and RNG states are those
        of this rank's data-parallel rank, so the number of data-parallel ranks must match.
        """
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state
        from safetensors import safe_open

        from imontage.checkpoint.zero3 import zero_partition

        if self.cfg.parallel.zero_stage != 3:
            raise ckpt.CheckpointError(
                f"{path}: a single-device checkpoint loads into ZeRO-3 runs only (this run: "
                f"zero_stage={self.cfg.parallel.zero_stage})"
            )
        data_ranks = state.get("data_ranks") or [{"loader": state["loader"], "rng": state["rng"]}]
        if len(data_ranks) != self.data_world_size:
            raise ckpt.CheckpointError(
                f"{path}: holds the data-loader and RNG states of {len(data_ranks)} data-parallel rank(s), "
                f"this run has {self.data_world_size}; resume it with a layout of "
                f"data_parallel={len(data_ranks)} (world size = {len(data_ranks)} × TP × CP)"
            )
        ok = 1
        if self.rank == 0:  # every file against the manifest, once; the others wait for the verdict
            try:
                ckpt.verify_checkpoint(path)
            except ckpt.CheckpointError as error:
                ok, problem = 0, str(error)
        if not self._agree(ok):
            raise ckpt.CheckpointError(problem if self.rank == 0 else f"{path}: rank 0 found it corrupt")
        zero = self.engine.optimizer
        zero_rank, zero_size = (
            dist.get_rank(zero.dp_process_group),
            dist.get_world_size(zero.dp_process_group),
        )
        share = self._weight_share()
        # LocalBackend's AdamW numbers the parameters in the single-device model's order.
        from imontage.models import build_model

        order = {
            name: i for i, name in enumerate(trainable_names(build_model(self.cfg.model, device="meta")))
        }
        moments = {int(param_id): entry for param_id, entry in state["optimizer"]["state"]}

        with self._rewriting_master_weights():
            for flat in zero.fp32_partitioned_groups_flat:  # AdamW creates its state lazily: make room for it
                for key in ("exp_avg", "exp_avg_sq"):
                    zero.optimizer.state[flat].setdefault(key, torch.zeros_like(flat))
            with (
                safe_open(str(path / "model.safetensors"), "pt") as weights,
                safe_open(str(path / "optimizer.safetensors"), "pt") as optimizer,
            ):
                for name, param in self.engine.module.named_parameters():
                    if not param.requires_grad:
                        continue
                    if name not in order or order[name] not in moments:
                        raise ckpt.CheckpointError(
                            f"{path / 'optimizer.safetensors'}: no AdamW state for '{name}'"
                        )
                    safe_set_local_fp32_param(param, share(name, weights.get_tensor(name)))
                    for key in ("exp_avg", "exp_avg_sq"):
                        tensor_key = moments[order[name]][key]["__tensor__"]
                        safe_set_local_optimizer_state(
                            param, share(name, optimizer.get_tensor(tensor_key)), key
                        )
                step = optimizer.get_tensor(next(iter(moments.values()))["step"]["__tensor__"])
            for flat in zero.fp32_partitioned_groups_flat:  # torch AdamW counts steps per parameter
                zero.optimizer.state[flat]["step"] = step.clone()
            for group in zero.optimizer.param_groups:  # DeepSpeed's FusedAdam per group
                if "step" in group:
                    group["step"] = int(step)
        self.engine.global_steps = int(state["step"])
        if self.ema is not None:
            if not (path / "ema.safetensors").is_file():
                raise ckpt.CheckpointError(f"{path / 'ema.safetensors'}: missing, and this run keeps an EMA")
            with safe_open(str(path / "ema.safetensors"), "pt") as ema:
                # The EMA holds what the rank holds: the ZeRO partition, or the whole (persistent) tensor.
                shadows = {}
                for name, shadow in self.ema.shadow.items():
                    local = share(name, ema.get_tensor(name), whole=True)
                    shadows[name] = (
                        local if shadow.shape == local.shape else zero_partition(local, zero_rank, zero_size)
                    )
                self.ema.load_state_dict(shadows)
        own = data_ranks[self.data_rank]
        prefix = f"data_rank_{self.data_rank}/"
        with safe_open(str(path / "rng.safetensors"), "pt") as rng:
            keys = list(rng.keys())
            mine = [k for k in keys if k.startswith(prefix)] if "data_ranks" in state else []
            own_tensors = (
                {k.removeprefix(prefix): rng.get_tensor(k) for k in mine}
                if mine
                else {k: rng.get_tensor(k) for k in keys if not k.startswith("data_rank_")}
            )
        return state, own, own_tensors

    def close(self) -> None:
        self.barrier()


def build_backend(model: nn.Module, cfg: DictConfig, device: torch.device) -> LocalBackend | DeepSpeedBackend:
    """The backend ``parallel.engine`` names."""
    if cfg.parallel.engine == "deepspeed":
        return DeepSpeedBackend(model, cfg, device)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        raise RuntimeError(
            f"parallel.engine=local runs one process, but this job has WORLD_SIZE={os.environ['WORLD_SIZE']}: "
            "use a configs/parallel layout with engine: deepspeed"
        )
    return LocalBackend(model, cfg, device)

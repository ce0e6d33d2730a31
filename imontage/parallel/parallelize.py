"""``parallelize_dit``: tensor, sequence and Ulysses parallelism applied to a built single-device DiT.

The model is built on one device first, from the seed, so TP=1 and TP=N start from the same
weights: each rank keeps its slice. Then, in place and in this order (DESIGN.md):

1. Tensor parallelism (TP) with megatron-core's layers, per block:
   ``qkv`` -> ``ColumnParallelLinear`` (rank r keeps heads ``[r·H/TP, (r+1)·H/TP)`` of q, k and v),
   ``proj`` -> ``RowParallelLinear`` (the matching input columns), ``fc1`` -> column parallel,
   ``fc2`` -> row parallel. :data:`TENSOR_PARALLEL_SPLITS` says how each weight is cut.
2. Sequence parallelism (SP, with TP): between the parallel linears, the residual stream, the
   norms and the adaLN modulation live on ``N/TP`` token shards; ``qkv`` and ``fc1`` all-gather the
   shard, ``proj`` and ``fc2`` reduce-scatter back to it.
3. Ulysses (context parallelism, CP): each rank embeds ``N/CP`` tokens and runs every per-token
   step on them with its own positions; around attention an all-to-all trades the token shard for
   a head shard (all ``N`` tokens, ``H/(TP·CP)`` heads), attention runs over the whole packed
   sequence with the global ``cu_seqlens``, and a second all-to-all trades back. The packed
   sequence is padded to a multiple of ``CP·TP`` with one extra masked sequence, so any lengths work.
4. Activation checkpointing per block, when asked.

Gradients, after ``backward``:
- within a TP group every rank holds the complete gradient of its parameters. Parameters that
  every TP rank keeps whole but uses on part of the work (QK-norm weights see only the rank's
  heads; under SP the adaLN offsets and the row-parallel biases see only its tokens) get their
  gradient summed over the TP group by a hook;
- within a CP group each rank holds its tokens' share: the gradients sum, over the CP group, to
  the single-device gradient. The engine reduces over DP×CP, so the trainer scales the loss by CP
  (the engine averages over DP×CP ranks, and the CP shares must add up, not average).

The forward pass takes the same full :class:`PackedBatch` on every rank of a TP×CP group and
returns the full output on every rank, so objectives and samplers do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from imontage.models.dit.model import DiT, DiTBlock, TokenLayout
from imontage.models.dit.sequence import PackedBatch
from imontage.parallel.collectives import (
    GatherFromSequenceShards,
    HeadsToSequence,
    SequenceToHeads,
    pad_packed_batch,
)


@dataclass(frozen=True)
class TensorSplit:
    """How a weight is cut over TP ranks: along ``dim``, in ``parts`` equal parts cut separately.

    ``qkv`` holds q, k and v one after the other (``parts=3``): each is cut into TP slices, and
    rank r keeps slice r of each, so its columns are its own heads of q, k and v.
    """

    dim: int
    parts: int = 1

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """Rank ``rank``'s slice of the single-device tensor ``full``."""
        if full.shape[self.dim] % (self.parts * size):
            raise ValueError(
                f"dimension {self.dim} of size {full.shape[self.dim]} does not split into "
                f"{self.parts} part(s) × {size} tensor-parallel ranks"
            )
        slices = [part.chunk(size, self.dim)[rank] for part in full.chunk(self.parts, self.dim)]
        return torch.cat(slices, self.dim)

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The single-device tensor from every rank's slice, in rank order."""
        parts = [shard.chunk(self.parts, self.dim) for shard in shards]  # [rank][part]
        return torch.cat([torch.cat([p[i] for p in parts], self.dim) for i in range(self.parts)], self.dim)


# Keyed by a block parameter's name inside its block; the rest are whole on every rank.
TENSOR_PARALLEL_SPLITS: dict[str, TensorSplit] = {
    "qkv.weight": TensorSplit(0, parts=3),  # [3·H·Dh, d]: output rows
    "qkv.bias": TensorSplit(0, parts=3),
    "proj.weight": TensorSplit(1),  # [d, H·Dh]: input columns
    "fc1.weight": TensorSplit(0),  # [F, d]
    "fc1.bias": TensorSplit(0),
    "fc2.weight": TensorSplit(1),  # [d, F]
}


def tensor_split(name: str) -> TensorSplit | None:
    """How the model parameter ``name`` (``blocks.3.qkv.weight``) is cut over TP ranks; None: whole."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blocks":
        return TENSOR_PARALLEL_SPLITS.get(".".join(parts[2:]))
    return None


def _megatron_config(model: DiT, tensor: int, sequence_parallel: bool) -> Any:
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tensor,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,  # weights are copied from the single-device model below
        perform_initialization=False,
        params_dtype=model.patch_embed.weight.dtype,
        gradient_accumulation_fusion=False,
    )


def _keep_initial_weights(weight: torch.Tensor) -> None:
    """Megatron's ``init_method``; never called with ``perform_initialization=False``."""


def _column_parallel(linear: nn.Linear, split: TensorSplit, config: Any) -> nn.Module:
    from megatron.core import parallel_state

    layer = ColumnParallelProjection(
        linear.in_features, linear.out_features, config=config, init_method=_keep_initial_weights, bias=True
    )
    rank, size = parallel_state.get_tensor_model_parallel_rank(), config.tensor_model_parallel_size
    with torch.no_grad():
        layer.weight.copy_(split.shard(linear.weight, rank, size))
        layer.bias.copy_(split.shard(linear.bias, rank, size))
    return layer


def _row_parallel(linear: nn.Linear, split: TensorSplit, config: Any) -> nn.Module:
    from megatron.core import parallel_state

    layer = RowParallelProjection(
        linear.in_features,
        linear.out_features,
        config=config,
        init_method=_keep_initial_weights,
        bias=True,
        input_is_parallel=True,
        skip_bias_add=False,
    )
    rank, size = parallel_state.get_tensor_model_parallel_rank(), config.tensor_model_parallel_size
    with torch.no_grad():
        layer.weight.copy_(split.shard(linear.weight, rank, size))
        layer.bias.copy_(linear.bias)  # added once, after the reduction
    return layer


def _megatron_layers() -> tuple[type, type]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear


_Column, _Row = _megatron_layers()


class ColumnParallelProjection(_Column):  # type: ignore[misc, valid-type]
    """megatron-core's ``ColumnParallelLinear`` on packed ``[n, in]`` rows: weight rows split over TP.

    Megatron works on ``[s, b, h]``; a packed batch is one sequence of ``n`` tokens, ``b = 1``.
    Under SP the input is this rank's ``n/TP`` rows and the layer all-gathers them first.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = super().forward(x.unsqueeze(1))
        return out.squeeze(1)


class RowParallelProjection(_Row):  # type: ignore[misc, valid-type]
    """megatron-core's ``RowParallelLinear`` on packed rows: weight columns split over TP.

    The partial products are all-reduced (reduce-scattered to ``n/TP`` rows under SP), then the
    whole bias is added.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = super().forward(x.unsqueeze(1))
        return out.squeeze(1)


class UlyssesAttention(nn.Module):
    """Core attention over a context-parallel group: token shard -> head shard -> attention -> back.

    q, k and v (``[N/CP, h, Dh]``) travel in one all-to-all, the output in a second.
    """

    def __init__(self, inner: nn.Module, group: ProcessGroup) -> None:
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        bounds: tuple[int, ...],
    ) -> torch.Tensor:
        qkv = SequenceToHeads.apply(torch.stack([q, k, v], dim=1), self.group)  # [N, 3, h/CP, Dh]
        out = self.inner(*qkv.unbind(1), cu_seqlens, bounds)  # [N, h/CP, Dh]
        return HeadsToSequence.apply(out, self.group)  # [N/CP, h, Dh]


class ShardedTokens(TokenLayout):
    """The token layout of a parallel DiT: CP shards of the packed sequence, SP shards within them."""

    def __init__(
        self, tensor_group: ProcessGroup | None, sequence_parallel: bool, context_group: ProcessGroup | None
    ) -> None:
        self.tensor_group = tensor_group
        self.sequence_parallel = sequence_parallel
        self.context_group = context_group
        self.context_size = dist.get_world_size(context_group) if context_group is not None else 1
        self.context_rank = dist.get_rank(context_group) if context_group is not None else 0
        tensor_size = dist.get_world_size(tensor_group) if tensor_group is not None else 1
        self.multiple = self.context_size * (tensor_size if sequence_parallel else 1)

    def shard_batch(self, batch: PackedBatch) -> PackedBatch:
        padded = pad_packed_batch(batch, self.multiple)
        if self.context_size == 1:
            return padded
        shard = padded.tokens.shape[0] // self.context_size
        rows = slice(self.context_rank * shard, (self.context_rank + 1) * shard)
        # Plain slicing: the backward puts this rank's share of the gradient on its own rows.
        return padded.replace(**padded.map_tokens(lambda tensor: tensor[rows]))

    def enter_blocks(self, x: torch.Tensor, modulation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.sequence_parallel:
            return x, modulation
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        # Backward all-gathers: every TP rank gets the whole gradient of the (replicated) embeddings.
        return (
            scatter_to_sequence_parallel_region(x, group=self.tensor_group),
            scatter_to_sequence_parallel_region(modulation, group=self.tensor_group),
        )

    def exit_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return x
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        # The final layer runs whole on every TP rank, so each keeps its own rows of the gradient.
        return gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=False, group=self.tensor_group
        )

    def gather_output(self, out: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        if self.context_size > 1:
            out = GatherFromSequenceShards.apply(out, self.context_group)
        return out[: batch.tokens.shape[0]]  # drop the padding rows


def _sum_gradient_over(group: ProcessGroup) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return grad

    return hook


def partial_gradient_parameters(block: DiTBlock, sequence_parallel: bool) -> list[nn.Parameter]:
    """Parameters whole on every TP rank whose gradient on one rank covers only part of the work."""
    params = [
        cast(nn.Parameter, m.weight)
        for m in (block.q_norm, block.k_norm)
        if isinstance(getattr(m, "weight", None), nn.Parameter)
    ]
    if sequence_parallel:
        params += [block.modulation, cast(nn.Parameter, block.proj.bias), cast(nn.Parameter, block.fc2.bias)]
    return params


def dit_blocks(model: DiT) -> list[DiTBlock]:
    """``model.blocks`` with their type (a ModuleList hands out plain Modules)."""
    return cast("list[DiTBlock]", list(model.blocks))


def check_layout(model: DiT, tensor: int, context: int) -> None:
    """Errors for a model that cannot be split over ``tensor`` × ``context`` ranks, naming the sizes."""
    blocks = dit_blocks(model)
    heads = blocks[0].num_heads if blocks else 0
    if heads % (tensor * context):
        raise ValueError(
            f"model.num_heads={heads} is not divisible by tensor_parallel × context_parallel = "
            f"{tensor} × {context}: each rank needs whole heads"
        )
    mlp = blocks[0].fc1.out_features if blocks else 0
    if mlp % tensor:
        raise ValueError(f"model.mlp_hidden_size={mlp} is not divisible by tensor_parallel={tensor}")


def parallelize_dit(
    model: DiT,
    tensor_parallel: int = 1,
    context_parallel: int = 1,
    sequence_parallel: bool = False,
    activation_checkpointing: bool = False,
) -> DiT:
    """Apply TP, SP, Ulysses and activation checkpointing to ``model`` in place (module docstring).

    megatron-core's ``parallel_state`` must be initialised with the same sizes
    (:func:`imontage.parallel.state.init_process_groups`).
    """
    from megatron.core import parallel_state

    check_layout(model, tensor_parallel, context_parallel)
    if sequence_parallel and tensor_parallel == 1:
        raise ValueError(
            "sequence_parallel needs tensor_parallel > 1: it shards activations over the TP group"
        )
    if tensor_parallel > 1 or context_parallel > 1:
        initialised = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
        )
        if initialised != (tensor_parallel, context_parallel):
            raise ValueError(
                f"parallel_state holds tensor_parallel × context_parallel = {initialised[0]} × {initialised[1]}, "
                f"asked for {tensor_parallel} × {context_parallel}"
            )
    tensor_group = parallel_state.get_tensor_model_parallel_group() if tensor_parallel > 1 else None
    context_group = parallel_state.get_context_parallel_group() if context_parallel > 1 else None
    if tensor_parallel > 1:
        config = _megatron_config(model, tensor_parallel, sequence_parallel)
        assert tensor_group is not None
        for typed in dit_blocks(model):
            block: nn.Module = typed  # its projections become megatron-core layers
            block.qkv = _column_parallel(typed.qkv, TENSOR_PARALLEL_SPLITS["qkv.weight"], config)
            block.proj = _row_parallel(typed.proj, TENSOR_PARALLEL_SPLITS["proj.weight"], config)
            block.fc1 = _column_parallel(typed.fc1, TENSOR_PARALLEL_SPLITS["fc1.weight"], config)
            block.fc2 = _row_parallel(typed.fc2, TENSOR_PARALLEL_SPLITS["fc2.weight"], config)
            for param in partial_gradient_parameters(typed, sequence_parallel):
                param.register_hook(_sum_gradient_over(tensor_group))
    if context_group is not None:
        for typed in dit_blocks(model):
            attention_owner: nn.Module = typed  # its core attention becomes the Ulysses one
            attention_owner.core_attention = UlyssesAttention(typed.core_attention, context_group)
    if tensor_parallel > 1 or context_parallel > 1:
        model.token_layout = ShardedTokens(tensor_group, sequence_parallel, context_group)
    model.gradient_checkpointing = activation_checkpointing
    return model

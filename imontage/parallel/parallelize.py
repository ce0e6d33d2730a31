"""``parallelize_model``: tensor, sequence and Ulysses parallelism applied to a built single-device model.

One entry point for every model family (the DiT, Wan 2.1, HunyuanVideo); ``parallelize_dit`` is the
same function under the name the trainer calls. A family differs only in the :class:`FamilyPlan`
its record holds (``imontage/models/<family>/family.py``): for each list of blocks (HunyuanVideo
has two), which weights are cut how (:class:`TensorSplit`), which modules hold the heads and the
self-attention, and which whole parameters see part of the work.
The layer replacement, the gradient hooks and the token layout (:class:`ShardedTokens`) are shared.

The model is built on one device first, from the seed, so TP=1 and TP=N start from the same
weights: each rank keeps its slice. Then, in place and in this order (DESIGN.md):

1. Tensor parallelism (TP) with megatron-core's layers, per block: a weight cut along its output
   rows (dim 0) becomes a ``ColumnParallelLinear`` (rank r keeps heads ``[r·H/TP, (r+1)·H/TP)``, or
   that slice of the MLP width), one cut along its input columns (dim 1) a ``RowParallelLinear``.
   DiT: ``qkv`` and ``fc1`` column, ``proj`` and ``fc2`` row. Wan: ``attn1``/``attn2`` ``to_q``,
   ``to_k``, ``to_v`` (and I2V's ``add_k_proj``, ``add_v_proj``) and ``ffn.net.0.proj`` column,
   ``to_out.0`` and ``ffn.net.2`` row. Wan's q/k RMSNorms span all heads: their weight is cut like
   the heads and :class:`HeadShardedRMSNorm` sums the squares over the TP group. HunyuanVideo's
   dual-stream blocks: each stream's q, k, v and first FFN linear column, ``to_out.0``,
   ``to_add_out`` and the second FFN linears row; single-stream blocks: q, k, v and ``proj_mlp``
   column, ``proj_out`` row over its joined ``[attention | MLP]`` input (:class:`JoinedInputSplit`).
   Its token refiner runs whole on every rank.
2. Sequence parallelism (SP, with TP): between the parallel linears, the residual stream, the
   norms and the modulation live on ``n/TP`` token shards; column-parallel layers all-gather the
   shard, row-parallel ones reduce-scatter back to it. Wan's cross-attention keys and values come
   from the text (and image) context, whole on every rank: those column-parallel layers take it
   whole (no gather).
3. Ulysses (context parallelism, CP): each rank embeds ``n/CP`` tokens and runs every per-token
   step on them with its own positions; around self-attention an all-to-all trades the token shard
   for a head shard (all ``n`` tokens, ``H/(TP·CP)`` heads), attention runs over the whole packed
   sequence with the global ``cu_seqlens``, and a second all-to-all trades back. The packed
   sequence is padded to a multiple of ``CP·TP`` with one extra masked sequence, so any lengths work.
   Wan shards its visual rows only; its cross-attention runs on the rank's own queries against
   each query's own sample's context (whole on every rank), packed by
   :meth:`ShardedTokens.local_sample_index`. HunyuanVideo shards its visual and its text stream
   separately (each padded to the multiple); the all-to-all carries both, and its joint attention
   puts each sample's rows of both together (``JointPacking``). Under SP its modulation table,
   whole on every rank, is read by each rank's rows only: its gradient is summed over TP.
4. Activation checkpointing per block, when asked.

Gradients, after ``backward``:
- within a TP group every rank holds the complete gradient of its parameters. Parameters that
  every TP rank keeps whole but uses on part of the work (the DiT's per-head QK-norm weights see
  only the rank's heads; under SP the modulation offsets, affine norms and row-parallel biases see
  only its tokens) get their gradient summed over the TP group by a hook;
- within a CP group each rank holds its tokens' share: the gradients sum, over the CP group, to
  the single-device gradient. The engine reduces over DP×CP, so the trainer scales the loss by CP
  (the engine averages over DP×CP ranks, and the CP shares must add up, not average).

The forward pass takes the same full :class:`PackedBatch` on every rank of a TP×CP group and
returns the full output on every rank, so objectives and samplers do not change.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from imontage.models.common.experts import expert_networks
from imontage.models.common.parallel_plan import (
    BlockPlan,
    FamilyPlan,
    TensorSplit,
)
from imontage.models.common.sequence import PackedBatch
from imontage.models.common.token_layout import SampleTokenLayout
from imontage.models.lora import ColumnsLinear, LoraUpdate, has_adapter, set_adapter
from imontage.models.registry import FAMILIES, family_of_module
from imontage.parallel.collectives import (
    GatherFromSequenceShards,
    HeadsToSequence,
    SequenceToHeads,
    SumOverRanks,
    pad_packed_batch,
    padded_rows,
)


def _check_plans_apart() -> None:
    """tensor_split looks in every family's table: one block list's names must not mean two cuts."""
    seen: dict[tuple[str, str], TensorSplit] = {}
    for record in FAMILIES.values():
        for blocks, block_plan in record.parallel_plan.blocks.items():
            for name, split in block_plan.splits.items():
                if seen.setdefault((blocks, name), split) != split:
                    raise AssertionError(f"{blocks}.N.{name} is cut two ways by two families' plans")


_check_plans_apart()


def family_plan(model: nn.Module) -> FamilyPlan:
    """The :class:`FamilyPlan` of ``model``'s family (its record in :mod:`imontage.models.registry`)."""
    return family_of_module(model).parallel_plan


def tensor_split(name: str, plan: FamilyPlan | None = None) -> TensorSplit | None:
    """How the model parameter ``name`` (``blocks.3.qkv.weight``) is cut over TP ranks; None: whole.

    Without ``plan``, every family's table is looked in (a name means one cut in all of them). A
    name inside one network of a model of several (``transformer_2.blocks.3.qkv.weight``, an
    expert's, :mod:`imontage.models.common.experts`) is cut as the network's own name is.
    """
    parts = name.split(".")
    plans = [plan] if plan is not None else [record.parallel_plan for record in FAMILIES.values()]
    if (
        len(parts) >= 4
        and not any(parts[0] in p.blocks for p in plans)
        and any(parts[1] in p.blocks for p in plans)
    ):
        parts = parts[1:]  # the network's prefix: its blocks are parts[1]
    if len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B"):  # an adapter: cut as its layer says
        layer = tensor_split(".".join([*parts[:-2], "weight"]), plan)
        if layer is None or (parts[-2] == "lora_A") != (layer.dim == 1) or layer.interleaved:
            return None  # A of a column-parallel layer, B of a row-parallel one, A of a joined input
        return layer
    if len(parts) < 3:
        return None
    blocks, inner = parts[0], ".".join(parts[2:])
    return next(
        (
            p.blocks[blocks].splits[inner]
            for p in plans
            if blocks in p.blocks and inner in p.blocks[blocks].splits
        ),
        None,
    )


def _megatron_config(model: nn.Module, tensor: int, sequence_parallel: bool) -> Any:
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tensor,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,  # weights are copied from the single-device model below
        perform_initialization=False,
        params_dtype=next(model.parameters()).dtype,
        gradient_accumulation_fusion=False,
    )


def _keep_initial_weights(weight: torch.Tensor) -> None:
    """Megatron's ``init_method``; never called with ``perform_initialization=False``."""


def _column_parallel(linear: nn.Linear, split: TensorSplit, config: Any) -> nn.Module:
    from megatron.core import parallel_state

    from imontage.parallel.megatron_linear import ColumnParallelProjection

    layer = ColumnParallelProjection(
        linear.in_features, linear.out_features, config=config, init_method=_keep_initial_weights, bias=True
    )
    rank, size = parallel_state.get_tensor_model_parallel_rank(), config.tensor_model_parallel_size
    with torch.no_grad():
        layer.weight.copy_(split.shard(linear.weight, rank, size))
        layer.bias.copy_(split.shard(linear.bias, rank, size))  # the bias is cut like the output rows
    return layer


def _row_parallel(linear: nn.Linear, split: TensorSplit, config: Any) -> nn.Module:
    from megatron.core import parallel_state

    from imontage.parallel.megatron_linear import RowParallelProjection

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


class UlyssesAttention(nn.Module):
    """Core attention over a context-parallel group: token shard -> head shard -> attention -> back.

    q, k and v (``[N/CP, h, Dh]``) travel in one all-to-all, the output in a second.
    """

    def __init__(self, inner: nn.Module, group: ProcessGroup) -> None:
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *packing: Any) -> torch.Tensor:
        """``packing``: the inner attention's description of the whole sequence (``cu_seqlens`` and
        ``bounds``; HunyuanVideo's :class:`JointPacking`), passed through."""
        qkv = SequenceToHeads.apply(torch.stack([q, k, v], dim=1), self.group)  # [N, 3, h/CP, Dh]
        out = self.inner(*qkv.unbind(1), *packing)  # [N, h/CP, Dh]
        return HeadsToSequence.apply(out, self.group)  # [N/CP, h, Dh]


class HeadShardedRMSNorm(nn.Module):
    """An RMSNorm across all heads (Wan's q/k norm, weight ``[H·Dh]``) on a rank that holds ``H/TP``.

    The weight is cut like the heads (rank r keeps ``[r·H·Dh/TP, (r+1)·H·Dh/TP)``); the sum of
    squares over the rank's slice is summed over the TP group (:class:`SumOverRanks`), so every
    rank divides by the mean over all ``H·Dh`` features. The weight's gradient is local: each rank's
    slice only ever meets its own features.
    """

    def __init__(self, norm: nn.RMSNorm, split: TensorSplit, group: ProcessGroup) -> None:
        super().__init__()
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        if norm.weight is None or len(norm.normalized_shape) != 1:
            raise ValueError("HeadShardedRMSNorm takes an RMSNorm over the last dimension, with a weight")
        self.features = int(norm.normalized_shape[0])  # H·Dh, over all ranks
        self.eps = norm.eps
        self.group = group
        self.weight = nn.Parameter(split.shard(norm.weight.detach(), rank, size).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, H·Dh/TP]`` -> the same, normalised by the root mean square over all ``H·Dh`` features."""
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        squares = x.float().square().sum(-1, keepdim=True)  # [n, 1]: this rank's heads
        total = SumOverRanks.apply(squares, self.group)  # [n, 1]: every head
        return (x.float() * torch.rsqrt(total / self.features + eps)).type_as(x) * self.weight


class ShardedTokens(SampleTokenLayout):
    """The token layout of a parallel model: CP shards of the packed sequence, SP shards within them."""

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

    def _rows(self, count: int) -> slice:
        """This CP rank's rows of a stream padded to ``count`` rows."""
        shard = count // self.context_size
        return slice(self.context_rank * shard, (self.context_rank + 1) * shard)

    def shard_batch(self, batch: PackedBatch) -> PackedBatch:
        padded = pad_packed_batch(batch, self.multiple)
        if self.context_size == 1:
            return padded
        rows = self._rows(padded.tokens.shape[0])
        # Plain slicing: the backward puts this rank's share of the gradient on its own rows.
        return padded.replace(**padded.map_tokens(lambda tensor: tensor[rows]))

    def shard_rows(self, rows: torch.Tensor) -> torch.Tensor:
        padded = padded_rows(rows, -rows.shape[0] % self.multiple)  # as pad_packed_batch pads
        return padded if self.context_size == 1 else padded[self._rows(padded.shape[0])]

    def enter_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return rows
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        # Backward all-gathers: every TP rank gets the whole gradient of the (replicated) rows.
        return cast(torch.Tensor, scatter_to_sequence_parallel_region(rows, group=self.tensor_group))

    def enter_table(self, table: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return table
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        return cast(torch.Tensor, copy_to_tensor_model_parallel_region(table, group=self.tensor_group))

    def enter_blocks(self, x: torch.Tensor, modulation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.enter_rows(x), self.enter_rows(modulation)

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

    def local_sample_index(self, local: PackedBatch) -> torch.Tensor:
        """The sample of each of this CP rank's rows (also under SP: the column-parallel layers
        gather the TP shards back to these rows before attention)."""
        index = local.sample_index()  # [N_padded]: from the whole sequence's cu_seqlens
        shard = index.numel() // self.context_size
        return index[self.context_rank * shard : (self.context_rank + 1) * shard]


def _sum_gradient_over(group: ProcessGroup) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        # A copy: the incoming gradient may be another tensor's too (an add of two same-shaped
        # operands hands both one tensor, as Wan's scale_shift_table + a [1, 6, d] modulation
        # table does), and reducing it in place would sum that other gradient over the group too.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=group)
        return grad

    return hook


def _submodule_owner(block: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding ``path`` (``to_out.0`` -> ``to_out``, ``"0"``) and its name there."""
    owner, _, name = path.rpartition(".")
    return (block.get_submodule(owner) if owner else block), name


def model_blocks(model: nn.Module, plan: FamilyPlan) -> list[tuple[nn.Module, BlockPlan]]:
    """Every transformer block of ``model`` with its plan, list by list of ``plan``."""
    return [
        (block, block_plan)
        for name, block_plan in plan.blocks.items()
        for block in cast(nn.ModuleList, getattr(model, name))
    ]


def partial_gradient_parameters(
    block: nn.Module, plan: BlockPlan, sequence_parallel: bool
) -> list[nn.Parameter]:
    """Parameters whole on every TP rank whose gradient on one rank covers only part of the work.

    Call after the layers are replaced: under SP the row-parallel biases (added after the
    reduce-scatter) are among them.
    """
    names = list(plan.head_partial)
    if sequence_parallel:
        names += list(plan.token_partial)
        names += [
            f"{weight[: -len('.weight')]}.bias" for weight, split in plan.splits.items() if split.dim == 1
        ]
    params = dict(block.named_parameters())
    return [params[name] for name in names if name in params]


def check_layout(model: nn.Module, tensor: int, context: int) -> None:
    """Errors for a model that cannot be split over ``tensor`` × ``context`` ranks, naming the sizes."""
    checked: set[str] = set()
    for block, plan in model_blocks(model, family_plan(model)):
        if plan.mlp in checked:
            continue
        checked.add(plan.mlp)
        attention: Any = block.get_submodule(plan.heads)  # a module with num_heads
        heads = int(attention.num_heads)
        if heads % (tensor * context):
            raise ValueError(
                f"model.num_heads={heads} is not divisible by tensor_parallel × context_parallel = "
                f"{tensor} × {context}: each rank needs whole heads"
            )
        mlp = int(cast(nn.Linear, block.get_submodule(plan.mlp)).out_features)
        if mlp % tensor:
            raise ValueError(f"model.mlp_hidden_size={mlp} is not divisible by tensor_parallel={tensor}")


def _move_adapter(
    linear: nn.Module, layer: nn.Module, split: TensorSplit, group: ProcessGroup, sharded_input: bool
) -> list[torch.Tensor]:
    """Move ``linear``'s LoRA adapter onto ``layer``, its TP replacement, cut like it (imontage.models.lora).

    Returns the adapter's parameters whose gradient on one rank covers part of the work.
    """
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    a, b = cast(nn.Linear, linear.lora_A), cast(nn.Linear, linear.lora_B)

    def cut(factor: nn.Linear, weight: torch.Tensor) -> Any:
        piece = type(factor)(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            piece.weight.copy_(weight)
        return piece

    partial: list[torch.Tensor] = []
    if split.dim == 0:  # column parallel: the rank's rows of B; A whole
        b, mode = cut(b, split.shard(b.weight.detach(), rank, size)), "column"
        partial += [a.weight] if sharded_input else []  # A sees only the rank's tokens
    else:  # row parallel: the rank's columns of A; B whole
        mode = "row"
        if not split.interleaved:
            a = cut(a, split.shard(a.weight.detach(), rank, size))
        else:  # columns scattered over the input (JoinedInputSplit): A whole, applied to the rank's
            pieces = split.pieces(cast(nn.Linear, linear).weight.shape, rank, size)
            cast(ColumnsLinear, a).columns = torch.cat(
                [torch.arange(start, start + n) for start, n in pieces]
            )
            partial.append(a.weight)
        partial += [b.weight] if sharded_input else []  # B sees only the rank's tokens
    dropout = cast(nn.Module, linear.lora_dropout)
    set_adapter(
        layer, a, b, dropout, float(cast(Any, linear).lora_scale), LoraUpdate(mode, group, sharded_input)
    )
    return partial


def _tensor_parallel_block(
    block: nn.Module, plan: BlockPlan, configs: dict[bool, Any], group: ProcessGroup, sequence_parallel: bool
) -> None:
    """Replace ``block``'s cut layers by megatron-core's (``configs``: by whether the input is sharded)."""
    tensor = dist.get_world_size(group)
    modules = dict(block.named_modules())
    for name, split in plan.splits.items():
        path, _, kind = name.rpartition(".")
        if kind != "weight" or path not in modules:
            continue  # biases go with their weight; T2V blocks have no add_* layers
        owner, attribute = _submodule_owner(block, path)
        module = modules[path]
        sharded_input = sequence_parallel and path not in plan.whole_inputs
        if isinstance(module, nn.RMSNorm):
            replaced: nn.Module = HeadShardedRMSNorm(module, split, group)
        elif split.dim == 0:
            replaced = _column_parallel(cast(nn.Linear, module), split, configs[sharded_input])
        else:
            replaced = _row_parallel(cast(nn.Linear, module), split, configs[sharded_input])
        if has_adapter(module):
            for param in _move_adapter(module, replaced, split, group, sharded_input):
                param.register_hook(_sum_gradient_over(group))
        setattr(owner, attribute, replaced)
    for path in plan.head_modules:
        owner_of_heads: Any = block.get_submodule(path)  # reads num_heads to split q, k, v into heads
        owner_of_heads.num_heads = int(owner_of_heads.num_heads) // tensor
    for param in partial_gradient_parameters(block, plan, sequence_parallel):
        param.register_hook(_sum_gradient_over(group))


def parallelize_model(
    model: nn.Module,
    tensor_parallel: int = 1,
    context_parallel: int = 1,
    sequence_parallel: bool = False,
    activation_checkpointing: bool = False,
) -> Any:
    """Apply TP, SP, Ulysses and activation checkpointing to ``model`` in place (module docstring).

    ``model``: the model of any registered family (:mod:`imontage.models.registry`), or a model of
    several experts, each of whose networks is parallelised alike. megatron-core's ``parallel_state`` must be
    initialised with the same sizes (:func:`imontage.parallel.state.init_process_groups`).
    """
    from megatron.core import parallel_state

    networks = expert_networks(model)
    if len(networks) > 1:  # a model of several experts: each network is parallelised alike
        for _, network in networks:
            parallelize_model(
                network, tensor_parallel, context_parallel, sequence_parallel, activation_checkpointing
            )
        return model
    parallel: Any = model  # every family has token_layout and gradient_checkpointing
    if sequence_parallel and tensor_parallel == 1:
        raise ValueError(
            "sequence_parallel needs tensor_parallel > 1: it shards activations over the TP group"
        )
    if tensor_parallel == 1 and context_parallel == 1:  # any family, even one without a plan
        parallel.gradient_checkpointing = activation_checkpointing
        return parallel
    plan = family_plan(model)
    check_layout(model, tensor_parallel, context_parallel)
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
    if tensor_group is not None:
        configs = {sharded: _megatron_config(model, tensor_parallel, sharded) for sharded in (False, True)}
        for block, block_plan in model_blocks(model, plan):
            _tensor_parallel_block(block, block_plan, configs, tensor_group, sequence_parallel)
    if context_group is not None:
        for block, block_plan in model_blocks(model, plan):
            for path in block_plan.self_attentions:
                attention = block.get_submodule(path)  # its core attention becomes the Ulysses one
                inner = cast(nn.Module, attention.core_attention)
                attention.core_attention = UlyssesAttention(inner, context_group)
    parallel.token_layout = ShardedTokens(tensor_group, sequence_parallel, context_group)
    parallel.gradient_checkpointing = activation_checkpointing
    return parallel


parallelize_dit = parallelize_model  # the name the trainer calls; it takes every family

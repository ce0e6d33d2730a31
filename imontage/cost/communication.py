"""What one training step of a parallel model exchanges and holds per GPU, and counters to check it.

:func:`communication_plan` derives, from the model's shape, the micro-batch and the layout, every
collective of one forward + backward pass of the parallel model, for the DiT and Wan 2.1 (ZeRO's
parameter gathers and gradient reductions are not in it: they depend on the engine's buckets, not
on the layout; :func:`zero3_traffic` gives their volume). :func:`estimate_memory` estimates one
GPU's memory: parameters, gradients, optimiser state and activations. :func:`count_collectives`
and :func:`count_saved_tensors` count what a real step makes and keeps, so tests hold both to the
truth.

Sizes are *logical*: the whole tensor an operation produces or consumes (an all-gather's output,
a reduce-scatter's input, an all-reduce's or all-to-all's buffer). What one rank puts on the wire
with ring algorithms follows from it: ``2(p−1)/p`` of it for an all-reduce, ``(p−1)/p`` for the
other three.

Rows: ``n`` tokens per CP shard (the padded sequence / CP: what attention and the column-parallel
outputs see), ``s`` rows of the residual stream (``n/TP`` under SP, else ``n``); hidden size ``d``,
head dim ``Dh``, ``h`` = heads / TP. DiT, per block:

| layout | forward | backward |
| --- | --- | --- |
| TP | 2 all-reduce ``[n, d]`` (after ``proj``, ``fc2``) | 2 all-reduce ``[n, d]`` (input grads of ``qkv``, ``fc1``); QK-norm grads ``2·[Dh]`` |
| TP + SP | 2 all-gather + 2 reduce-scatter ``[n, d]`` | 4 all-gather + 2 reduce-scatter ``[n, d]``; grads of QK-norm, adaLN offset ``[6, d]``, row biases ``2·[d]`` |
| Ulysses | all-to-all ``[n, 3, h, Dh]`` (q, k, v), all-to-all ``[N, h/CP, Dh]`` | the same two, reversed |

Wan 2.1, per block (``M`` text-context rows: samples × ``wan.text_len``; ``L`` CLIP image rows, I2V):
its q, k, v, cross-attention q and first FFN linear are five column-parallel layers, ``to_out.0``
(twice) and ``ffn.net.2`` three row-parallel ones; the cross-attention's ``to_k``/``to_v`` (and
I2V's ``add_k_proj``/``add_v_proj``) read the whole context, never sequence-sharded.

| layout | forward | backward |
| --- | --- | --- |
| TP | 3 all-reduce ``[n, d]``; the norms across heads: all-reduce ``[rows, 1]`` fp32 for ``attn1`` q, k, ``attn2`` q (``n``), k (``M``), I2V image k (``L``) | 5 all-reduce ``[n, d]``, 2 ``[M, d]``, I2V 2 ``[L, d]``; the norms' all-reduces again |
| TP + SP | 5 all-gather + 3 reduce-scatter ``[n, d]``; the norms as TP | 8 all-gather + 5 reduce-scatter ``[n, d]``; the context's and norms' all-reduces as TP; grads of ``scale_shift_table`` ``[6, d]``, ``norm2`` ``2·[d]``, row biases ``3·[d]`` |
| Ulysses | around ``attn1`` only: all-to-all of q, k, v and of the output | the same two, reversed |

Outside the blocks (both): under SP the backward all-gathers the gradients of the embeddings and
the modulation (``[n, d]`` and ``[n, 6, d]``) and the forward all-gathers the blocks' output
``[n, d]``; under CP the forward all-gathers the model output ``[N, C·p]``. With activation
checkpointing every block's forward collectives run twice. HunyuanVideo's and HunyuanVideo 1.5's (both
streams, joint attention, HunyuanVideo's single-stream blocks) are
:func:`imontage.models.common.dual_stream_cost.stream_tensor_parallel`'s. A family whose record has
no plan is refused (:class:`PlanError`); its memory is still estimated.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from imontage.cost.shape import communication_families, family_cost
from imontage.models.common.cost import (
    CallPlan,
    Collective,
    Layout,
    MicroBatch,
    ModelShape,
    PlanError,
    Shards,
)


def communication_plan(
    model: ModelShape, batch: MicroBatch, layout: Layout, element_bytes: int = 4
) -> list[Collective]:
    """Every collective of one forward + backward pass of the parallel model (module docstring)."""
    if layout.tensor == 1 and layout.context == 1:
        return []  # one rank holds the whole model and sequence: nothing to exchange inside it
    cost = family_cost(model.family)
    if cost.tensor_parallel is None:
        raise PlanError(
            f"no communication plan for model family '{model.family}' yet (the plan knows "
            f"{', '.join(communication_families())}); its memory estimate needs none"
        )
    if model.adapters and layout.tensor > 1:
        raise PlanError("model.lora is set: the adapters' own collectives under TP are not in the plan yet")
    rows = Shards.of(batch.sequence(model), layout)
    calls = CallPlan(model, layout, element_bytes)
    if layout.tensor > 1:
        cost.tensor_parallel(calls, model, rows.sequence, batch)
        if layout.sequence_parallel and cost.sequence_parallel_outside is not None:
            cost.sequence_parallel_outside(calls, model, batch)
        elif layout.sequence_parallel:
            n, d = rows.sequence, model.hidden_size
            calls.add("embeddings", "all_gather", "tp", n * d, "backward", 1)
            calls.add("modulation", "all_gather", "tp", n * 6 * d, "backward", 1)
            calls.add("blocks_output", "all_gather", "tp", n * d, "forward", 1)
    if layout.context > 1:
        n = rows.sequence if cost.attention_rows is None else cost.attention_rows(model, batch, layout)
        head_dim = model.head_dim
        heads = model.num_heads // layout.tensor  # heads of one TP rank
        where = cost.attention
        for phase in ("forward", "backward"):
            blocks = (
                model.depth + model.single_blocks
            )  # every block's attention (HunyuanVideo's single ones too)
            calls.add(f"{where}.ulysses_qkv", "all_to_all", "cp", n * 3 * heads * head_dim, phase, blocks)
            calls.add(f"{where}.ulysses_out", "all_to_all", "cp", n * heads * head_dim, phase, blocks)
        calls.add("outputs", "all_gather", "cp", rows.total * model.patch_features, "forward", 1)
    return calls.plan


def bytes_by_op(plan: list[Collective]) -> dict[str, int]:
    """Logical bytes per operation over the whole plan."""
    totals: dict[str, int] = defaultdict(int)
    for item in plan:
        totals[item.op] += item.bytes
    return dict(totals)


def calls_by_op(plan: list[Collective]) -> dict[str, Counter[int]]:
    """Per operation, how many calls of each logical size (bytes) the plan makes."""
    calls: dict[str, Counter[int]] = defaultdict(Counter)
    for item in plan:
        calls[item.op][item.numel * item.element_bytes] += item.count
    return dict(calls)


def format_plan(plan: list[Collective]) -> str:
    """A table of the plan: one row per kind of collective, then totals per operation."""
    header = (
        f"{'where':<24} {'op':<15} {'group':<6} {'phase':<9} {'calls':>6} {'MiB/call':>10} "
        f"{'MiB (logical)':>14} {'MiB/rank wire':>14}"
    )
    lines = [header, "-" * len(header)]
    for item in plan:
        lines.append(
            f"{item.where:<24} {item.op:<15} {item.group}{item.group_size:<4} {item.phase:<9} {item.count:>6} "
            f"{item.numel * item.element_bytes / 2**20:>10.3f} {item.bytes / 2**20:>14.2f} {item.wire_bytes / 2**20:>14.2f}"
        )
    lines.append("-" * len(header))
    for op, total in sorted(bytes_by_op(plan).items()):
        wire = sum(item.wire_bytes for item in plan if item.op == op)
        lines.append(
            f"{'total':<24} {op:<15} {'':<6} {'':<9} {'':>6} {'':>10} {total / 2**20:>14.2f} {wire / 2**20:>14.2f}"
        )
    return "\n".join(lines)

"""imontage's own DiT as a model family: the record :mod:`imontage.models.registry` lists."""

from __future__ import annotations

from torch import nn

from imontage.models.common.family import ModelFamily, deferred_build
from imontage.models.common.parallel_plan import COLUMNS, ROWS, BlockPlan, FamilyPlan, TensorSplit
from imontage.models.dit.cost import COST

# Keyed by a block parameter's name inside its block; the rest are whole on every rank.
TENSOR_PARALLEL_SPLITS: dict[str, TensorSplit] = {
    "qkv.weight": TensorSplit(0, parts=3),  # [3·H·Dh, d]: output rows
    "qkv.bias": TensorSplit(0, parts=3),
    "proj.weight": COLUMNS,  # [d, H·Dh]: input columns
    "fc1.weight": ROWS,  # [F, d]
    "fc1.bias": ROWS,
    "fc2.weight": COLUMNS,  # [d, F]
}
PARALLEL_PLAN = FamilyPlan(
    {
        "blocks": BlockPlan(
            TENSOR_PARALLEL_SPLITS,
            heads="",
            head_modules=(),
            mlp="fc1",
            self_attentions=("",),
            head_partial=("q_norm.weight", "k_norm.weight"),  # per-head QK-norm: one weight for all heads
            token_partial=("modulation",),
        )
    }
)


def _text_width(module: nn.Module) -> int:
    return int(module.text_proj[0].in_features)  # type: ignore[index, union-attr]


FAMILY = ModelFamily(
    name="dit",
    summary="imontage's own DiT (byte or precomputed text, any position layout)",
    build=deferred_build("imontage.models.dit.model:build_dit"),
    model_class="imontage.models.dit.model.DiT",
    parallel_plan=PARALLEL_PLAN,
    # Vectors up to a few model widths (norms, biases, the [6, d] adaLN offset) stay resident under ZeRO-3.
    zero3_resident_below=lambda module: 8 * int(module.hidden_size),  # type: ignore[arg-type]
    imagic_text_width=_text_width,
    cost=COST,
)

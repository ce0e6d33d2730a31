"""The cost model: what one training step of a parallel model exchanges and holds per GPU (``tools/plan.py``).

``communication`` derives a step's collectives, ``memory`` one GPU's memory under ZeRO-3,
``counting`` counts what a real step makes and keeps (the tests' truth), ``shape`` reads a model
config's shape. What differs between families is each family's part (``ModelFamily.cost``, in
``imontage/models/<family>/cost.py``), written in the terms of :mod:`imontage.models.common.cost`.
"""

from imontage.cost.communication import bytes_by_op, calls_by_op, communication_plan, format_plan
from imontage.cost.counting import count_collectives, count_saved_tensors
from imontage.cost.memory import (
    PRECISIONS,
    MemoryEstimate,
    activations,
    estimate_memory,
    format_memory,
    lora_block_linears,
    lora_blocks,
    parameter_census,
    zero3_traffic,
)
from imontage.cost.shape import communication_families, family_cost, model_shape
from imontage.models.common.cost import Layout, MicroBatch, ModelShape, PlanError

__all__ = [
    "PRECISIONS",
    "Layout",
    "MemoryEstimate",
    "MicroBatch",
    "ModelShape",
    "PlanError",
    "activations",
    "bytes_by_op",
    "calls_by_op",
    "communication_families",
    "communication_plan",
    "count_collectives",
    "count_saved_tensors",
    "estimate_memory",
    "family_cost",
    "format_memory",
    "format_plan",
    "lora_block_linears",
    "lora_blocks",
    "model_shape",
    "parameter_census",
    "zero3_traffic",
]

"""A model config's shape, and its family's part of the cost model, looked up in the registry."""

from __future__ import annotations

from typing import Any

from imontage.models.common.cost import FamilyCost, ModelShape, PlanError
from imontage.models.registry import DEFAULT_FAMILY, FAMILIES


def family_cost(family: str) -> FamilyCost:
    """The cost model of the family ``family`` (its record's ``cost``); a PlanError for one without."""
    record = FAMILIES.get(family)
    if record is None or record.cost is None:
        known = ", ".join(name for name, r in FAMILIES.items() if r.cost is not None)
        raise PlanError(f"model.family '{family}' is not one the plan knows ({known})")
    return record.cost


def communication_families() -> tuple[str, ...]:
    """The families whose collectives :func:`imontage.cost.communication.communication_plan` derives."""
    return tuple(name for name, r in FAMILIES.items() if r.cost is not None and r.cost.tensor_parallel)


def model_shape(cfg: Any) -> ModelShape:
    """What the plan and the activation estimate need of the model config ``cfg``."""
    return ModelShape.from_config(cfg, **family_cost(str(getattr(cfg, "family", DEFAULT_FAMILY))).shape(cfg))

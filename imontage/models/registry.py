"""The model families imontage knows, by ``model.family``: one :class:`ModelFamily` each.

A family registers here with one line (its folder's ``family.py`` holds the record); everything
else finds it through :func:`family` (a name or a model config) or :func:`family_of_module` (a
built model).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from imontage.models.common.experts import TimestepExperts
from imontage.models.common.family import ModelFamily
from imontage.models.dit.family import FAMILY as DIT
from imontage.models.hunyuan_video.family import FAMILY as HUNYUAN_VIDEO
from imontage.models.hunyuan_video_15.family import FAMILY as HUNYUAN_VIDEO_15
from imontage.models.wan.family import FAMILY as WAN

FAMILIES: dict[str, ModelFamily] = {
    record.name: record for record in (DIT, WAN, HUNYUAN_VIDEO, HUNYUAN_VIDEO_15)
}
DEFAULT_FAMILY = DIT.name  # model.family when a config leaves it out


def family(which: str | Any) -> ModelFamily:
    """The family named ``which``, or of the model config ``which`` (its ``family`` key, ``dit`` when unset)."""
    name = which if isinstance(which, str) else str(getattr(which, "family", DEFAULT_FAMILY))
    if name not in FAMILIES:
        raise ValueError(f"model.family '{name}' is not one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_module(module: nn.Module) -> ModelFamily:
    """The family whose model ``module`` is; a model of several experts is none's (each of its
    networks is one: :func:`~imontage.models.common.experts.expert_networks`)."""
    if isinstance(module, TimestepExperts):
        raise ValueError(
            f"a model of every expert ({', '.join(e.name for e in module.experts)}) is taken one network "
            "at a time here: name one with model.expert (docs/finetune_wan.md)"
        )
    for record in FAMILIES.values():
        if record.is_model(module):
            return record
    raise ValueError(f"a {type(module).__name__} is not the model of any family ({', '.join(FAMILIES)})")


def diffusers_family(class_name: str) -> ModelFamily | None:
    """The family whose transformer diffusers calls ``class_name``; None when no family's is."""
    return next((record for record in FAMILIES.values() if class_name in record.diffusers_classes), None)

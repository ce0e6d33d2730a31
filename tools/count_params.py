#!/usr/bin/env python
"""Print the parameter count of model presets (built on the meta device: no memory is used).

python tools/count_params.py                    # every preset in configs/model/
python tools/count_params.py dit_14b dit_1b     # some of them
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from imontage.config.schema import ModelConfig
from imontage.models import build_model, count_parameters, trained_experts

MODEL_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def count_preset(name: str) -> tuple[int, float]:
    """(parameters of the built model, the size the preset states)."""
    path = MODEL_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"{path}: no such model preset")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    experts = trained_experts(cfg)
    if len(experts) > 1:  # experts of one shape (Wan 2.2 A14B): the size stated is one expert's
        cfg = OmegaConf.merge(cfg, {"expert": experts[0].name})
    return count_parameters(build_model(cfg, device="meta")), float(cfg.stated_params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="*", help="names under configs/model/ (default: all)")
    names = parser.parse_args().presets or sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))
    width = max(len("preset"), *(len(name) for name in names))
    print(f"{'preset':<{width}} {'parameters':>16} {'stated':>10} {'off by':>8}")
    for name in names:
        count, stated = count_preset(name)
        off = f"{100 * (count / stated - 1):+.2f}%" if stated else "-"
        print(f"{name:<{width}} {count:>16,} {stated:>10.4g} {off:>8}")


if __name__ == "__main__":
    main()

"""``imontage-train RECIPE [key=value ...]``: run a recipe's stages."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from imontage.config import RecipeError, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="imontage-train",
        description="Train a DiT with a recipe. Overrides: dotted.key=value, or group=name for a config group.",
    )
    parser.add_argument("recipe", help="recipe YAML, e.g. configs/recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="e.g. optim.lr=1e-4 model=dit_1b stages.sft.steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # torch 2.13 renamed all_gather_into_tensor/reduce_scatter_tensor and warns at every call; DeepSpeed's
    # ZeRO-3 (and our collectives, which keep the names older torch has) call them every step: a
    # 2-rank quickstart printed 14,000 lines of it. Only that warning is silenced.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except RecipeError as error:
        print(f"imontage-train: {error}", file=sys.stderr)
        return 2
    # Imported after validation: a bad recipe fails fast.
    from imontage.train.resilience import ExitCode, NumericalFault
    from imontage.train.trainer import RunStopped, train
    from imontage.untrusted import InputError

    try:
        run_dir = train(cfg)
    except InputError as error:  # a checkpoint, diffusers folder or shard that is not what it claims
        print(f"imontage-train: {error}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        print(f"imontage-train: {stop}", file=sys.stderr)
        return stop.exit_code
    except NumericalFault as fault:
        print(f"imontage-train: {fault}", file=sys.stderr)
        return int(ExitCode.NUMERICAL_FAULT)
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

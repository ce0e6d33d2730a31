"""``imontage-train RECIPE [key=value ...]``: run a recipe's stages."""

from __future__ import annotations

import argparse
import logging
import sys

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
    try:
        cfg = load_recipe(args.recipe, args.overrides)
    except RecipeError as error:
        print(f"imontage-train: {error}", file=sys.stderr)
        return 2
    from imontage.train.trainer import train  # imported after validation: a bad recipe fails fast

    run_dir = train(cfg)
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load a recipe: schema defaults, then the files its ``defaults:`` list composes, then the
recipe itself, then ``key=value`` overrides, merged by OmegaConf in strict mode.

Every failure is a :class:`RecipeError` that names the offending key and the file (or the
command line) it came from, raised before anything starts.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imontage.config.imagic import check_imagic
from imontage.config.keyframes import keyframe_problems
from imontage.config.model_file import check_model_config, is_pipeline, pipeline_components, read_model_config
from imontage.config.schema import (
    ATTENTION_BACKENDS,
    DEVICES,
    ENGINES,
    FRAME_SAMPLINGS,
    GROUPS,
    LR_SCHEDULES,
    NONFINITE_MODES,
    OBJECTIVES,
    PAIR_LAYOUTS,
    POSITION_LAYOUTS,
    PRECISIONS,
    PREDICTIONS,
    TEXT_ENCODERS,
    RecipeConfig,
    StageConfig,
)
from imontage.config.validation import check_validation
from imontage.models import packing_spec, trained_experts
from imontage.models.registry import FAMILIES, family
from imontage.untrusted import ConversionError, InputError

COMMAND_LINE = "<command line>"


class RecipeError(InputError):
    """A recipe that cannot run: an unknown key, a wrong type, a missing or invalid value."""


def config_root(recipe_path: Path) -> Path:
    """The folder holding the config groups: the nearest ancestor of the recipe with a ``model/``."""
    for parent in recipe_path.resolve().parents:
        if (parent / "model").is_dir():
            return parent
    raise RecipeError(f"{recipe_path}: no ancestor folder holds the config groups ({', '.join(GROUPS)})")


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise RecipeError(f"{path}: no such file")
    try:
        node = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and friends: report the file, keep the reason
        raise RecipeError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(node, DictConfig):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    return node


def _merge(base: DictConfig, update: Any, source: str, prefix: str = "") -> DictConfig:
    """Merge ``update`` into ``base``; a schema violation names the key and ``source``."""
    try:
        merged = OmegaConf.merge(base, update)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        key = f"{prefix}.{key}" if prefix and key else (prefix or key)
        reason = str(error).splitlines()[0]
        raise RecipeError(f"{source}: key '{key}': {reason}") from error
    assert isinstance(merged, DictConfig)
    return merged


def _group_file(root: Path, recipe_path: Path, group: str, choice: str) -> Path:
    # A choice ending in .yaml is a path relative to the recipe; otherwise a name in the group.
    if choice.endswith(".yaml"):
        return (recipe_path.parent / choice).resolve()
    return root / group / f"{choice}.yaml"


def _parse_defaults(node: Any, recipe_path: Path) -> dict[str, str]:
    choices: dict[str, str] = {}
    if node is None:
        return choices
    if not isinstance(node, ListConfig):
        raise RecipeError(f"{recipe_path}: key 'defaults': expected a list of '<group>: <name>' entries")
    for index, entry in enumerate(node):
        if not isinstance(entry, DictConfig) or len(entry) != 1:
            raise RecipeError(f"{recipe_path}: key 'defaults[{index}]': expected one '<group>: <name>' entry")
        ((group, choice),) = ((str(k), v) for k, v in entry.items())
        if group not in GROUPS:
            raise RecipeError(
                f"{recipe_path}: key 'defaults[{index}]': unknown config group '{group}' "
                f"(groups: {', '.join(GROUPS)})"
            )
        choices[str(group)] = str(choice)
    return choices


def _split_overrides(overrides: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``group=name`` choices (``model=dit_1b``) from ``dotted.key=value`` overrides."""
    choices: dict[str, str] = {}
    dotlist: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"{COMMAND_LINE}: '{item}' is not a key=value override")
        if key in GROUPS:
            choices[key] = value
        elif key == "stage":  # shorthand: run one stage of the recipe
            dotlist.append(f"train.only_stage={value}")
        else:
            dotlist.append(item)
    return choices, dotlist


def _merge_stages(cfg: DictConfig, stages: Any, source: str) -> DictConfig:
    # Merged one by one so that an error inside a list item still names `stages[i].key`.
    if stages is None:
        return cfg
    if not isinstance(stages, ListConfig):
        raise RecipeError(f"{source}: key 'stages': expected a list of stages")
    merged = []
    for index, stage in enumerate(stages):
        merged.append(_merge(OmegaConf.structured(StageConfig), stage, source, prefix=f"stages[{index}]"))
    cfg.stages = merged
    return cfg


class _Layers:
    """The layers merged so far, to tell which file (or the command line) set a key."""

    def __init__(self) -> None:
        self._layers: list[tuple[str, DictConfig]] = []

    def add(self, source: str, node: Any) -> Any:
        self._layers.append((source, OmegaConf.create(node)))
        return node

    def origin(self, key: str) -> str:
        for source, node in reversed(self._layers):
            if _sets(OmegaConf.to_container(node, resolve=False), key):
                return source
        return "<schema default>"


def _sets(values: Any, key: str) -> bool:
    """``values`` (a plain container) holds the dotted ``key`` (``stages[1].steps`` or ``stages.1.steps``),
    looked up without resolving any interpolation."""
    for part in key.replace("[", ".").replace("]", "").split("."):
        if isinstance(values, dict) and part in values:
            values = values[part]
        elif isinstance(values, list) and part.isdigit() and int(part) < len(values):
            values = values[int(part)]
        else:
            return False
    return True


def _stage_index(cfg: DictConfig, selector: str) -> int:
    """``stages.<i>.key`` and ``stages.<name>.key`` both address a stage on the command line."""
    names = [stage.name for stage in cfg.stages]
    if selector.isdigit() and int(selector) < len(names):
        return int(selector)
    if selector in names:
        return names.index(selector)
    raise RecipeError(f"{COMMAND_LINE}: key 'stages.{selector}': no such stage (stages: {', '.join(names)})")


def _merge_cli_stages(cfg: DictConfig, dotlist: list[str], layers: _Layers) -> DictConfig:
    for item in dotlist:
        key, _, value = item.partition("=")
        _, selector, rest = (key.split(".", 2) + ["", ""])[:3]
        if not rest:
            raise RecipeError(f"{COMMAND_LINE}: '{item}': expected stages.<index or name>.<key>=<value>")
        index = _stage_index(cfg, selector)
        update = OmegaConf.from_dotlist([f"{rest}={value}"])
        layers.add(COMMAND_LINE, {"stages": [{}] * index + [update]})
        stage = _merge(cfg.stages[index], update, COMMAND_LINE)  # attached: the error key is already full
        cfg.stages[index] = stage
    return cfg


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load, merge and validate a recipe; returns a read-only config typed by :class:`RecipeConfig`."""
    recipe_path = Path(path)
    body = _read_yaml(recipe_path)
    choices = _parse_defaults(body.pop("defaults", None), recipe_path)
    cli_choices, dotlist = _split_overrides(overrides)
    choices.update(cli_choices)
    layers = _Layers()

    cfg = OmegaConf.structured(RecipeConfig)
    root = config_root(recipe_path) if choices else recipe_path.parent
    for group, choice in choices.items():
        group_path = _group_file(root, recipe_path, group, choice)
        update = layers.add(str(group_path), {group: _read_yaml(group_path)})
        cfg = _merge(cfg, update, str(group_path))

    stages = body.pop("stages", None)
    cfg = _merge(cfg, layers.add(str(recipe_path), body), str(recipe_path))
    cfg = _merge_stages(cfg, stages, str(recipe_path))
    if stages is not None:
        layers.add(str(recipe_path), {"stages": stages})

    stage_dotlist = [item for item in dotlist if item.startswith("stages.")]
    other_dotlist = [item for item in dotlist if not item.startswith("stages.")]
    try:
        cli = OmegaConf.from_dotlist(other_dotlist)
    except Exception as error:
        raise RecipeError(f"{COMMAND_LINE}: cannot parse overrides {other_dotlist}: {error}") from error
    cfg = _merge(cfg, layers.add(COMMAND_LINE, cli), COMMAND_LINE)
    cfg = _merge_cli_stages(cfg, stage_dotlist, layers)

    check_interpolations(cfg, layers.origin)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RecipeError(
            f"{recipe_path}: missing required value(s): {', '.join(missing)} "
            "(set them in the recipe, in a file its defaults list names, or as key=value overrides)"
        )
    validate(cfg, layers.origin)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def check_interpolations(cfg: DictConfig, origin: Callable[[str], str]) -> None:
    """Every ``${...}`` resolves: a loop (``a: ${b}``, ``b: ${a}``), a key that points nowhere or an
    unset ``${oc.env:...}`` is a :class:`RecipeError` naming the key and the file that set it."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except (OmegaConfBaseException, RecursionError) as error:
        key = str(getattr(error, "full_key", "") or "")
        reason = (
            "the interpolation loops" if isinstance(error, RecursionError) else str(error).splitlines()[0]
        )
        raise RecipeError(f"{origin(key) if key else '<recipe>'}: key '{key}': {reason}") from None


def run_config_yaml(cfg: DictConfig) -> str:
    """The recipe as run (``RUN_DIR/config.yaml``): every value resolved, except those that come
    from the environment (``${oc.env:...}``, directly or through other keys), which keep their
    interpolation: a token in the environment must not end up in a run folder people share."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    leaves = dict(_leaves(raw))
    from_env = {key for key, value in leaves.items() if isinstance(value, str) and "oc.env" in value}
    grew = True
    while grew:  # keys that interpolate an environment-derived key are environment-derived too
        grown = {
            key
            for key, value in leaves.items()
            if key not in from_env and isinstance(value, str) and any(f"${{{k}}}" in value for k in from_env)
        }
        from_env |= grown
        grew = bool(grown)
    out = OmegaConf.create(resolved)
    assert isinstance(out, DictConfig)
    for key in from_env:
        OmegaConf.update(out, key, leaves[key], force_add=True)
    return OmegaConf.to_yaml(out)


def _leaves(values: Any, prefix: str = "") -> Any:
    """(dotted key, value) of every leaf of a plain container (list items as ``key.0``, as
    OmegaConf.update and ``${...}`` address them)."""
    items = (
        values.items()
        if isinstance(values, dict)
        else enumerate(values)
        if isinstance(values, list)
        else None
    )
    if items is None:
        yield prefix, values
        return
    for key, value in items:
        yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))


def stage_section(cfg: DictConfig, index: int, section: str, source: str = "") -> DictConfig:
    """The top-level ``data`` or ``optim`` section with stage ``index``'s overrides applied."""
    overrides = {key: value for key, value in cfg.stages[index][section].items() if value is not None}
    source = source or f"stage '{cfg.stages[index].name}'"
    return _merge(cfg[section], overrides, source, prefix=f"stages[{index}]")


Origin = Callable[[str], str]


def _check_choice(value: Any, allowed: Sequence[str], key: str, origin: Origin) -> None:
    if value not in allowed:
        raise RecipeError(f"{origin(key)}: key '{key}': '{value}' is not one of {', '.join(allowed)}")


def _check(condition: bool, key: str, origin: Origin, reason: str) -> None:
    if not condition:
        raise RecipeError(f"{origin(key)}: key '{key}': {reason}")


def validate(cfg: DictConfig, origin: Origin) -> None:
    """Checks the schema's types cannot express: choices, ranges and cross-key constraints.

    ``origin(key)`` names the file (or the command line) that set ``key``, for the message.
    """
    source = origin
    model = cfg.model
    _check_choice(model.family, tuple(FAMILIES), "model.family", source)
    record = family(model)
    for key, reason in record.validate(model):
        _check(False, f"model.{key}", source, reason)
    _check(
        not record.precomputed_text or model.text_encoder == "precomputed",
        "model.text_encoder",
        source,
        f"family {model.family} reads precomputed text embeddings: set text_encoder: precomputed",
    )
    _check(
        model.prediction in record.predictions,
        "model.prediction",
        source,
        f"family {model.family} predicts the {' or the '.join(record.predictions)}, as it was pretrained to: "
        f"{model.prediction!r} is not for it",
    )
    _check_choice(model.text_encoder, TEXT_ENCODERS, "model.text_encoder", source)
    try:
        trained_experts(model)
    except ValueError as error:
        raise RecipeError(f"{source('model.expert')}: key 'model.expert': {error}") from error
    if model.init_from_diffusers:
        _validate_init_from_diffusers(model, source)
    _check_choice(model.attention_backend, ATTENTION_BACKENDS, "model.attention_backend", source)
    _check_choice(model.prediction, PREDICTIONS, "model.prediction", source)
    _check(0.0 < model.min_timestep < 1.0, "model.min_timestep", source, "must be in (0, 1)")
    _check_choice(model.rope.pair_layout, PAIR_LAYOUTS, "model.rope.pair_layout", source)
    _check_choice(model.positions.layout, POSITION_LAYOUTS, "model.positions.layout", source)
    _check_choice(cfg.parallel.device, DEVICES, "parallel.device", source)
    _validate_parallel(cfg.parallel, source)
    split = cfg.parallel.tensor_parallel * cfg.parallel.context_parallel
    _check(
        model.num_heads % split == 0,
        "parallel.tensor_parallel",
        source,
        f"model.num_heads={model.num_heads} is not divisible by tensor_parallel × context_parallel = "
        f"{cfg.parallel.tensor_parallel} × {cfg.parallel.context_parallel}: each rank needs whole heads",
    )
    _check_choice(cfg.train.precision, PRECISIONS, "train.precision", source)
    _check(cfg.train.grad_accumulation >= 1, "train.grad_accumulation", source, "must be >= 1")
    _check_choice(cfg.optim.schedule, LR_SCHEDULES, "optim.schedule", source)

    _check(len(model.patch_size) == 3, "model.patch_size", source, "expected three sizes (pt, ph, pw)")
    _check(all(p > 0 for p in model.patch_size), "model.patch_size", source, "sizes must be positive")
    for key in ("in_channels", "hidden_size", "depth", "num_heads", "mlp_hidden_size", "text_dim"):
        _check(model[key] > 0, f"model.{key}", source, "must be positive")
    _check(
        model.hidden_size % model.num_heads == 0,
        "model.num_heads",
        source,
        f"hidden_size {model.hidden_size} is not divisible by num_heads {model.num_heads}",
    )
    head_dim = model.hidden_size // model.num_heads
    _check(head_dim % 2 == 0, "model.num_heads", source, f"head dim {head_dim} must be even for RoPE")
    bands, theta = list(model.rope.bands), list(model.rope.theta)
    _check(len(bands) == 4, "model.rope.bands", source, "expected 4 entries, pairs per axis (s, t, h, w)")
    _check(min(bands) >= 0, "model.rope.bands", source, "pairs per axis must be >= 0")
    _check(
        sum(bands) <= head_dim // 2,
        "model.rope.bands",
        source,
        f"{sum(bands)} pairs in all, but head dim {head_dim} has only {head_dim // 2}",
    )
    _check(len(theta) == 4, "model.rope.theta", source, "expected 4 entries, one base per axis (s, t, h, w)")
    _check(min(theta) > 1.0, "model.rope.theta", source, "each base must be > 1")
    positions = model.positions
    _check(positions.virtual_frames > 0, "model.positions.virtual_frames", source, "must be positive")
    for key in ("head_window", "tail_window"):
        _check(
            0 < positions[key] <= positions.virtual_frames,
            f"model.positions.{key}",
            source,
            f"must be in 1..virtual_frames ({positions.virtual_frames})",
        )

    validate_data(cfg.data, "data", model, source)
    _check(
        0.0 <= cfg.flow_matching.text_dropout <= 1.0,
        "flow_matching.text_dropout",
        source,
        "must be in [0, 1]",
    )
    _check(cfg.flow_matching.t_std > 0, "flow_matching.t_std", source, "must be positive")
    _check(cfg.flow_matching.shift > 0, "flow_matching.shift", source, "must be positive")
    _validate_model_inputs(cfg, source)
    _check(cfg.dpo.beta > 0, "dpo.beta", source, "must be positive")
    check_imagic(cfg.imagic, source, error=RecipeError)
    _check(cfg.optim.lr > 0, "optim.lr", source, "must be positive")
    _check(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", source, "must be >= 0")
    _check(len(cfg.optim.betas) == 2, "optim.betas", source, "expected two values")
    _check(0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay", source, "must be in [0, 1)")
    _validate_faults(cfg.train.faults, source)

    _check(len(cfg.stages) > 0, "stages", source, "a recipe declares at least one stage")
    names = [stage.name for stage in cfg.stages]
    for index, stage in enumerate(cfg.stages):
        key = f"stages[{index}]"
        _check_choice(stage.objective, OBJECTIVES, f"{key}.objective", source)
        _check(stage.steps > 0, f"{key}.steps", source, "must be positive")
        _check(names.count(stage.name) == 1, f"{key}.name", source, f"stage name '{stage.name}' is repeated")
        for section in ("data", "optim"):
            # A wrong type in a stage override fails here, named with the file that set it.
            merged = stage_section(cfg, index, section, source=origin(f"{key}.{section}"))
            if section == "data" and any(value is not None for value in stage.data.values()):
                validate_data(merged, f"{key}.data", model, source)
        if stage.objective == "flow_dpo":
            _validate_dpo_stage(cfg, index, source)
        _validate_stage_validation(cfg, index, source)
        _check(
            not stage.init_from or Path(stage.init_from).exists(),
            f"{key}.init_from",
            source,
            f"no such file or directory: {stage.init_from}",
        )
    only = cfg.train.only_stage
    _check(
        not only or only in names,
        "train.only_stage",
        source,
        f"no stage '{only}' (stages: {', '.join(names)})",
    )


def _validate_model_inputs(cfg: DictConfig, source: Origin) -> None:
    """What the model reads besides tokens must be buildable: channel counts that match a known
    channel condition, and an embedded guidance scale only for a model with a guidance embedding."""
    guidance = cfg.flow_matching.embedded_guidance
    try:
        packing_spec(cfg.model, guidance)
    except ValueError as error:
        key = "flow_matching.embedded_guidance" if "embedded_guidance" in str(error) else "model.in_channels"
        raise RecipeError(f"{source(key)}: key '{key}': {error}") from error


def _validate_init_from_diffusers(model: DictConfig, source: Origin) -> None:
    """The folder exists and holds this family's diffusers class with this model's config (config.json
    only); or it is a pipeline folder whose index and transformers (those the run reads) match it."""
    key = "model.init_from_diffusers"
    folder = Path(model.init_from_diffusers)
    _check(folder.is_dir(), key, source, f"no such folder: {folder}")
    try:
        if is_pipeline(folder):
            pipeline_components(folder, model)
        else:
            check_model_config(folder, model)
    except ConversionError as error:
        _check_pretrained_rope(model, folder, source)  # the RoPE is what differs: say so, and why
        raise RecipeError(f"{source(key)}: key '{key}': {error}") from error


def _check_pretrained_rope(model: DictConfig, folder: Path, source: Origin) -> None:
    """``model.rope`` equals the RoPE of the folder's pretrained model, named by the key that differs.

    A pretrained family's class computes one RoPE; another split of the pairs (EditVerse's 4D
    bands, say) would turn its pretrained bands at other frequencies and could not be exported.
    """
    try:
        _, family, pretrained = read_model_config(folder)
    except ConversionError:
        return  # not readable as a model of a family: the caller's message says why
    if family != model.family:
        return
    for name in ("bands", "theta", "pair_layout"):
        ours, theirs = model.rope[name], pretrained.rope[name]
        if isinstance(ours, ListConfig):
            ours, theirs = [float(v) for v in ours], [float(v) for v in theirs]
        _check(
            ours == theirs,
            f"model.rope.{name}",
            source,
            f"{model.rope[name]} is not the {pretrained.rope[name]} of the RoPE {folder} was pretrained "
            f"with, the only one its class computes (model.init_from_diffusers and export-diffusers need "
            "it): keep the model preset's rope; a position axis with no pairs is not rotated "
            "(docs/finetune_wan.md: EditVerse on Wan)",
        )


def _validate_stage_validation(cfg: DictConfig, index: int, source: Origin) -> None:
    """Stage ``index``'s held-out validation: the top-level ``validation`` with its overrides."""
    stage = cfg.stages[index]

    def where(key: str) -> str:  # a key the stage overrides is named under the stage
        own = stage.validation[key.split("[")[0]] is not None
        return f"stages[{index}].validation.{key}" if own else f"validation.{key}"

    experts = trained_experts(cfg.model)
    check_validation(
        stage_section(cfg, index, "validation", source=source(f"stages[{index}].validation")),
        where,
        source,
        [str(dataset.name) for dataset in stage_section(cfg, index, "data").datasets],
        stage.objective,
        [(e.t_min, e.t_max) for e in experts] or [(0.0, 1.0)],
        RecipeError,
    )


def _validate_dpo_stage(cfg: DictConfig, index: int, source: Origin) -> None:
    """A flow_dpo stage's reference is the policy at its start: the previous stage's final checkpoint.

    A resume inside the stage rebuilds the reference from that checkpoint, so pruning must not
    reach it while the stage can still be resumed: through its periodic saves plus one stop save.
    """
    key = f"stages[{index}].objective"
    _check(
        index > 0 or bool(cfg.stages[index].init_from),
        key,
        source,
        "flow_dpo fine-tunes a trained policy against a frozen copy of it: put it after a stage "
        "that trains the model (e.g. flow_matching), or give it init_from",
    )
    if cfg.stages[index].init_from:
        return  # a resume inside the stage rebuilds the reference from init_from
    keep, every = cfg.train.checkpoint.keep_last, cfg.train.checkpoint.every
    first = sum(stage.steps for stage in cfg.stages[:index])
    last = first + cfg.stages[index].steps
    saves = len(range(first + every - first % every, last, every)) if every > 0 else 0  # inside the stage
    _check(
        keep == 0 or keep > saves + 1,
        "train.checkpoint.keep_last",
        source,
        f"{keep} would prune step_{first:06d}, the entry checkpoint of flow_dpo stage "
        f"'{cfg.stages[index].name}', which a resume inside the stage rebuilds its reference from; "
        f"the stage saves {saves} checkpoint(s) before its end: use 0 or at least {saves + 2}",
    )


# Signals a Python handler can catch; SIGKILL and SIGSTOP cannot be.
_CATCHABLE_SIGNALS = tuple(sorted(set(signal.Signals.__members__) - {"SIGKILL", "SIGSTOP"}))


def _validate_faults(faults: DictConfig, source: Origin) -> None:
    _check_choice(faults.nonfinite, NONFINITE_MODES, "train.faults.nonfinite", source)
    _check(faults.max_consecutive_skips >= 0, "train.faults.max_consecutive_skips", source, "must be >= 0")
    _check(
        faults.spike_factor == 0 or faults.spike_factor > 1,
        "train.faults.spike_factor",
        source,
        "must be > 1 (or 0, which turns spike detection off)",
    )
    _check(faults.spike_window >= 1, "train.faults.spike_window", source, "must be >= 1")
    for key in ("timeout_first_step_s", "timeout_s"):
        _check(faults[key] > 0, f"train.faults.{key}", source, "must be positive")
    for name in faults.stop_signals:
        _check(
            name in _CATCHABLE_SIGNALS,
            "train.faults.stop_signals",
            source,
            f"'{name}' is not a signal a handler can catch (for example SIGUSR2, SIGTERM)",
        )


def _check_sizes(sizes: Any, divisors: Sequence[int], key: str, origin: Origin) -> None:
    """Each entry is as many positive integers as ``divisors``, each divisible by its divisor."""
    for entry in sizes:
        values = list(entry) if isinstance(entry, ListConfig) else [entry]
        _check(len(values) == len(divisors), key, origin, f"entry {values}: expected {len(divisors)} sizes")
        _check(
            all(v > 0 and v % d == 0 for v, d in zip(values, divisors, strict=True)),
            key,
            origin,
            f"entry {values}: sizes must be positive multiples of the patch size {list(divisors)}",
        )


def _validate_parallel(parallel: DictConfig, source: Origin) -> None:
    _check_choice(parallel.engine, ENGINES, "parallel.engine", source)
    for key in ("tensor_parallel", "context_parallel"):
        _check(parallel[key] >= 1, f"parallel.{key}", source, "must be >= 1")
    _check(parallel.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", source, "must be 0, 1, 2 or 3")
    _check(
        not parallel.sequence_parallel or parallel.tensor_parallel > 1,
        "parallel.sequence_parallel",
        source,
        "needs tensor_parallel > 1: it shards activations over the tensor-parallel group",
    )
    _check(
        parallel.engine == "deepspeed" or (parallel.tensor_parallel == 1 and parallel.context_parallel == 1),
        "parallel.engine",
        source,
        "is local (one process); tensor_parallel or context_parallel > 1 needs engine: deepspeed",
    )


def _validate_mixture(data: DictConfig, prefix: str, origin: Origin) -> None:
    names = [dataset.name for dataset in data.datasets]
    for index, dataset in enumerate(data.datasets):
        key = f"{prefix}.datasets[{index}]"
        _check(
            bool(dataset.name) and names.count(dataset.name) == 1,
            f"{key}.name",
            origin,
            "names must be unique and non-empty",
        )
        _check(bool(dataset.shards), f"{key}.shards", origin, "must name shards")
        _check(dataset.weight >= 0, f"{key}.weight", origin, "must be >= 0")
    if data.datasets and not data.mixture:
        _check(
            sum(d.weight for d in data.datasets) > 0,
            f"{prefix}.datasets",
            origin,
            "weights must not all be 0",
        )
    _check(
        not data.mixture or bool(data.datasets), f"{prefix}.mixture", origin, "a mixture needs data.datasets"
    )
    steps = [point.step for point in data.mixture]
    _check(
        steps == sorted(set(steps)) and min(steps, default=0) >= 0,
        f"{prefix}.mixture",
        origin,
        f"steps {steps} must increase from >= 0",
    )
    for index, point in enumerate(data.mixture):
        key = f"{prefix}.mixture[{index}].weights"
        unknown = sorted(set(point.weights) - set(names))
        _check(not unknown, key, origin, f"unknown dataset(s) {unknown} (datasets: {', '.join(names)})")
        _check(all(w >= 0 for w in point.weights.values()), key, origin, "weights must be >= 0")
        _check(sum(point.weights.values()) > 0, key, origin, "weights must not all be 0")


def validate_data(data: DictConfig, prefix: str, model: DictConfig, origin: Origin) -> None:
    """The checks of a ``data`` section (``prefix`` is where it sits: ``data`` or ``stages[i].data``)."""
    _check(
        bool(data.shards) != bool(data.datasets),
        f"{prefix}.shards",
        origin,
        "set either 'shards' (one dataset) or 'datasets' (a mixture)",
    )
    _validate_mixture(data, prefix, origin)
    for name in ("batch_size", "max_tokens", "shuffle_buffer", "num_workers"):
        _check(data[name] >= 0, f"{prefix}.{name}", origin, "must be >= 0")
    _check(
        data.batch_size > 0 or data.max_tokens > 0,
        f"{prefix}.max_tokens",
        origin,
        "set max_tokens, batch_size or both",
    )
    _check(data.pack_buffer > 0, f"{prefix}.pack_buffer", origin, "must be positive")
    _check(data.prefetch > 0, f"{prefix}.prefetch", origin, "must be positive")
    pt, ph, pw = model.patch_size
    _check_sizes(data.buckets.image, (ph, pw), f"{prefix}.buckets.image", origin)
    _check_sizes(data.buckets.video, (ph, pw), f"{prefix}.buckets.video", origin)
    _check_sizes(data.buckets.frames, (pt,), f"{prefix}.buckets.frames", origin)
    _check_choice(data.video.sampling, FRAME_SAMPLINGS, f"{prefix}.video.sampling", origin)
    _check(data.video.stride > 0, f"{prefix}.video.stride", origin, "must be positive")
    _check(data.video.fps > 0, f"{prefix}.video.fps", origin, "must be positive")
    _check(data.video.max_frames > 0, f"{prefix}.video.max_frames", origin, "must be positive")
    bad = data.bad_data
    _check(0.0 <= bad.skip_budget < 1.0, f"{prefix}.bad_data.skip_budget", origin, "must be in [0, 1)")
    _check(bad.max_pixels > 0, f"{prefix}.bad_data.max_pixels", origin, "must be positive")
    _check(bad.max_video_frames > 0, f"{prefix}.bad_data.max_video_frames", origin, "must be positive")
    _check(
        not data.text_embeddings or model.text_encoder == "precomputed",
        f"{prefix}.text_embeddings",
        origin,
        "needs model.text_encoder=precomputed",
    )
    try:
        spec = packing_spec(model)
    except ValueError:  # a model that cannot be built is named by _validate_model_inputs
        return
    for key, reason in keyframe_problems(data.keyframes, spec.layout, spec.patch_size[0],
                                         spec.keyframe_condition is not None):  # fmt: skip
        _check(False, f"{prefix}.keyframes.{key}", origin, reason)

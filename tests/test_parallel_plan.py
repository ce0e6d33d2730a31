"""tools/plan.py's figures against a real 2-rank step: the collectives it makes, what autograd keeps.

One pair of gloo ranks runs every family's layouts in turn (the process groups are rebuilt between
layouts: spawning and importing two ranks costs ~10 s, a tiny model's step ~1 s). For each layout
and model variant, the collectives counted in one forward + backward pass must be the plan's, call
for call and size for size, and the activations one bf16 forward pass keeps on each rank must be
the estimate's, block by block and outside the blocks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shlex
from collections import Counter
from typing import Any

import pytest
import torch
from conftest import REPO
from distributed import run_ranks
from omegaconf import OmegaConf
from test_parallel_memory import (
    dit_case,
    expected_by_scope,
    hunyuan_15_case,
    hunyuan_case,
    lora_case,
    measured_activations,
    wan_case,
    wan_experts_case,
)

from imontage.cost import (
    Layout,
    MicroBatch,
    ModelShape,
    activations,
    calls_by_op,
    communication_families,
    communication_plan,
    count_collectives,
    family_cost,
    lora_block_linears,
    lora_blocks,
    model_shape,
)
from imontage.models.registry import FAMILIES as FAMILIES_REGISTERED
from imontage.models.registry import family as registered_family
from imontage.parallel.parallelize import parallelize_model

LAYOUTS = {
    "tp2": Layout(tensor=2),
    "tp2_sp": Layout(tensor=2, sequence_parallel=True),
    "tp2_sp_recompute": Layout(tensor=2, sequence_parallel=True, activation_checkpointing=True),
    "ulysses2": Layout(context=2),
}
# family: (layouts, variants): each layout's collectives and activations against the plan's
FAMILIES = {
    "dit": (["tp2", "tp2_sp", "tp2_sp_recompute", "ulysses2"], ["montage"]),
    "wan": (["tp2", "tp2_sp", "ulysses2"], ["t2v", "i2v"]),
    # Wan 2.2 A14B's two experts in one model: a step runs, exchanges and keeps one expert's
    "wan_experts": (["tp2", "tp2_sp", "ulysses2"], ["t2v"]),
    "hunyuan_video": (["tp2", "tp2_sp", "ulysses2"], ["t2v"]),
    "hunyuan_video_15": (["tp2", "tp2_sp", "ulysses2"], ["i2v"]),
    # a frozen base, adapters on every attention and FFN linear
    "wan_lora": (["ulysses2"], ["t2v"]),
    "hunyuan_video_15_lora": (["ulysses2"], ["i2v"]),
}


def case(family: str, variant: str) -> tuple[Any, Any, Any, MicroBatch]:
    cases = {
        "dit": dit_case,
        "wan": lambda: wan_case(variant),
        "wan_experts": wan_experts_case,
        "hunyuan_video": hunyuan_case,
        "hunyuan_video_15": hunyuan_15_case,
        "wan_lora": lambda: lora_case(f"wan_{variant}"),
        "hunyuan_video_15_lora": lambda: lora_case("hunyuan_video_15"),
    }
    return cases[family]()


def counted_steps(rank: int, world_size: int) -> dict[str, dict]:
    """Every family's layouts in turn: per layout and variant, the collectives of one step (calls
    per size, by operation) and the bytes a bf16 forward pass keeps, by scope."""
    from megatron.core import parallel_state

    from imontage.parallel.state import ParallelLayout, init_process_groups, launch_env

    results: dict[str, dict] = {}
    for family, (layouts, variants) in FAMILIES.items():
        for name in layouts:
            layout = LAYOUTS[name]
            init_process_groups(
                ParallelLayout(layout.tensor, layout.context, 1), torch.device("cpu"), launch_env()
            )
            for variant in variants:
                _, model, batch, _ = case(family, variant)
                sizes = (layout.tensor, layout.context, layout.sequence_parallel)
                model = parallelize_model(model, *sizes, layout.activation_checkpointing)
                with count_collectives() as count:
                    out = model(batch)
                    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
                    (out * weights).sum().backward()
                result: dict[str, Any] = {"sizes": {op: dict(calls) for op, calls in count.sizes.items()}}
                if not layout.activation_checkpointing:  # the checkpoint's own hooks hide the blocks' tensors
                    _, model, batch, _ = case(family, variant)
                    model = parallelize_model(model.to(torch.bfloat16), *sizes)
                    result["activations"] = measured_activations(model, batch)
                results[f"{family} {name} {variant}"] = result
            parallel_state.destroy_model_parallel()
    return results


def test_plan_matches_what_a_real_step_exchanges_and_keeps() -> None:
    ranks = run_ranks(counted_steps, 2, timeout=360.0)  # one spawn for every layout: room under load
    failures = []
    for family, (layouts, variants) in FAMILIES.items():
        for name in layouts:
            layout = LAYOUTS[name]
            for variant in variants:
                cfg, _, _, rows = case(family, variant)
                shape, key = model_shape(cfg), f"{family} {name} {variant}"
                planned = None
                if shape.family in communication_families():
                    planned = calls_by_op(communication_plan(shape, rows, layout))
                    assert planned, f"{key}: a parallel layout exchanges something"
                kept = activations(shape, rows, layout, element_bytes=2)
                for rank, results in enumerate(ranks):
                    counted = {op: Counter(calls) for op, calls in results[key]["sizes"].items()}
                    if planned is not None and counted != planned:
                        failures.append(f"{key}, rank {rank}: counted {counted}, planned {planned}")
                    measured = results[key].get("activations")
                    if measured is None:
                        continue
                    expected = expected_by_scope(kept, [scope for scope in measured if scope != "outside"])
                    if measured != expected:
                        failures.append(f"{key}, rank {rank}: kept {measured}, estimated {expected}")
    assert not failures, "\n".join(failures)


def test_plan_pads_the_sequence_to_whole_shards() -> None:
    shape = ModelShape(hidden_size=32, num_heads=4, depth=1, patch_features=48, family="dit")
    (gather,) = [
        c for c in communication_plan(shape, MicroBatch(9), Layout(context=2)) if c.where == "outputs"
    ]
    assert gather.numel == 10 * 48  # 9 tokens padded to 10 for two shards
    assert communication_plan(shape, MicroBatch(9), Layout()) == []  # one rank: nothing to exchange


def plan_cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """tools/plan.py's output for ``args``, run in this process (a new interpreter costs seconds)."""
    spec = importlib.util.spec_from_file_location("plan_tool", REPO / "tools" / "plan.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(list(args)) == 0
    return capsys.readouterr().out


def test_plan_cli_prints_collectives_and_memory_for_a_recipe_layout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = plan_cli(
        capsys, "--model", "wan_tiny", "--tokens", "64", "--parallel", "tp2_sp", "--gpus", "4", "--bf16"
    )
    assert "block.attn2.to_k" in out and "reduce_scatter" in out
    assert "4 GPUs = DP 2 × CP 1 × TP 2 + SP, ZeRO-3 over 2" in out
    assert "fp32 Adam moments" in out and "activations (peak)" in out


def test_plan_cli_overrides_and_compares_layouts(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--model", "wan_tiny", "--tokens", "64", "--parallel", "zero3_dp2", "--gpus", "4")
    out = plan_cli(capsys, *args, "parallel.context_parallel=2")
    assert "4 GPUs = DP 2 × CP 2 × TP 1" in out and "block.attn1.ulysses_qkv" in out
    table = plan_cli(capsys, *args, "--compare", "dp", "tp2-sp-ac", "cp2")
    assert [line.split()[0] for line in table.splitlines()[3:]] == ["dp", "tp2-sp-ac", "cp2"], table


def without_communication_plan(monkeypatch: pytest.MonkeyPatch, family: str) -> None:
    """The registry with ``family``'s record lacking its communication plan (every registered family
    has one now; a new family may come without)."""
    record = FAMILIES_REGISTERED[family]
    assert record.cost is not None
    cost = dataclasses.replace(record.cost, tensor_parallel=None)
    monkeypatch.setitem(FAMILIES_REGISTERED, family, dataclasses.replace(record, cost=cost))


def test_plan_cli_errors_name_the_family(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    hunyuan = ("--model", "hunyuan_video_tiny", "--tokens", "64")
    without_communication_plan(monkeypatch, "hunyuan_video")
    with pytest.raises(SystemExit, match="no communication plan for model family 'hunyuan_video'"):
        plan_cli(capsys, *hunyuan, "--parallel", "tp2")
    memory = plan_cli(capsys, *hunyuan, "--parallel", "zero3_dp2", "--gpus", "2", "--memory-only")
    assert "activations (peak)" in memory and "block." not in memory
    with pytest.raises(SystemExit, match="model.family 'flux' is not one the plan knows"):
        plan_cli(capsys, "--model", "dit_tiny", "--tokens", "64", "model.family=flux")


PRESETS = sorted(path.stem for path in (REPO / "configs" / "model").glob("*.yaml"))


def test_every_family_has_a_preset() -> None:
    from test_parallel_memory import preset

    assert {str(preset(name).family) for name in PRESETS} >= set(FAMILIES_REGISTERED)


@pytest.mark.parametrize("name", PRESETS)
def test_plan_cli_takes_every_preset(capsys: pytest.CaptureFixture[str], name: str) -> None:
    """Every shipped model preset, built on the meta device: full fine-tuning, and the modelled
    LoRA where its family models adapters; 'n/a' only where the family has no communication plan."""
    from test_parallel_memory import preset

    cfg = preset(name)
    # A model of several experts (Wan 2.2 A14B) is planned one expert at a time: model.expert names it.
    experts = registered_family(cfg).experts(cfg)
    expert = tuple(f"model.expert={e.name}" for e in experts[:1])
    args = ("--model", name, "--tokens", "4096", "--text-tokens", "64", "--gpus", "8", "--bf16", *expert)
    out = plan_cli(capsys, *args, "--compare", "dp-ac", "cp2-ac")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[3:]] == ["dp-ac", "cp2-ac"], out
    planned = str(cfg.family) in communication_families()
    assert ("n/a" in lines[-1]) != planned, out
    if family_cost(str(cfg.family)).lora is None:
        return
    shape = model_shape(cfg)
    targets = ",".join(f"{lora_blocks(shape)}.*.{leaf}" for leaf in lora_block_linears(shape))
    lora = plan_cli(
        capsys, *args, "model.lora.rank=16", f"model.lora.targets=[{targets}]", "--compare", "dp-ac"
    )
    assert "base frozen" in lora.splitlines()[0] and lora.splitlines()[-1].startswith("dp-ac"), lora


def doc_commands(heading: str) -> list[tuple[list[str], str]]:
    """The ``$ python tools/plan.py ...`` commands of docs/parallel.md's section ``heading``, each
    with the output printed under it (up to a blank line or the end of its block)."""
    text = (REPO / "docs" / "parallel.md").read_text()
    section = text.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    commands: list[tuple[list[str], str]] = []
    for block in section.split("```")[1::2]:
        for chunk in block.strip("\n").split("\n\n"):
            command, _, output = chunk.partition("\n")
            assert command.startswith("$ python tools/plan.py "), chunk
            commands.append((shlex.split(command.removeprefix("$ python tools/plan.py ")), output))
    return commands


# docs/parallel.md's sections whose every command is checked: (commands, models they build)
DOC_SECTIONS = {
    "`wan2.2_i2v_a14b`: both experts in one run": (6, 2),  # full fine-tuning and LoRA
    "`hunyuan_video_1.5_i2v`": (7, 2),
    "`hunyuan_video_i2v_13b`": (4, 1),
}


@pytest.mark.parametrize("heading", list(DOC_SECTIONS))
def test_doc_layouts_are_the_tools(capsys: pytest.CaptureFixture[str], heading: str) -> None:
    """docs/parallel.md's figures in the sections of DOC_SECTIONS are what tools/plan.py prints
    for their commands, line for line (each model built once on meta)."""
    commands = doc_commands(heading)
    assert len(commands) == DOC_SECTIONS[heading][0]
    spec = importlib.util.spec_from_file_location("plan_tool", REPO / "tools" / "plan.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    built: dict[str, Any] = {}
    build = tool.build_model
    tool.build_model = lambda cfg, device: (
        built.get(key := OmegaConf.to_yaml(cfg)) or built.setdefault(key, build(cfg, device=device))
    )
    for args, output in commands:
        assert tool.main(args) == 0
        assert capsys.readouterr().out.rstrip("\n") == output, " ".join(args)
    assert len(built) == DOC_SECTIONS[heading][1]

"""LoRA through the trainer on the local engine: a frozen base, adapters-only checkpoints, exact resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import assert_same_run, final_tensors, run

from imontage.checkpoint import store as ckpt
from imontage.config import load_recipe
from imontage.models import build_model
from imontage.models.lora import is_adapter

LORA = ["model.lora.rank=2", "model.lora.alpha=4", "model.lora.targets=[blocks.*.qkv,blocks.*.fc2]",
        "model.lora.trainable=[final.*]"]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    from imontage.dataprep.synthetic import write_shards

    out = tmp_path_factory.mktemp("synthetic")
    write_shards(out, samples=12, per_shard=6, seed=0, progress=False)
    return str(out / "train-*.tar")


def test_a_lora_run_checkpoints_adapters_only_and_resumes_bit_for_bit(tmp_path: Path, shards: str) -> None:
    straight = run(tmp_path / "straight", shards, "stages.sft.steps=6", *LORA)
    resumed = tmp_path / "resumed"
    run(resumed, shards, "stages.sft.steps=6", "train.stop_at_step=3", *LORA)
    run(resumed, shards, "stages.sft.steps=6", *LORA)
    assert_same_run(straight, resumed)  # losses, weights, EMA and AdamW state, exactly

    tensors = final_tensors(straight)
    recipe = Path(__file__).resolve().parents[1] / "configs/recipes/quickstart.yaml"
    from test_trainer import TINY

    model = build_model(load_recipe(recipe, [*TINY, *LORA]).model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(tensors["model"]) == trainable and any(map(is_adapter, trainable))
    assert all(name.startswith("final.") for name in trainable if not is_adapter(name))
    assert set(tensors["ema"]) == trainable
    moments = [name for name in tensors["optimizer"] if name.endswith("exp_avg")]
    assert len(moments) == len(trainable)  # AdamW state for the trainable parameters only
    saved = sum(t.numel() * t.element_size() for t in tensors["model"].values())
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    assert saved < whole / 5, (saved, whole)


def checkpoint_bytes(run_dir: Path) -> dict[str, int]:
    path = ckpt.find_resume_checkpoint(run_dir / "checkpoints")
    assert path is not None
    return {file.name: file.stat().st_size for file in sorted(path.iterdir())}


def test_a_frozen_base_reads_no_checkpoint_without_its_adapters(tmp_path: Path, shards: str, capsys) -> None:
    """A full run's checkpoint does not resume as a LoRA run: the tensors do not match (named).
    Beside it, what each checkpoint weighs (printed): the LoRA one is its trainable tensors'
    weights, AdamW moments and EMA, plus the same RNG and state files."""
    full, lora = tmp_path / "full", tmp_path / "lora"
    run(full, shards, "stages.sft.steps=2")
    run(lora, shards, "stages.sft.steps=2", *LORA)
    sizes = {"full": checkpoint_bytes(full), "lora": checkpoint_bytes(lora)}
    with capsys.disabled():
        for kind, files in sizes.items():
            print(
                f"\n{kind} run checkpoint: {sum(files.values())} B "
                + ", ".join(f"{k} {v}" for k, v in files.items())
            )
    trained = final_tensors(lora)
    weights = sum(t.numel() * t.element_size() for t in trained["model"].values())
    moments = sum(t.numel() * t.element_size() for n, t in trained["optimizer"].items() if "exp_avg" in n)
    assert moments == 2 * weights  # AdamW's two moments of the trainable tensors, nothing else
    assert sizes["lora"]["model.safetensors"] < sizes["full"]["model.safetensors"] / 5
    assert sizes["lora"]["rng.safetensors"] == sizes["full"]["rng.safetensors"]
    with pytest.raises(
        ckpt.CheckpointError, match="model.safetensors: tensor '.*' does not match this model's trainable"
    ):
        run(full, shards, "stages.sft.steps=3", *LORA)


# ------------------------------------------------------- ZeRO-3 from a diffusers folder, with LoRA
WAN_LORA = [
    "model.lora.rank=2",
    "model.lora.targets=[blocks.*.attn1.to_q,blocks.*.attn1.to_v,blocks.*.ffn.net.2]",
]


def zero3_lora_losses(
    rank: int, world_size: int, overrides: list[str], folder: str, check_start: bool
) -> list[float]:
    """Train under ZeRO-3 (optionally checking first that the frozen base is the folder's and every
    B is zero); rank 0 returns the run's losses and its final adapters (bf16, gathered)."""
    import deepspeed
    from test_diffusers_io import stored_tensors

    from imontage.train.logger import read_metrics
    from imontage.train.trainer import Trainer

    trainer = Trainer(load_recipe(RECIPE, overrides))
    if check_start:
        trainer.maybe_resume()
        trainer.start_stage(trainer.stages[0])
        expected = stored_tensors(Path(folder))
        module = trainer.backend.engine.module
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                if is_adapter(name):
                    assert param.requires_grad and ("lora_A" in name or not param.any()), name
                else:  # the frozen base, written into its bf16 partitions (no fp32 master)
                    assert not param.requires_grad and param.dtype == torch.bfloat16, name
                    assert torch.equal(param.detach(), expected[name].to(torch.bfloat16)), (
                        f"rank {rank}: {name}"
                    )
        trainer.loader.close()
    trainer.fit()
    adapters = {}
    for name, param in trainer.backend.engine.module.named_parameters():
        if is_adapter(name):
            with deepspeed.zero.GatheredParameters([param]):  # a collective: on every rank
                adapters[name] = param.detach().clone()
    return (
        {"losses": [r["loss"] for r in read_metrics(trainer.run_dir)], "adapters": adapters}
        if rank == 0
        else {}
    )


RECIPE = Path(__file__).resolve().parents[1] / "configs/recipes/quickstart.yaml"


def test_zero3_lora_from_a_diffusers_folder_resumes_bit_for_bit(tmp_path: Path) -> None:
    """zero3_dp2, bf16, adapters on the tiny Wan: the run starts from the folder, its checkpoints
    leave the base out (DeepSpeed's module file and ZeRO shards hold the adapters alone), and a
    run resumed from its step-2 checkpoint (the base read from the folder again) continues it
    exactly."""
    from distributed import run_ranks
    from latent_shards import TEXT_DIM, write_latent_shards
    from test_diffusers_io import folder_training_overrides, wan_tiny_folder

    folder = wan_tiny_folder(tmp_path / "transformer", text_dim=TEXT_DIM)[0]
    shards = write_latent_shards(tmp_path / "latents")

    def overrides(run_dir: Path, *extra: str) -> list[str]:
        base = folder_training_overrides(folder, shards, run_dir, "zero3_dp2")
        return [*base, "stages=[{name: sft, objective: flow_matching, steps: 4}]", "train.precision=bf16",
                "train.checkpoint.every=2", *WAN_LORA, *extra]  # fmt: skip

    straight = run_ranks(
        zero3_lora_losses, 2, overrides(tmp_path / "straight"), str(folder), True, timeout=300
    )[0]
    checkpoint = tmp_path / "straight/checkpoints/step_000002"
    module_files = list(checkpoint.glob("*model_states.pt"))
    assert module_files and all(f.stat().st_size < 64 * 2**10 for f in module_files)  # no base inside
    resumed = tmp_path / "resumed"  # a run that stopped after step 2: its checkpoint, nothing later
    shutil.copytree(checkpoint, resumed / "checkpoints/step_000002")
    tail = run_ranks(zero3_lora_losses, 2, overrides(resumed), str(folder), False, timeout=300)[0]
    losses = straight["losses"]
    assert len(losses) == 4 and tail["losses"] == losses[2:]  # steps 3 and 4, resumed

    # The ZeRO-3 checkpoint's adapters (fp32 masters, read back partition by partition) leave as a
    # diffusers LoRA file: those of the module, B scaled by alpha / rank = 1.
    from imontage.checkpoint.lora import PREFIX, export_lora

    exported = load_file(
        export_lora(resumed / "checkpoints/step_000004", tmp_path / "lora.safetensors", "live")
    )
    assert set(exported) == {f"{PREFIX}.{name}" for name in tail["adapters"]}
    for name, tensor in tail["adapters"].items():
        assert torch.equal(exported[f"{PREFIX}.{name}"].to(tensor.dtype), tensor), name

    # imontage-sample reads the ZeRO-3 checkpoint on its frozen base: the folder's tensors (what the
    # run's bf16 partitions held) and the adapters' fp32 masters, which the module's bf16 copies round.
    from test_diffusers_io import stored_tensors

    from imontage.sample.cli import load_model_config

    model, _ = load_model_config(resumed / "checkpoints/step_000004", False, torch.device("cpu"))
    weights = model.state_dict()
    for name, tensor in stored_tensors(folder).items():
        assert torch.equal(weights[name], tensor.float()), name
    for name, tensor in tail["adapters"].items():
        assert torch.equal(weights[name].to(tensor.dtype), tensor), name

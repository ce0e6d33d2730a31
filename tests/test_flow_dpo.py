"""Flow DPO: the loss and its gradients, preference pairs from the loader, and the SFT -> DPO recipe.

The recipe tests run configs/recipes/dreamontage.yaml at a tiny size on 2 gloo ranks under
ZeRO-3 (parallel=zero3_dp2): the DPO stage starts from the SFT stage's final weights, its
reference is a frozen ZeRO-3-sharded copy of them, its reward margin and preference accuracy
rise, and a run resumed from a checkpoint inside the DPO stage has the losses of the uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, tiny_model_config
from distributed import run_ranks

from imontage.checkpoint import store as ckpt
from imontage.config import load_recipe
from imontage.config.loader import RecipeError, stage_section
from imontage.data import build_loader
from imontage.models import packing_spec
from imontage.models.common import Sample, Segment, pack_samples
from imontage.models.dit.model import build_dit
from imontage.objectives.flow_dpo import FlowDPO, PairError, check_pairs, dpo_loss, noise_pairs, sample_errors
from imontage.objectives.flow_matching import masked_mse
from imontage.train.logger import read_metrics

RECIPE = REPO / "configs/recipes/dreamontage.yaml"
SFT_STEPS, DPO_STEPS = 4, 24  # global steps: SFT 1-4, DPO 5-28
SAVE_EVERY, RESUMED_UNTIL = 6, 12  # the resume test resumes from step_000006 (inside DPO) to step 12


# ------------------------------------------------------------------------------------ the loss


def test_dpo_loss_equals_a_hand_computed_value() -> None:
    # beta = 10, two pairs (float64 so the comparison is tight):
    #   pair 0: (0.2 - 0.3) - (0.5 - 0.4) = -0.2 -> margin = -10/2 * -0.2 = +1 -> -log sigmoid(1) = log(1 + e^-1)
    #   pair 1: (0.6 - 0.5) - (0.3 - 0.4) = +0.2 -> margin = -1 -> -log sigmoid(-1) = log(1 + e)
    policy_win, policy_lose = (
        torch.tensor([0.2, 0.6], dtype=torch.float64),
        torch.tensor([0.5, 0.3], dtype=torch.float64),
    )
    reference_win, reference_lose = (
        torch.tensor([0.3, 0.5], dtype=torch.float64),
        torch.tensor([0.4, 0.4], dtype=torch.float64),
    )
    loss, margin = dpo_loss(policy_win, policy_lose, reference_win, reference_lose, beta=10.0)
    torch.testing.assert_close(margin, torch.tensor([1.0, -1.0], dtype=torch.float64))
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2  # 0.8132616875...
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def pair_samples(same_targets: bool = False) -> list[Sample]:
    """Two preference pairs [win, lose, win, lose]: each pair shares its text and condition image."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for text in ("recolour the red circle blue", "move the green square left"):
        condition = torch.randn(3, 1, 8, 8, generator=g)
        win = torch.randn(3, 1, 8, 8, generator=g)
        lose = win.clone() if same_targets else torch.randn(3, 1, 8, 8, generator=g)
        for target in (win, lose):
            samples.append(
                Sample(
                    [
                        Segment("text", text=text),
                        Segment("image", "condition", condition),
                        Segment("image", "target", target),
                    ],
                    task="edit_pair",
                )  # fmt: skip
            )
    return samples


def pairs_batch(same_targets: bool = False):
    return pack_samples(pair_samples(same_targets), packing_spec(tiny_model_config()))


def tiny_dit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_dit(tiny_model_config())


def twin(generator: torch.Generator) -> torch.Generator:
    """A generator that will draw what ``generator`` draws next."""
    copy_ = torch.Generator()
    copy_.set_state(generator.get_state())
    return copy_


def winner_loser_errors(model: torch.nn.Module, batch, velocity: torch.Tensor) -> torch.Tensor:
    """``[samples]`` flow-matching error of each sample, from masked_mse over that sample's target rows."""
    prediction = model(batch)
    sample = batch.sample_index()
    return torch.stack(
        [
            masked_mse(prediction, velocity, batch.target_mask & (sample == i))
            for i in range(batch.num_samples)
        ]
    )


def test_sample_errors_average_each_samples_target_values_only() -> None:
    batch = pairs_batch()
    target = torch.randn(batch.tokens.shape)
    offsets = torch.tensor([0.5, 1.0, 2.0, 3.0])[batch.sample_index()][:, None]  # [N, 1]
    prediction = torch.where(batch.target_mask[:, None], target + offsets, target + 100.0)
    torch.testing.assert_close(sample_errors(prediction, target, batch), torch.tensor([0.25, 1.0, 4.0, 9.0]))


def test_each_pair_shares_one_t_and_one_noise() -> None:
    batch = pairs_batch()
    noised, velocity = noise_pairs(batch, 0.0, 1.0, 1.0, torch.Generator().manual_seed(1))
    noise = velocity + batch.tokens  # [N, P]: velocity = noise - x0
    bounds = batch.cu_seqlens.tolist()
    rows = [slice(bounds[i], bounds[i + 1]) for i in range(batch.num_samples)]
    t = [noised.timesteps[r][batch.target_mask[r]].unique() for r in rows]
    for win, lose in ((0, 1), (2, 3)):
        torch.testing.assert_close(noise[rows[win]], noise[rows[lose]], rtol=0, atol=1e-6)  # up to rounding
        assert t[win].numel() == 1 and torch.equal(t[win], t[lose])
    assert not torch.equal(t[0], t[2])  # pairs draw their own t


def test_flow_dpo_combines_policy_and_reference_errors_by_the_formula() -> None:
    batch, beta = pairs_batch(), 50.0
    policy, reference = tiny_dit(0), tiny_dit(1)  # two different nets: every error term counts
    objective = FlowDPO(beta)
    objective.reference = reference
    generator = torch.Generator().manual_seed(3)
    noised, velocity = noise_pairs(batch, 0.0, 1.0, 1.0, twin(generator))
    output = objective(policy, batch, generator)
    with torch.no_grad():
        e, e_ref = (
            winner_loser_errors(policy, noised, velocity),
            winner_loser_errors(reference, noised, velocity),
        )
    margin = -beta / 2 * ((e[0::2] - e_ref[0::2]) - (e[1::2] - e_ref[1::2]))  # [pairs]
    torch.testing.assert_close(output.loss.detach(), -torch.nn.functional.logsigmoid(margin).mean())
    assert output.scalars["dpo/reward_margin"] == pytest.approx(margin.mean().item(), rel=1e-5)
    assert output.scalars["dpo/accuracy"] == (margin > 0).float().mean().item()
    assert output.num_target_tokens == int(batch.target_mask.sum())


def test_with_policy_equal_to_reference_the_loss_is_log2_and_only_the_policy_gets_a_gradient() -> None:
    """At policy = reference every margin is 0: loss = log 2 and d loss / d margin = -1/2 per pair.

    The chain rule then gives d loss / d theta = beta/4 * mean over pairs of (grad e_w - grad e_l):
    the gradient vanishes for the reference (it gets none) and for a pair whose winner equals its
    loser, not for the policy on real pairs.
    """
    batch, beta = pairs_batch(), 50.0
    policy = tiny_dit(0)
    reference = copy.deepcopy(policy)  # trainable on purpose: the objective alone must keep it out
    objective = FlowDPO(beta)
    objective.reference = reference
    generator = torch.Generator().manual_seed(5)
    noised, velocity = noise_pairs(batch, 0.0, 1.0, 1.0, twin(generator))
    output = objective(policy, batch, generator)
    assert output.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert output.scalars["dpo/reward_margin"] == 0.0 and output.scalars["dpo/accuracy"] == 0.0
    output.loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    dpo_grads = [p.grad.clone() for p in policy.parameters()]

    policy.zero_grad(set_to_none=True)
    e = winner_loser_errors(policy, noised, velocity)  # [win, lose, win, lose]
    (beta / 4 * (e[0::2] - e[1::2]).mean()).backward()
    expected = [p.grad for p in policy.parameters()]
    for got, want in zip(dpo_grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert sum(g.abs().sum() for g in dpo_grads) > 0  # the policy does learn from its first step

    same = pairs_batch(same_targets=True)  # winner = loser: nothing to prefer, no gradient at all
    policy.zero_grad(set_to_none=True)
    objective(policy, same, torch.Generator().manual_seed(5)).loss.backward()
    for p in policy.parameters():
        torch.testing.assert_close(p.grad, torch.zeros_like(p.grad), rtol=0, atol=1e-6)


def test_batches_that_are_not_preference_pairs_are_refused() -> None:
    objective = FlowDPO(10.0)
    objective.reference = tiny_dit(1)
    spec = packing_spec(tiny_model_config())
    samples = pair_samples()
    with pytest.raises(PairError, match="got a batch of 3 samples"):
        objective(tiny_dit(0), pack_samples(samples[:3], spec), torch.Generator())
    other_text = [samples[0], samples[2]]  # winners of two pairs: their texts differ in length
    with pytest.raises(PairError, match=r"pair 0 .* do not have the same segments and shapes"):
        check_pairs(pack_samples(other_text, spec))
    text, condition, target = samples[1].segments
    other_condition = Sample([text, Segment("image", "condition", condition.data + 1), target])
    with pytest.raises(PairError, match=r"pair 0 .* do not share their conditions"):
        check_pairs(pack_samples([samples[0], other_condition], spec))
    with pytest.raises(RuntimeError, match="no reference model"):
        FlowDPO(10.0)(tiny_dit(0), pack_samples(samples, spec), torch.Generator())


# ------------------------------------------------------------------------------ data and recipe


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Edit samples for SFT and preference pairs (a right edit over a wrong one) for DPO."""
    root = tmp_path_factory.mktemp("dpo_data")
    for name, task, count in (("edit", "edit", 16), ("pairs", "edit_pair", 8)):
        subprocess.run([sys.executable, "tools/make_synthetic.py", "--out", str(root / name), "--tasks", task,
                        "--samples", str(count), "--no-progress"], cwd=REPO, check=True)  # fmt: skip
    return {name: f"{root / name}/train-*.tar" for name in ("edit", "pairs")}


TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.depth=2", "model.mlp_hidden_size=64", "model.text_dim=16",
    "model.rope.bands=[0,3,3,2]", "model.prediction=velocity", "flow_matching.t_std=0.5",
    "data.max_tokens=0", "data.batch_size=8", "data.pack_buffer=8", "data.shuffle_buffer=8",
    "train.progress=false", "train.ema_decay=0", "train.sample.every=0", "train.checkpoint.every=0",
]  # fmt: skip


def recipe_overrides(run_dir: Path, shards: dict[str, str], *extra: str) -> list[str]:
    return [
        *TINY, f"run_dir={run_dir}", f"data.shards={shards['edit']}", f"stages.dpo.data.shards={shards['pairs']}",
        f"stages.sft.steps={SFT_STEPS}", f"stages.dpo.steps={DPO_STEPS}", "stages.dpo.optim.warmup_steps=0",
        "stages.dpo.optim.lr=1.0e-2", "dpo.beta=2000", *extra,
    ]  # fmt: skip


def test_loader_packs_each_pair_winner_then_loser_into_one_batch(
    shards: dict[str, str], tmp_path: Path
) -> None:
    cfg = load_recipe(RECIPE, recipe_overrides(tmp_path, shards, "data.max_tokens=900", "data.batch_size=5"))
    loader = build_loader(stage_section(cfg, 1, "data"), packing_spec(cfg.model))
    sizes = []
    for _ in range(8):  # two epochs of 8 pairs
        batch = next(loader)
        check_pairs(batch)  # [win, lose, ...], each pair sharing text, condition and positions
        bounds = batch.cu_seqlens.tolist()
        for pair in range(batch.num_samples // 2):
            rows = [slice(bounds[i], bounds[i + 1]) for i in (2 * pair, 2 * pair + 1)]
            win, lose = (batch.tokens[r][batch.target_mask[r]] for r in rows)
            assert not torch.equal(win, lose)  # a wrong edit is another image
        sizes.append(batch.num_samples)
    assert max(sizes) <= 4  # batch_size=5 holds two whole pairs, never a pair and a half


def test_dpo_stage_settings_are_checked(shards: dict[str, str], tmp_path: Path) -> None:
    base = recipe_overrides(tmp_path, shards)
    with pytest.raises(RecipeError, match=r"key 'dpo.beta': must be positive"):
        load_recipe(RECIPE, [*base, "dpo.beta=0"])
    with pytest.raises(
        RecipeError, match=r"key 'stages\[0\].objective': flow_dpo fine-tunes a trained policy"
    ):
        load_recipe(RECIPE, [*base, "stages.sft.objective=flow_dpo"])
    # DPO covers steps 5-28 from step_000004; every=5 saves at 5, 10, 15, 20, 25 inside it, then at 28.
    with pytest.raises(RecipeError, match=r"keep_last': 6 would prune step_000004.*saves 5.*at least 7"):
        load_recipe(RECIPE, [*base, "train.checkpoint.every=5", "train.checkpoint.keep_last=6"])
    load_recipe(RECIPE, [*base, "train.checkpoint.every=5", "train.checkpoint.keep_last=7"])


def gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered from its ZeRO-3 partitions: a collective, on every rank)."""
    import deepspeed

    weights = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            weights[name] = param.detach().clone()
    return weights


def train_recording(rank: int, world_size: int, overrides: list[str]) -> dict[str, Any]:
    """Train the recipe; rank 0 returns the metrics and the weights at the SFT end and at the DPO start."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    from imontage.train.trainer import Trainer

    record: dict[str, Any] = {}

    class RecordingTrainer(Trainer):
        def save_checkpoint(self) -> Path:
            path = super().save_checkpoint()
            if self.step == SFT_STEPS:
                record["sft_final"] = gathered(self.backend.engine.module)
            return path

        def start_stage(self, stage: Any) -> None:
            super().start_stage(stage)
            if not isinstance(stage.objective, FlowDPO):
                return
            reference = stage.objective.reference
            params = list(reference.module.parameters())
            record["reference_layout"] = {
                "zero_offload_only": isinstance(reference.optimizer, DeepSpeedZeRoOffload),
                "trainable": sum(p.requires_grad for p in params),
                "local_numel": sum(p.ds_tensor.numel() for p in params),
                "numel": sum(p.ds_numel for p in params),
            }
            record["policy_at_dpo_start"] = gathered(self.backend.engine.module)
            record["reference"] = gathered(reference.module)

    trainer = RecordingTrainer(load_recipe(RECIPE, overrides))
    trainer.fit()
    return {**record, "metrics": read_metrics(trainer.run_dir)} if rank == 0 else {}


@pytest.fixture(scope="module")
def straight_run(shards: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("dpo_straight")
    extra = ("parallel=zero3_dp2", "parallel.device=cpu", f"train.checkpoint.every={SAVE_EVERY}")
    return {
        **run_ranks(train_recording, 2, recipe_overrides(run_dir, shards, *extra), timeout=300)[0],
        "run_dir": run_dir,
    }


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sft_then_dpo_on_two_zero3_ranks(straight_run: dict[str, Any]) -> None:
    metrics = straight_run["metrics"]
    assert [r["step"] for r in metrics] == list(range(1, SFT_STEPS + DPO_STEPS + 1))
    # The DPO stage starts from the SFT stage's final weights, and its reference is a copy of them.
    assert_same_weights(straight_run["policy_at_dpo_start"], straight_run["sft_final"])
    assert_same_weights(straight_run["reference"], straight_run["sft_final"])
    layout = straight_run["reference_layout"]
    assert layout["zero_offload_only"] and layout["trainable"] == 0  # no optimiser, no gradients
    assert (
        layout["local_numel"] < 0.6 * layout["numel"]
    )  # sharded over the 2 ranks (small vectors stay whole)
    dpo = [r for r in metrics if "dpo/reward_margin" in r]
    assert [r["step"] for r in dpo] == list(range(SFT_STEPS + 1, SFT_STEPS + DPO_STEPS + 1))
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the first step
    # The first step's margins are all 0 (policy = reference), so its accuracy is 0: the first window
    # leaves it out. Each step sees all 8 pairs (4 per rank), each with its own t and noise.
    k = 8
    first = {
        key: statistics.mean(r[key] for r in dpo[1 : k + 1]) for key in ("dpo/reward_margin", "dpo/accuracy")
    }
    last = {key: statistics.mean(r[key] for r in dpo[-k:]) for key in ("dpo/reward_margin", "dpo/accuracy")}
    print(f"DPO steps 2-{k + 1} vs the last {k}: {first} -> {last}")
    assert last["dpo/reward_margin"] > first["dpo/reward_margin"] + 5.0
    assert last["dpo/accuracy"] > first["dpo/accuracy"] + 0.15
    assert last["dpo/accuracy"] >= 0.8


def test_resume_inside_the_dpo_stage_rebuilds_the_reference(
    straight_run: dict[str, Any], shards: dict[str, str], tmp_path: Path
) -> None:
    """Resumed from step 6 (inside DPO) of the straight run: the same losses bit for bit as it had."""
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (SFT_STEPS, SAVE_EVERY):  # the DPO stage's entry checkpoint and the one to resume from
        name = ckpt.checkpoint_name(step)
        shutil.copytree(straight_run["run_dir"] / "checkpoints" / name, checkpoints / name)
    overrides = recipe_overrides(
        tmp_path / "run", shards, "parallel=zero3_dp2", "parallel.device=cpu",
        f"train.resume={checkpoints / ckpt.checkpoint_name(SAVE_EVERY)}", f"train.stop_at_step={RESUMED_UNTIL}",
    )  # fmt: skip
    resumed = run_ranks(train_recording, 2, overrides, timeout=300)[0]
    assert "sft_final" not in resumed  # the resumed run starts inside DPO
    # The reference comes from step_000004 (the SFT end), not from step_000006 where the run resumed.
    assert_same_weights(resumed["reference"], straight_run["sft_final"])
    policy = resumed["policy_at_dpo_start"]  # the step-6 weights, after 2 DPO steps
    assert any(not torch.equal(policy[name], resumed["reference"][name]) for name in policy)
    assert [(r["step"], r["loss"], r["dpo/reward_margin"]) for r in resumed["metrics"]] == [
        (r["step"], r["loss"], r["dpo/reward_margin"])
        for r in straight_run["metrics"][SAVE_EVERY:RESUMED_UNTIL]
    ]


def test_one_process_resume_inside_dpo_needs_the_stages_entry_checkpoint(
    shards: dict[str, str], tmp_path: Path
) -> None:
    """engine local: resumed from step 3 (inside DPO), the same losses; without step_000002, a clear error."""
    from imontage.train.trainer import train

    def run(run_dir: Path, *extra: str) -> list[tuple[int, float]]:
        overrides = recipe_overrides(run_dir, shards, "stages.sft.steps=2", "stages.dpo.steps=4", *extra)
        return [(r["step"], r["loss"]) for r in read_metrics(train(load_recipe(RECIPE, overrides)))]

    straight = run(tmp_path / "straight", "train.checkpoint.every=3")
    for name in ("step_000002", "step_000003"):
        shutil.copytree(tmp_path / "straight/checkpoints" / name, tmp_path / "resumed/checkpoints" / name)
    assert run(tmp_path / "resumed", "train.resume=auto") == straight[3:]  # steps 4-6
    shutil.copytree(
        tmp_path / "straight/checkpoints/step_000003", tmp_path / "orphan/checkpoints/step_000003"
    )
    with pytest.raises(ckpt.CheckpointError, match=r"reference is the policy at step 2.*step_000002"):
        run(tmp_path / "orphan", "train.resume=auto")


LORA = ["model.lora.rank=2", "model.lora.targets=[blocks.*.qkv,blocks.*.proj,blocks.*.fc*]"]


def parameter_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct parameter storages the modules hold (shared ones counted once)."""
    storages = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in modules for p in m.parameters()
    }
    return sum(storages.values())


def dpo_stage_trainer(run_dir: Path, shards: dict[str, str], *extra: str) -> Any:
    """A trainer on the recipe's DPO stage (started from fresh weights): its reference is attached."""
    from imontage.train.trainer import Trainer

    trainer = Trainer(load_recipe(RECIPE, recipe_overrides(run_dir, shards, "stages.dpo.steps=2", *extra)))
    trainer.start_stage(trainer.stages[1])
    return trainer


def test_dpo_with_lora_references_the_base_without_a_copy(
    shards: dict[str, str], tmp_path: Path, capsys
) -> None:
    """The reference is the policy's base with its adapters off: no parameter of its own."""
    from imontage.models.lora import BaseWithoutAdapters, adapters_disabled

    lora = dpo_stage_trainer(tmp_path / "lora", shards, *LORA)
    policy, reference = lora.backend.model, lora.stages[1].objective.reference
    assert isinstance(reference, BaseWithoutAdapters) and not list(reference.parameters())
    full = dpo_stage_trainer(tmp_path / "full", shards)
    full_policy, full_reference = full.backend.model, full.stages[1].objective.reference
    lora_bytes, full_bytes = parameter_bytes(policy, reference), parameter_bytes(full_policy, full_reference)
    with capsys.disabled():
        print(f"\nDPO parameter memory, policy + reference: LoRA {lora_bytes} B, full model {full_bytes} B")
    assert lora_bytes == parameter_bytes(policy) and full_bytes == 2 * parameter_bytes(full_policy)

    batch = next(lora.loader)
    with torch.no_grad():
        for name, p in policy.named_parameters():  # adapters that act, so that "off" is visible
            if "lora_B" in name or name.startswith(("final.", "blocks.0.modulation")):  # (adaLN-zero)
                p.normal_()
        with adapters_disabled(policy):
            base = policy(batch)
        assert torch.equal(reference(batch), base)
        assert not torch.allclose(policy(batch), base)
    lora.fit()  # the DPO stage trains the adapters against the base
    metrics = read_metrics(lora.run_dir)
    assert metrics and all(math.isfinite(r["loss"]) for r in metrics)


def test_dpo_refuses_adapters_beside_trained_base_parameters(shards: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"flow_dpo with model.lora.trainable=\['final.\*'\]"):
        dpo_stage_trainer(tmp_path, shards, *LORA, "model.lora.trainable=[final.*]")

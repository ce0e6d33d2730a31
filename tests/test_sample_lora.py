"""``imontage-sample`` and ``imontage-imagic`` on LoRA runs, whose checkpoints hold their adapters
alone: both read the frozen base as the trainer reads it on resume.

- Wan and HunyuanVideo (tiny random diffusers folders, 3 local-engine steps from
  ``model.init_from_diffusers``): ``imontage-sample RUN_DIR`` samples what the merged
  ``export-diffusers`` weights sample with the same seed and inputs, to fp32 rounding (relative
  1e-5 of the largest value: merging computes ``W x + s·B(A x)`` as ``(W + s·BA) x``), and the base
  alone samples something else (the adapters act). ``--base`` reads a base that has moved.
- The own DiT (no diffusers class): the base is the run's seeded initialisation, its seed from
  ``RUN_DIR/config.yaml``; the model read is the trainer's final model, bit for bit.
- ``imontage-imagic`` edits a LoRA run with its adapters folded into the base, every weight
  trainable: the merged export's weights exactly.
- A bad LoRA run ends with exit status 2 and one line naming the file or tensor.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file, save_file
from test_imagic_wan import LIGHT, keep_determinism_setting  # noqa: F401 (a fixture, used by name)
from test_lora_export import close

from imontage.checkpoint import store as ckpt
from imontage.checkpoint.diffusers import load_into
from imontage.config import load_recipe
from imontage.imagic.cli import load_editable_model
from imontage.imagic.cli import main as imagic_main
from imontage.models import build_model
from imontage.models.lora import adapted_modules, base_model_config
from imontage.sample import cli as sample_cli
from imontage.sample.sampler import sample_flow
from imontage.train.trainer import Trainer, train

RECIPE = REPO / "configs/recipes/quickstart.yaml"
CPU = torch.device("cpu")
SEED = 3
HUNYUAN_LORA = ["model.lora.rank=4", "model.lora.alpha=8", "optim.lr=1e-1", "optim.warmup_steps=0",
                "model.lora.targets=[transformer_blocks.*.attn.to_q,transformer_blocks.*.attn.add_v_proj,"
                "transformer_blocks.*.ff.net.2,single_transformer_blocks.*.proj_out]"]  # fmt: skip


@pytest.fixture(scope="module")
def hunyuan_lora_run(
    tmp_path_factory: pytest.TempPathFactory, pooled_text_shards: Path
) -> tuple[Path, Path, Any]:
    """(diffusers folder, final checkpoint, recipe) of a LoRA run on a tiny random guidance-distilled
    HunyuanVideo (the session's latent shards with pooled text): 3 steps of the local engine from its folder."""
    from test_diffusers_io import hunyuan_training_overrides

    from imontage.checkpoint.diffusers import build_diffusers_model

    root = tmp_path_factory.mktemp("hunyuan_lora")
    shards = str(pooled_text_shards / "latents/pixels-*.tar")
    folder = root / "transformer"
    overrides = hunyuan_training_overrides(folder, shards, root / "run", "single")  # the folder last
    reference = build_diffusers_model(load_recipe(RECIPE, overrides[:-1]).model)  # not written yet
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every weight random: diffusers zero-initialises some (proj_out), hiding the rest
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    reference.save_pretrained(folder)
    cfg = load_recipe(RECIPE, [*overrides, *HUNYUAN_LORA])
    return folder, train(cfg) / "checkpoints/step_000003", cfg


RUNS = {"wan": "wan_lora_run", "hunyuan_video": "hunyuan_lora_run"}


@pytest.fixture(params=sorted(RUNS))
def lora_run(request: pytest.FixtureRequest) -> tuple[Path, Path, Any]:
    return request.getfixturevalue(RUNS[request.param])


def sample_run(
    run_dir: Path, cfg: Any, out: Path, monkeypatch: pytest.MonkeyPatch, *extra: str
) -> tuple[tuple, dict, list]:
    """``imontage-sample RUN_DIR`` on one sample of the run's shards: (the arguments it gave
    sample_flow, its keyword arguments, what it returned)."""
    calls = []

    def recorded(*args: Any, **kwargs: Any) -> list:
        calls.append((args, kwargs, sample_flow(*args, **kwargs)))
        return calls[-1][2]

    monkeypatch.setattr(sample_cli, "sample_flow", recorded)
    argv = [str(run_dir), "--data", str(cfg.data.shards), "--num", "1", "--steps", "2", "--seed", str(SEED),
            "--no-ema", "--out", str(out), *extra]  # fmt: skip
    assert sample_cli.main(argv) == 0 and out.is_file()
    [call] = calls
    return call


def export_merged(checkpoint: Path, out: Path) -> Path:
    """tools/convert_checkpoint.py export-diffusers: the run's adapters merged into its base, fp32."""
    from tools.convert_checkpoint import main as tool

    argv = ["export-diffusers", str(checkpoint), "--out", str(out), "--weights", "live", "--dtype", "fp32"]
    assert tool(argv) == 0
    return out


def plain_model(cfg: Any, folder: Path) -> torch.nn.Module:
    """The run's model without adapters, with the weights of a diffusers ``folder``."""
    model = build_model(base_model_config(cfg.model)).eval()
    load_into(model, folder)
    return model


def generated(samples: list, rows: list) -> list[torch.Tensor]:
    """The target segments of sample_flow's ``rows`` (the conditions come back as given)."""
    return [x for sample, row in zip(samples, rows, strict=True)
            for segment, x in zip(sample.segments, row, strict=True) if segment.role == "target"]  # fmt: skip


def test_imontage_sample_samples_a_lora_run_as_its_merged_weights(
    lora_run: tuple[Path, Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, checkpoint, cfg = lora_run
    args, kwargs, outputs = sample_run(checkpoint.parent.parent, cfg, tmp_path / "grid.png", monkeypatch)
    model, samples, spec, steps, guidance, shift = args[:6]
    assert list(adapted_modules(model))  # sampled with its adapters on, as it trained

    def sample_with(weights: Path) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(SEED)
        rows = sample_flow(plain_model(cfg, weights), samples, spec, steps, guidance, shift, generator, CPU,
                           **kwargs)  # fmt: skip
        return generated(samples, rows)

    ours, merged = generated(samples, outputs), sample_with(export_merged(checkpoint, tmp_path / "merged"))
    assert len(ours) == len(merged) > 0
    for actual, expected in zip(ours, merged, strict=True):
        close(actual, expected)
    base = sample_with(folder)  # the adapters act: the base alone samples something else
    assert all((a - b).abs().max() > 1e-3 * b.abs().max() for a, b in zip(ours, base, strict=True))


def tampered(
    checkpoint: Path,
    run_dir: Path,
    model: Callable[[dict], None] | None = None,
    state: Callable[[dict], None] | None = None,
) -> Path:
    """A copy of ``checkpoint`` in a new run directory (its config.yaml beside), its
    model.safetensors or state.json changed by ``model`` / ``state`` and its manifest rewritten to
    match: a checkpoint that is complete and intact as a file, wrong as a run."""
    copy = run_dir / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    shutil.copy(checkpoint.parent.parent / "config.yaml", run_dir / "config.yaml")
    if model is not None:
        tensors = load_file(copy / "model.safetensors")
        model(tensors)
        save_file(tensors, copy / "model.safetensors")
    if state is not None:
        values = json.loads((copy / ckpt.STATE_FILE).read_text())
        state(values)
        (copy / ckpt.STATE_FILE).write_text(json.dumps(values))
    (copy / ckpt.MANIFEST).unlink()
    ckpt._write_manifest(copy, ckpt.checkpoint_step(copy))
    return copy


def moved_base(moved: Path) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        state["model_config"]["init_from_diffusers"] = str(moved)

    return change


def test_base_reads_the_frozen_base_from_where_it_is_now(
    wan_lora_run: tuple[Path, Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose model.init_from_diffusers is gone samples with --base as it did from its folder."""
    folder, checkpoint, cfg = wan_lora_run
    copy = tampered(checkpoint, tmp_path / "run", state=moved_base(tmp_path / "moved/transformer"))
    here = sample_run(checkpoint.parent.parent, cfg, tmp_path / "a.png", monkeypatch)[2]
    there = sample_run(copy, cfg, tmp_path / "b.png", monkeypatch, "--base", str(folder))[2]
    assert all(
        x is y or torch.equal(x, y)
        for a, b in zip(here, there, strict=True)
        for x, y in zip(a, b, strict=True)
    )


UNKNOWN = "blocks.9.attn1.to_q.lora_A.weight"  # the tiny Wan has blocks 0 and 1


def unknown_adapter(tensors: dict) -> None:
    tensors[UNKNOWN] = torch.zeros(4, 32)


@pytest.mark.parametrize("tool", ["imontage-sample", "imontage-imagic"])
@pytest.mark.parametrize("case", ["unknown_adapter", "missing_base"])
def test_a_bad_lora_run_ends_in_one_line_naming_the_file(
    wan_lora_run: tuple[Path, Path, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tool: str,
    case: str,
) -> None:
    _, checkpoint, cfg = wan_lora_run
    gone = tmp_path / "moved/transformer"
    if case == "unknown_adapter":
        copy = tampered(checkpoint, tmp_path / "run", model=unknown_adapter)
        expected = f"{copy / 'model.safetensors'}: tensor '{UNKNOWN}' names no trainable tensor (model.lora)"
    else:
        copy = tampered(checkpoint, tmp_path / "run", state=moved_base(gone))
        expected = f"{gone}: no such file"
    out = str(tmp_path / "grid.png")
    if tool == "imontage-sample":
        code = sample_cli.main([str(copy), "--data", str(cfg.data.shards), "--no-ema", "--out", out])
    else:  # the model is read first: the input files are never opened
        code = imagic_main([str(copy), "--latent", "z.npy", "--text-embedding", "e.npy", "--out", out,
                            "use_ema=false"])  # fmt: skip
    err = capsys.readouterr().err
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines()]  # a progress bar's line aside
    lines = [line for line in lines if line.strip() and not line.startswith("INFO ")]
    assert code == 2 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: {expected}"), err
    if case == "missing_base":
        assert "model.init_from_diffusers" in lines[0] and "--base" in lines[0]


def test_a_dit_lora_run_is_read_on_its_seeded_base(
    tmp_path: Path, synthetic_shards: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_lora_training import LORA
    from test_trainer import TINY

    overrides = [*TINY, *LORA, f"data.shards={synthetic_shards}", f"run_dir={tmp_path / 'run'}",
                 "stages.sft.steps=1", "seed=7"]  # fmt: skip
    trainer = Trainer(load_recipe(RECIPE, overrides))
    trainer.fit()
    checkpoint = sample_cli.resolve_checkpoint(trainer.run_dir)
    model, _ = sample_cli.load_model_config(checkpoint, use_ema=False, device=CPU)
    trained = trainer.backend.model.state_dict()  # type: ignore[attr-defined]
    assert model.state_dict().keys() == trained.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name  # the base of seed 7, the trained adapters
    argv = [str(trainer.run_dir), "--data", synthetic_shards, "--num", "1", "--steps", "2", "--out",
            str(tmp_path / "grid.png")]  # fmt: skip
    assert sample_cli.main(argv) == 0  # with the EMA of the adapters

    alone = tmp_path / "alone/checkpoints" / checkpoint.name  # without the run's config.yaml: no seed
    shutil.copytree(checkpoint, alone)
    capsys.readouterr()
    assert sample_cli.main([str(alone), *argv[1:]]) == 2
    assert f"{tmp_path / 'alone/config.yaml'}: no such file" in capsys.readouterr().err


@pytest.mark.usefixtures("keep_determinism_setting")
def test_imontage_imagic_edits_a_lora_run_with_its_adapters_folded_in(
    wan_lora_run: tuple[Path, Path, Any], tmp_path: Path
) -> None:
    from latent_shards import LATENT_CHANNELS, TEXT_DIM

    folder, checkpoint, cfg = wan_lora_run
    run_dir = checkpoint.parent.parent
    model, _, _ = load_editable_model(run_dir, use_ema=False, device=CPU)
    assert not list(adapted_modules(model)) and all(p.requires_grad for p in model.parameters())
    merged = plain_model(cfg, export_merged(checkpoint, tmp_path / "merged")).state_dict()
    ours = model.state_dict()
    assert ours.keys() == merged.keys()
    for name, tensor in merged.items():  # W + scale · B A, summed as export-diffusers sums it
        assert torch.equal(ours[name], tensor), name

    generator = torch.Generator().manual_seed(0)
    np.save(tmp_path / "z.npy", torch.randn(LATENT_CHANNELS, 1, 4, 6, generator=generator).numpy())
    np.save(tmp_path / "e.npy", torch.randn(5, TEXT_DIM, generator=generator).numpy())
    argv = [str(run_dir), "--latent", str(tmp_path / "z.npy"), "--text-embedding", str(tmp_path / "e.npy"),
            "--out", str(tmp_path / "edit.png"), "--config", str(REPO / "configs/recipes/imagic_wan2.1_1.3b.yaml"),
            "--no-progress", "use_ema=false", *LIGHT]  # fmt: skip
    assert imagic_main(argv) == 0 and (tmp_path / "edit.png").is_file()

"""Wan 2.2 as presets of the Wan family: T2V/I2V-A14B (two experts of one shape) and TI2V-5B.

The presets' parameter counts, against diffusers' class and the public sizes, and each preset's
forward, gradients, export and parallel layouts are in tests/test_family_conformance.py. Tiny random
pipeline folders (diffusers' classes from small configs, ``save_pretrained``) are imported and
exported in the pipeline layout: ``transformer/``, ``transformer_2/``, ``model_index.json``'s
``boundary_ratio`` and ``expand_timesteps``; TI2V's per-token timesteps are imontage's.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from distributed import run_ranks
from latent_shards import (
    LATENT_CHANNELS,
    TEXT_DIM,
    save_tiny_text_encoder,
    save_tiny_vae,
    write_latent_shards,
)
from omegaconf import OmegaConf
from safetensors.torch import load_file

from imontage.checkpoint.diffusers import ConversionError
from imontage.checkpoint.pipeline import PIPELINE_INDEX, export_pipeline, import_pipeline, read_pipeline
from imontage.config import RecipeError, load_recipe
from imontage.models import build_model, packing_spec
from imontage.models.common import Sample, Segment, pack_samples, unpatchify_segments
from imontage.models.common.sequence import WAN_MASK_CHANNELS
from imontage.models.wan.model import build_wan
from imontage.objectives.flow_matching import (
    clean_first_frame,
    first_frame_mask,
    noise_batch,
    sample_timesteps,
)


def preset_config(preset: str, *overrides: str) -> object:
    return load_recipe(
        REPO / "configs/recipes/quickstart.yaml", [f"model={preset}", "model.prediction=velocity", *overrides]
    ).model


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.wan.boundary_ratio=1.0", "wan.boundary_ratio"),
        ("model.in_channels=96", "wan.expand_timesteps"),  # no room for condition channels
    ],
)
def test_preset_values_are_checked(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        preset_config("wan2.2_ti2v_5b", override)


# ------------------------------------------------------------------------------ pipeline folders
def tiny_transformer(seed: int, in_channels: int) -> Any:
    """A random tiny ``WanTransformer3DModel`` (every weight drawn: default inits leave norms at one)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
        out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=48, num_layers=2,
        rope_max_seq_len=64,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def save_pipeline(folder: Path, i2v: bool = False, boundary_ratio: float | None = 0.875, **keys: Any) -> Path:
    """A Wan pipeline folder: tiny VAE, UMT5 and tokenizer, a flow-matching scheduler, and one
    transformer, or two with a boundary."""
    import diffusers
    import transformers

    vae = diffusers.AutoencoderKLWan.from_pretrained(save_tiny_vae(folder / "_vae"))
    encoder_dir, tokenizer_dir = save_tiny_text_encoder(folder / "_text")
    in_channels = LATENT_CHANNELS + (WAN_MASK_CHANNELS + LATENT_CHANNELS if i2v else 0)
    cls = diffusers.WanImageToVideoPipeline if i2v else diffusers.WanPipeline
    pipe = cls(
        tokenizer=transformers.AutoTokenizer.from_pretrained(tokenizer_dir),
        text_encoder=transformers.UMT5EncoderModel.from_pretrained(encoder_dir),
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_transformer(1, in_channels),
        transformer_2=tiny_transformer(2, in_channels) if boundary_ratio else None,
        boundary_ratio=boundary_ratio,
        **keys,
    )
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


@pytest.fixture(scope="module", params=["t2v", "i2v"])
def a14b(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pipeline(tmp_path_factory.mktemp(f"a14b_{request.param}"), i2v=request.param == "i2v")


def convert_tool() -> Any:
    """tools/convert_checkpoint.py as a module (its ``main`` runs in this process)."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools/convert_checkpoint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("ti2v"), boundary_ratio=None, expand_timesteps=True)


def run_pipeline(folder: Path) -> tuple[torch.Tensor, dict[str, int]]:
    """Two denoising steps of the folder's pipeline (at t = 1000, high noise, then t = 8.9, low
    noise), and how often each transformer ran."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    calls = dict.fromkeys(("transformer", "transformer_2"), 0)
    for component in calls:
        getattr(pipe, component).register_forward_hook(
            lambda *_, component=component: calls.__setitem__(component, calls[component] + 1)
        )
    kwargs: dict[str, Any] = {}
    if isinstance(pipe, diffusers.WanImageToVideoPipeline):
        kwargs["image"] = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    # Text as embeddings: the I2V pipeline's prompt cleaning needs ftfy, which imontage does not install.
    text = torch.randn(1, 8, TEXT_DIM, generator=torch.Generator().manual_seed(2))
    latents = pipe(
        prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text), height=16, width=16,
        num_frames=5, num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
        output_type="latent", **kwargs,
    ).frames  # fmt: skip
    return latents, calls


def test_a14b_pipeline_imports_both_experts_and_exports_them_back(a14b: Path, tmp_path: Path) -> None:
    tool = convert_tool()
    preset = tmp_path / "a14b.yaml"
    assert (
        tool.main(
            ["import-pipeline", str(a14b), "--out", str(tmp_path / "imported"), "--config-out", str(preset)]
        )
        == 0
    )
    files = {c: tmp_path / "imported" / f"{c}.safetensors" for c in ("transformer", "transformer_2")}
    cfg = tool.model_config_file(preset)
    assert cfg.family == "wan" and cfg.wan.boundary_ratio == 0.875 and not cfg.wan.expand_timesteps
    for component, file in files.items():
        assert (
            load_file(file).keys()
            == load_file(a14b / component / "diffusion_pytorch_model.safetensors").keys()
        )
    out = tmp_path / "exported"
    sources = [f"{component}={file}" for component, file in reversed(files.items())]  # any order
    command = [
        "export-pipeline",
        *sources,
        "--config",
        str(preset),
        "--out",
        str(out),
        "--components-from",
        str(a14b),
    ]
    assert tool.main(command) == 0
    for component in files:
        exported = load_file(out / component / "diffusion_pytorch_model.safetensors")
        original = load_file(a14b / component / "diffusion_pytorch_model.safetensors")
        assert exported.keys() == original.keys()
        assert all(torch.equal(exported[k], original[k]) for k in original), component
    index, original_index = (json.loads((f / PIPELINE_INDEX).read_text()) for f in (out, a14b))
    assert index == original_index  # the pipeline class, boundary_ratio, every component
    (latents, calls), (original_latents, _) = run_pipeline(out), run_pipeline(a14b)
    assert calls == {"transformer": 2, "transformer_2": 2}  # one step each, with and without the text
    torch.testing.assert_close(latents, original_latents, rtol=0, atol=0)


def test_pipeline_keys_must_match_its_transformers(a14b: Path, tmp_path: Path) -> None:
    index = json.loads((a14b / PIPELINE_INDEX).read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    for component in ("transformer", "transformer_2"):
        (broken / component).symlink_to(a14b / component)
    (broken / PIPELINE_INDEX).write_text(json.dumps(index | {"boundary_ratio": None}))
    with pytest.raises(
        ConversionError, match="model_index.json: holds transformers transformer, transformer_2"
    ):
        read_pipeline(broken)
    files, cfg = import_pipeline(a14b, tmp_path / "imported")
    with pytest.raises(ConversionError, match="got weights for transformer; the model config has"):
        export_pipeline({"transformer": files["transformer"]}, tmp_path / "out", cfg)


def test_ti2v_first_frame_is_clean_per_token_as_the_pipeline_does(ti2v: Path, tmp_path: Path) -> None:
    """TI2V's expand_timesteps is imontage's clean first frame: the per-token timesteps that
    flow matching gives equal WanImageToVideoPipeline's ``first_frame_mask[:, ::2, ::2] * t``, and the
    model's output on them equals diffusers' transformer's."""
    files, cfg = import_pipeline(ti2v, tmp_path / "imported")
    assert list(files) == ["transformer"] and cfg.wan.expand_timesteps and cfg.wan.boundary_ratio == 0
    assert clean_first_frame(cfg)
    model = build_model(cfg)
    model.load_state_dict(load_file(files["transformer"]), strict=True)
    gen = torch.Generator().manual_seed(3)
    frames, height, width = 3, 4, 6
    latents = torch.randn(LATENT_CHANNELS, frames, height, width, generator=gen)
    text = torch.randn(5, TEXT_DIM, generator=gen)
    sample = Sample([Segment("text", data=text), Segment("video", role="target", data=latents)])
    batch = pack_samples([sample], packing_spec(cfg))
    t = torch.tensor([0.7])
    noised, _ = noise_batch(batch, t, torch.randn(batch.tokens.shape, generator=gen), first_frame_mask(batch))
    mask = torch.ones(frames, height, width)
    mask[0] = 0  # the pipeline's first_frame_mask of one latent channel
    expected_t = (mask[:, ::2, ::2] * t).flatten()  # [T'·H'·W'], one per token
    video_rows = ~noised.is_text
    torch.testing.assert_close(noised.timesteps[video_rows], expected_t)
    with torch.no_grad():
        out = unpatchify_segments(model.eval()(noised), noised, model.patch_size)[0][1]
        x_t = unpatchify_segments(noised.tokens, noised, model.patch_size)[0][1]
        reference = tiny_transformer(1, LATENT_CHANNELS)
        padded = torch.cat([text, text.new_zeros(512 - len(text), TEXT_DIM)])  # as the pipeline pads
        want, one_timestep = (
            reference(
                hidden_states=x_t[None],
                timestep=timestep,
                encoder_hidden_states=padded[None],
                return_dict=False,
            )[0][0]
            for timestep in (1000.0 * expected_t[None], 1000.0 * t)
        )
    assert out is not None
    tolerance = 1e-5 * float(want.abs().max())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=tolerance)
    assert not torch.allclose(
        out, one_timestep, rtol=1e-5, atol=tolerance
    )  # the clean frame's timestep counts
    exported = export_pipeline(files, tmp_path / "exported", cfg, components_from=ti2v)
    index = json.loads((exported / PIPELINE_INDEX).read_text())
    assert index["expand_timesteps"] is True and index["boundary_ratio"] is None
    assert index["transformer_2"] == [None, None]


# ------------------------------------------------------------------------------ one expert per run
@pytest.mark.parametrize(("t_range", "shift"), [((0.875, 1.0), 3.0), ((0.0, 0.9), 1.0)])
def test_expert_timesteps_are_the_distribution_restricted_to_its_range(
    t_range: tuple[float, float], shift: float
) -> None:
    """An expert's t: every draw in its range, distributed as the full draws that fall in it."""
    drawn = sample_timesteps(20_000, 0.0, 1.0, shift, torch.Generator().manual_seed(0), t_range)
    assert bool(((drawn >= t_range[0]) & (drawn < t_range[1])).all())
    full = sample_timesteps(200_000, 0.0, 1.0, shift, torch.Generator().manual_seed(1))
    kept = full[(full >= t_range[0]) & (full < t_range[1])]
    quantiles = torch.linspace(0.01, 0.99, 99)
    assert torch.allclose(drawn.quantile(quantiles), kept.quantile(quantiles), atol=0.01)


def a14b_recipe(pipeline: Path, run_dir: Path, shards: str, *overrides: str) -> Any:
    """A short EditVerse run of the tiny A14B pipeline's transformers, from the pipeline folder."""
    return load_recipe(
        REPO / "configs/recipes/editverse_wan2.1_1.3b.yaml",
        a14b_overrides(pipeline, run_dir, shards, *overrides),
    )


def a14b_overrides(pipeline: Path, run_dir: Path, shards: str, *overrides: str) -> list[str]:
    """:func:`a14b_recipe`'s command line."""
    tiny = ["model=wan_tiny", f"model.text_dim={TEXT_DIM}", "model.mlp_hidden_size=48",
            "model.wan.rope_max_seq_len=64", "model.wan.boundary_ratio=0.875",
            f"model.init_from_diffusers={pipeline}", f"data.shards={shards}", "data.num_workers=0",
            "data.batch_size=2", "parallel=single", "train.precision=fp32", "train.progress=false",
            "stages.sft.steps=3", f"run_dir={run_dir}"]  # fmt: skip
    return [*tiny, *overrides]


@pytest.mark.parametrize("a14b", ["t2v"], indirect=True)
def test_one_expert_run_builds_reads_and_trains_only_its_expert(
    a14b: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imontage.checkpoint.diffusers as diffusers_io
    import imontage.config.model_file as model_file
    import imontage.models.wan.model as wan_model
    import imontage.objectives.flow_matching as flow_matching
    from imontage.train.trainer import Trainer

    shards = write_latent_shards(tmp_path / "latents")
    cfg = a14b_recipe(a14b, tmp_path / "run", shards, "model.expert=transformer_2")
    built, read, drawn = [], [], []

    def spy(function: Any, calls: list[Any], argument: int) -> Any:
        return lambda *args, **kwargs: (calls.append(args[argument]), function(*args, **kwargs))[1]

    monkeypatch.setattr(
        wan_model,
        "build_wan",
        lambda cfg, device: (built.append((cfg.expert, str(device))), build_wan(cfg, device))[1],
    )
    monkeypatch.setattr(model_file, "read_class", spy(model_file.read_class, read, 0))
    monkeypatch.setattr(diffusers_io, "read_folder", spy(diffusers_io.read_folder, read, 0))
    monkeypatch.setattr(flow_matching, "noise_batch", spy(flow_matching.noise_batch, drawn, 1))
    trainer = Trainer(cfg)
    trainer.start_stage(trainer.stages[0])  # weights from the pipeline's transformer_2/ alone
    want = load_file(a14b / "transformer_2" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(p, want[name]) for name, p in trainer.model.named_parameters())
    trainer.fit()
    # One model built, the low-noise expert (the others: its shapes, on the meta device, to check files).
    assert {expert for expert, _ in built} == {"transformer_2"}
    assert [device for _, device in built if device != "meta"] == ["None"]
    assert read and {Path(folder).name for folder in read} == {"transformer_2"}
    t = torch.cat(drawn)
    assert len(t) == 3 * 2 and bool(((t > 0) & (t < 0.875)).all())  # its range only: below the boundary
    with pytest.raises(RecipeError, match="model.expert 'transformer_3' is not an expert"):
        a14b_recipe(a14b, tmp_path / "run", shards, "model.expert=transformer_3")


# ------------------------------------------------------------------ both experts in one run
def routing_batch(t: list[float]) -> Any:
    """Two tiny T2V samples (text and a 5-frame 16x16 latent video), noised at ``t`` per sample."""
    samples = [
        Sample([Segment("text", "condition", torch.randn(8, TEXT_DIM)),
                Segment("video", "target", torch.randn(LATENT_CHANNELS, 2, 4, 4))])
        for _ in t
    ]  # fmt: skip
    cfg = preset_config("wan2.2_t2v_a14b", "model=wan_tiny", f"model.text_dim={TEXT_DIM}")
    batch = pack_samples(samples, packing_spec(cfg))  # type: ignore[arg-type]
    return noise_batch(batch, torch.tensor(t), torch.randn(batch.tokens.shape))[0]


@pytest.mark.parametrize("a14b", ["t2v"], indirect=True)
def test_a_model_of_both_experts_reads_both_and_routes_by_timestep(a14b: Path, tmp_path: Path) -> None:
    from imontage.checkpoint.diffusers import model_weights
    from imontage.models.common.experts import TimestepExperts

    shards = write_latent_shards(tmp_path / "latents")
    cfg = a14b_recipe(a14b, tmp_path / "run", shards).model  # model.expert unset: every expert
    model = build_model(cfg)
    assert isinstance(model, TimestepExperts)
    with torch.no_grad():
        targets = dict(model.named_parameters())
        for name, tensor in model_weights(a14b, cfg):
            targets.pop(name).copy_(tensor)
    assert not targets  # both subfolders read, every parameter under its expert's name
    for component in ("transformer", "transformer_2"):
        want = load_file(a14b / component / "diffusion_pytorch_model.safetensors")
        network = model.get_submodule(component)
        assert all(torch.equal(p, want[n]) for n, p in network.named_parameters()), component
    # The pipeline's rule: transformer at t >= boundary_ratio (0.875), transformer_2 below.
    for t, expert in [([0.95, 0.875], "transformer"), ([0.5, 0.874], "transformer_2")]:
        batch = routing_batch(t)
        assert model.routed_expert(batch).name == expert
        with torch.no_grad():
            torch.testing.assert_close(model(batch), model.get_submodule(expert)(batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="spans two experts"):
        model(routing_batch([0.9, 0.5]))


def test_each_step_draws_an_expert_with_its_share_of_the_distribution() -> None:
    from imontage.objectives.flow_matching import range_share, step_range

    ranges = ((0.875, 1.0), (0.0, 0.875))
    share = range_share(ranges[0], 0.0, 1.0, 3.0)
    drawn = [step_range(ranges, 0.0, 1.0, 3.0, seed=7, step=s) for s in range(4000)]
    assert drawn == [
        step_range(ranges, 0.0, 1.0, 3.0, seed=7, step=s) for s in range(4000)
    ]  # (seed, step) only
    assert abs(drawn.count(ranges[0]) / len(drawn) - share) < 0.025  # 0.20 of the draws at shift 3
    full = sample_timesteps(100_000, 0.0, 1.0, 3.0, torch.Generator().manual_seed(0))
    assert abs(float((full >= 0.875).float().mean()) - share) < 0.005


def two_expert_run(rank: int, world_size: int, overrides: list[str]) -> dict[str, Any]:
    """A ZeRO-3 run of both experts; per step: the expert each forward ran, the step's range, each
    expert's gathered weights after it, and the largest stale gradient of the idle expert before
    and after it was zeroed."""
    import deepspeed
    from deepspeed.utils import safe_get_local_grad

    from imontage.models.common.experts import expert_networks
    from imontage.train.trainer import Trainer

    trainer = Trainer(load_recipe(REPO / "configs/recipes/editverse_wan2.1_1.3b.yaml", overrides))
    module, backend = trainer.backend.engine.module, trainer.backend
    routed: list[str] = []
    route = module.routed_expert
    module.routed_expert = lambda batch: (expert := route(batch), routed.append(expert.name))[0]
    stale: list[tuple[float, float]] = []
    rest = backend._rest_idle_experts

    def idle_gradient() -> float:
        params = [p for i in backend.idle_groups for p in expert_networks(module)[i][1].parameters()]
        return max((float(safe_get_local_grad(p).abs().max()) for p in params), default=0.0)

    def resting() -> dict[int, float]:
        before = idle_gradient()
        rates = rest()
        stale.append((before, idle_gradient()))
        return rates

    backend._rest_idle_experts = resting
    steps: list[dict[str, Any]] = []
    after_step = trainer.after_step

    def record(metrics: dict[str, float]) -> None:
        weights = {}
        for prefix, network in expert_networks(module):
            params = list(network.parameters())
            with deepspeed.zero.GatheredParameters(params):
                weights[prefix] = torch.cat([p.detach().flatten().clone() for p in params])
        assert trainer.stage is not None
        t_range = trainer.stage.objective.step_range(trainer.cfg.seed, trainer.step - 1)
        steps.append(
            {"step": trainer.step, "range": t_range, "routed": sorted(set(routed)), "weights": weights}
        )
        routed.clear()
        after_step(metrics)

    trainer.after_step = record  # type: ignore[method-assign]
    trainer.fit()
    return {"steps": steps, "stale": stale}


@pytest.mark.parametrize("a14b", ["t2v"], indirect=True)
def test_two_expert_zero3_run_routes_alike_on_every_rank_resumes_and_exports(
    a14b: Path, tmp_path: Path
) -> None:
    shards = write_latent_shards(tmp_path / "latents")
    first = tmp_path / "run"
    common = ["parallel=zero3_dp2", "parallel.device=cpu", "train.sample.every=0", "stages.sft.steps=4",
              "train.checkpoint.every=2", "train.ema_decay=0", "train.log_every=1"]  # fmt: skip
    cfg = a14b_recipe(a14b, first, shards, *common)
    ranks = run_ranks(two_expert_run, 2, a14b_overrides(a14b, first, shards, *common), timeout=300)
    steps = [r["steps"] for r in ranks]
    high, low = (0.875, 1.0), (0.0, 0.875)
    names = {high: "transformer.", low: "transformer_2."}
    assert {s["range"] for s in steps[0]} == {high, low}  # both experts trained in 4 steps (seed 0)
    for step in range(4):
        on_ranks = [s[step] for s in steps]
        # The step's range is one for all ranks; every forward of every rank ran its expert.
        assert all(s["range"] == on_ranks[0]["range"] for s in on_ranks)
        expert = names[on_ranks[0]["range"]]
        assert all(s["routed"] == [expert[:-1]] for s in on_ranks)
        if step:  # the expert that did not run did not move; the one that ran did
            before, after = steps[0][step - 1]["weights"], on_ranks[0]["weights"]
            idle = next(p for p in before if p != expert)
            assert torch.equal(before[idle], after[idle]) and not torch.equal(before[expert], after[expert])
    # ZeRO-3 keeps an idle expert's last gradient (the first step has none yet): zeroed before the step.
    stale = ranks[0]["stale"]
    assert any(before > 0 for before, _ in stale) and all(after == 0 for _, after in stale)

    # Resumed at step 2, the run ends where the straight one did, bit for bit.
    resumed = tmp_path / "resumed"
    again = run_ranks(
        two_expert_run, 2,
        a14b_overrides(a14b, resumed, shards, *common, f"train.resume={first / 'checkpoints' / 'step_000002'}"),
        timeout=300,
    )  # fmt: skip
    assert [s["range"] for s in again[0]["steps"]] == [s["range"] for s in steps[0][2:]]
    for prefix in names.values():
        assert torch.equal(again[0]["steps"][-1]["weights"][prefix], steps[0][-1]["weights"][prefix])

    # The checkpoint exports to a pipeline folder of both transformers, which diffusers runs.
    out = tmp_path / "pipeline"
    tool = convert_tool()
    preset = tmp_path / "a14b.yaml"
    OmegaConf.save(cfg.model, preset)
    command = ["export-pipeline", str(first / "checkpoints" / "step_000004"), "--config", str(preset),
               "--out", str(out), "--components-from", str(a14b), "--weights", "live"]  # fmt: skip
    assert tool.main(command) == 0
    final = steps[0][-1]["weights"]
    for component in ("transformer", "transformer_2"):
        exported = load_file(out / component / "diffusion_pytorch_model.safetensors")
        network = build_wan(OmegaConf.merge(cfg.model, {"expert": component}), "meta")
        names_in_order = [n for n, _ in network.named_parameters()]
        flat = torch.cat([exported[n].float().flatten() for n in names_in_order])
        assert torch.equal(flat, final[f"{component}."]), component
    _, calls = run_pipeline(out)
    assert calls == {"transformer": 2, "transformer_2": 2}  # one step each, with and without the text


@pytest.mark.parametrize("a14b", ["i2v"], indirect=True)
def test_one_process_run_of_both_i2v_experts_samples_across_the_boundary_and_exports(
    a14b: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imontage.models.common.experts import TimestepExperts
    from imontage.train.trainer import Trainer

    shards = write_latent_shards(tmp_path / "latents")
    run = tmp_path / "run"
    cfg = a14b_recipe(
        a14b, run, shards, f"model.in_channels={LATENT_CHANNELS + WAN_MASK_CHANNELS + LATENT_CHANNELS}",
        "stages.sft.steps=2", "train.sample.every=2", "train.sample.steps=4", "train.ema_decay=0",
    )  # fmt: skip
    routed: list[str] = []
    route = TimestepExperts.routed_expert
    monkeypatch.setattr(
        TimestepExperts,
        "routed_expert",
        lambda self, batch: (e := route(self, batch), routed.append(e.name))[0],
    )
    trainer = Trainer(cfg)
    sampling = trainer.write_samples
    sampled: list[str] = []
    monkeypatch.setattr(
        trainer, "write_samples", lambda: (routed.clear(), sampling(), sampled.extend(routed))[1]
    )
    trainer.fit()
    # Preview sampling steps t from 1 down: the high-noise expert first, then the low-noise one.
    assert sampled[0] == "transformer" and sampled[-1] == "transformer_2"
    assert sampled == sorted(sampled, key=["transformer", "transformer_2"].index)
    out = tmp_path / "pipeline"
    preset = tmp_path / "a14b.yaml"
    OmegaConf.save(cfg.model, preset)
    command = ["export-pipeline", str(run / "checkpoints" / "step_000002"), "--config", str(preset),
               "--out", str(out), "--components-from", str(a14b), "--weights", "live"]  # fmt: skip
    assert convert_tool().main(command) == 0
    trained = load_file(run / "checkpoints" / "step_000002" / "model.safetensors")
    for component in ("transformer", "transformer_2"):
        exported = load_file(out / component / "diffusion_pytorch_model.safetensors")
        assert exported.keys() == {
            name.removeprefix(f"{component}.") for name in trained if name.startswith(f"{component}.")
        }
    _, calls = run_pipeline(out)  # WanImageToVideoPipeline with both transformers
    assert calls == {"transformer": 2, "transformer_2": 2}


def two_expert_tensor_parallel(rank: int, world_size: int, overrides: list[str]) -> dict[str, Any]:
    """A ZeRO-3 run of both experts under TP=2 with SP (one step that moves nothing, saved), then on the same
    process groups a fresh model of both experts, cut, run forward and backward on a high- and a
    low-noise batch."""
    from imontage.parallel.parallelize import parallelize_model
    from imontage.train.trainer import Trainer

    trainer = Trainer(load_recipe(REPO / "configs/recipes/editverse_wan2.1_1.3b.yaml", overrides))
    trainer.fit()
    return both_experts_forward_backward(parallelize_model(two_expert_model(), 2, 1, True))


def two_expert_model() -> Any:
    cfg = preset_config(
        "wan2.2_t2v_a14b", "model=wan_tiny", f"model.text_dim={TEXT_DIM}", "model.wan.boundary_ratio=0.875"
    )
    torch.manual_seed(0)
    return build_model(cfg)


def both_experts_forward_backward(model: Any) -> dict[str, Any]:
    torch.manual_seed(3)
    outs = []
    for t in ([0.95, 0.9], [0.5, 0.3]):  # transformer's, then transformer_2's
        out = model(routing_batch(t))
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
        outs.append(out.detach())
    return {
        "outs": outs,
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }


@pytest.mark.parametrize("a14b", ["t2v"], indirect=True)
def test_both_experts_under_tensor_parallelism_match_one_process_and_export(
    a14b: Path, tmp_path: Path
) -> None:
    from imontage.parallel.parallelize import tensor_split

    shards = write_latent_shards(tmp_path / "latents")
    run = tmp_path / "run"
    overrides = a14b_overrides(
        a14b, run, shards, "parallel=tp2", "parallel.sequence_parallel=true", "parallel.device=cpu",
        "train.sample.every=0", "stages.sft.steps=1", "train.ema_decay=0",
        "optim.lr=1e-30",  # a step that moves no weight: far below every weight's rounding
    )  # fmt: skip
    ranks = run_ranks(two_expert_tensor_parallel, 2, overrides, timeout=300)
    expected = both_experts_forward_backward(two_expert_model())
    cut = []
    for result in ranks:
        for out, want in zip(result["outs"], expected["outs"], strict=True):
            torch.testing.assert_close(out, want, rtol=1e-4, atol=2e-5 * float(want.abs().max()))
    for name, weight in expected["weights"].items():
        split = tensor_split(name)
        if split is None:
            assert all(torch.equal(r["weights"][name], weight) for r in ranks), name
            got = [r["grads"][name] for r in ranks]
        else:  # each expert's layers cut as one network's: transformer_2.blocks.0.attn1.to_q.weight
            cut.append(name)
            assert torch.equal(split.unshard([r["weights"][name] for r in ranks]), weight), name
            got = [split.unshard([r["grads"][name] for r in ranks])] * 2
        for grad in got:
            torch.testing.assert_close(
                grad,
                expected["grads"][name],
                rtol=1e-4,
                atol=2e-5 * max(1.0, float(expected["grads"][name].abs().max())),
            )
    assert {"transformer.blocks.0.attn1.to_q.weight", "transformer_2.blocks.1.ffn.net.2.weight"} <= set(cut)
    # The TP=2 checkpoint (one step that moved nothing) exports to the pipeline's own weights, each expert's slices joined.
    out = tmp_path / "pipeline"
    preset = tmp_path / "a14b.yaml"
    OmegaConf.save(load_recipe(REPO / "configs/recipes/editverse_wan2.1_1.3b.yaml", overrides).model, preset)
    command = ["export-pipeline", str(run / "checkpoints" / "step_000001"), "--config", str(preset),
               "--out", str(out), "--weights", "live"]  # fmt: skip
    assert convert_tool().main(command) == 0
    for component in ("transformer", "transformer_2"):
        exported = load_file(out / component / "diffusion_pytorch_model.safetensors")
        original = load_file(a14b / component / "diffusion_pytorch_model.safetensors")
        assert exported.keys() == original.keys()
        assert all(torch.equal(exported[k], original[k]) for k in original), component


def two_expert_ulysses(rank: int, world_size: int) -> dict[str, Any]:
    from imontage.parallel.parallelize import parallelize_model
    from imontage.parallel.state import ParallelLayout, init_process_groups, launch_env

    init_process_groups(ParallelLayout(1, 2, 1), torch.device("cpu"), launch_env())
    return both_experts_forward_backward(parallelize_model(two_expert_model(), 1, 2))


def test_both_experts_under_ulysses_match_one_process() -> None:
    ranks = run_ranks(two_expert_ulysses, 2, timeout=300)
    expected = both_experts_forward_backward(two_expert_model())
    for result in ranks:
        for out, want in zip(result["outs"], expected["outs"], strict=True):
            torch.testing.assert_close(out, want, rtol=1e-4, atol=2e-5 * float(want.abs().max()))
    # Each context-parallel rank holds its tokens' share of every gradient: the shares add up.
    for name, grad in expected["grads"].items():
        shares = ranks[0]["grads"][name] + ranks[1]["grads"][name]
        torch.testing.assert_close(shares, grad, rtol=1e-4, atol=2e-5 * max(1.0, float(grad.abs().max())))
        assert not torch.equal(ranks[0]["grads"][name], grad) or not bool(grad.any()), name

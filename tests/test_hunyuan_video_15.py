"""HunyuanVideo 1.5 family: diffusers' weights load by name and give diffusers' outputs and gradients.

A tiny random ``HunyuanVideo15Transformer3DModel`` (fp32, CPU; I2V, whose weights T2V shares) is
saved once per module with ``save_pretrained`` and imported through the generic diffusers importer;
outputs and gradients are compared with diffusers' own forward pass on the same inputs: Qwen text
(padded and masked in diffusers, packed in imontage), glyph text (ByT5, text segments of encoder 1)
and the condition image's tokens. Export and import, the parallel layouts and LoRA of the T2V and
I2V presets are in test_family_conformance.py (the parallel layouts with LoRA also in
test_parallel_families.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_hunyuan_video import close

from imontage.checkpoint import diffusers as dio
from imontage.checkpoint.convert import load_consolidated
from imontage.checkpoint.pipeline import import_pipeline
from imontage.config import load_recipe
from imontage.config.schema import ModelConfig
from imontage.models import build_model, packing_spec
from imontage.models.common.sequence import PackedBatch, Sample, Segment, pack_samples, patchify
from imontage.models.hunyuan_video_15.diffusers_config import diffusers_config, model_config_from_diffusers
from imontage.models.hunyuan_video_15.model import HunyuanVideo15Transformer

QUICKSTART = REPO / "configs/recipes/quickstart.yaml"
PATCH = (1, 1, 1)
LATENT, TEXT_DIM, GLYPH_DIM, IMAGE_DIM, IMAGE_TOKENS = 4, 24, 20, 12, 5
TINY: dict[str, Any] = {
    "in_channels": 2 * LATENT + 1, "out_channels": LATENT, "num_attention_heads": 2, "attention_head_dim": 16,
    "num_layers": 2, "num_refiner_layers": 1, "mlp_ratio": 4.0, "patch_size": 1, "patch_size_t": 1,
    "qk_norm": "rms_norm", "text_embed_dim": TEXT_DIM, "text_embed_2_dim": GLYPH_DIM,
    "image_embed_dim": IMAGE_DIM, "rope_theta": 256.0, "rope_axes_dim": [4, 6, 6], "target_size": 640,
    "task_type": "i2v", "use_meanflow": False,
}  # fmt: skip


def tiny_config(task: str = "i2v", layout: str = "video3d") -> Any:
    """imontage's ``model`` section of the tiny diffusers config."""
    changes = model_config_from_diffusers({**TINY, "task_type": task})
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), changes, {"positions": {"layout": layout}})


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random, so that no path is silently zero (std at most 1/√fan-in: the 2048-wide
    glyph projection stays in range)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * min(0.2, p.shape[-1] ** -0.5))
    return model


@pytest.fixture(scope="module")
def reference() -> Any:
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    return randomised(HunyuanVideo15Transformer3DModel(**TINY), seed=0).eval()


@pytest.fixture(scope="module")
def folder(reference: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The transformer/ of a pipeline folder (its model_index.json names the transformer only)."""
    path = tmp_path_factory.mktemp("hunyuan_video_15") / "transformer"
    reference.save_pretrained(path, max_shard_size="2MB")
    index = {"_class_name": "HunyuanVideo15ImageToVideoPipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "HunyuanVideo15Transformer3DModel"]}  # fmt: skip
    (path.parent / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def imported(folder: Path) -> Path:
    """The pipeline folder through the generic importer: an imontage consolidated file."""
    files, cfg = import_pipeline(folder.parent, folder.parent / "imported")
    assert cfg.family == "hunyuan_video_15" and list(files) == ["transformer"]
    return files["transformer"]


@pytest.fixture(scope="module")
def model(imported: Path) -> HunyuanVideo15Transformer:
    """The imported weights in imontage's model, loaded by name (strict)."""
    loaded, _ = load_consolidated(imported)
    assert isinstance(loaded, HunyuanVideo15Transformer)
    return loaded.eval()


class Case:
    """One sample's inputs, fed to diffusers unpacked and to imontage packed."""

    def __init__(self, g: torch.Generator, frames: int, height: int, width: int, text_len: int,
                 glyph_len: int, t: float, image: bool = True) -> None:  # fmt: skip
        self.t = t
        self.latents = torch.randn(LATENT, frames, height, width, generator=g)
        self.text = torch.randn(text_len, TEXT_DIM, generator=g)
        self.glyph = torch.randn(glyph_len, GLYPH_DIM, generator=g)
        self.image_latent = torch.randn(LATENT, 1, height, width, generator=g)
        self.image = torch.randn(IMAGE_TOKENS, IMAGE_DIM, generator=g) if image else None

    def channel_condition(self) -> torch.Tensor:
        """I2V: the image latent on frame 0 (zeros after) and the first-frame mask; T2V: zeros."""
        condition = torch.zeros(LATENT + 1, *self.latents.shape[1:])
        if self.image is not None:
            condition[:LATENT, :1] = self.image_latent
            condition[LATENT, :1] = 1
        return condition

    def diffusers_inputs(self, text_pad: int, glyph_pad: int) -> dict[str, torch.Tensor]:
        """Each text padded by rows its mask hides (random and large: they must not matter)."""
        g = torch.Generator().manual_seed(99)

        def padded(rows: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
            filler = 100 * torch.randn(pad, rows.shape[1], generator=g)
            return torch.cat([rows, filler])[None], torch.cat([torch.ones(len(rows)), torch.zeros(pad)])[None]

        text, mask = padded(self.text, text_pad)
        glyph, glyph_mask = padded(self.glyph, glyph_pad)
        image = self.image if self.image is not None else torch.zeros(IMAGE_TOKENS, IMAGE_DIM)
        return {
            "hidden_states": torch.cat([self.latents, self.channel_condition()])[None],
            "timestep": torch.tensor([1000.0 * self.t]),
            "encoder_hidden_states": text,
            "encoder_attention_mask": mask,
            "encoder_hidden_states_2": glyph,
            "encoder_attention_mask_2": glyph_mask,
            "image_embeds": image[None],
        }

    def sample(self) -> Sample:
        condition = self.channel_condition() if self.image is not None else None
        segments = [Segment("text", data=self.text)]
        if len(self.glyph):
            segments.append(Segment("text", data=self.glyph, encoder=1))
        segments.append(Segment("video", "target", self.latents, channel_condition=condition))
        image = self.image if self.image is not None else torch.zeros(IMAGE_TOKENS, IMAGE_DIM)
        return Sample(segments, image_embeds=image)


def diffusers_output(reference: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """diffusers' velocity ``[T·H·W, C]`` (patch 1)."""
    return patchify(reference(**inputs, return_dict=False)[0][0], PATCH)


def packed(cases: list[Case], task: str = "i2v") -> PackedBatch:
    batch = pack_samples([case.sample() for case in cases], packing_spec(tiny_config(task)))
    t = torch.tensor([case.t for case in cases])[batch.sample_index()]
    return batch.replace(timesteps=torch.where(batch.target_mask, t, torch.zeros_like(t)))


def visual_span(batch: PackedBatch, sample: int) -> slice:
    (span,) = [s for s in batch.spans if s.sample == sample and s.kind != "text"]
    return slice(span.start, span.start + span.length)


@pytest.mark.parametrize("image", [True, False], ids=["i2v", "t2v"])
def test_single_sample_equals_diffusers(
    reference: Any, model: HunyuanVideo15Transformer, image: bool
) -> None:
    case = Case(torch.Generator().manual_seed(1), 3, 4, 5, text_len=5, glyph_len=3, t=0.7, image=image)
    batch = packed([case])
    with torch.no_grad():
        out = model(batch)
        assert out.shape == (batch.tokens.shape[0], LATENT) and bool((out[batch.is_text] == 0).all())
        close(out[visual_span(batch, 0)], diffusers_output(reference, case.diffusers_inputs(3, 2)))
        close(out[visual_span(batch, 0)], diffusers_output(reference, case.diffusers_inputs(0, 0)))


def test_packed_samples_and_their_gradients_equal_diffusers(
    reference: Any, model: HunyuanVideo15Transformer
) -> None:
    """Samples of other shapes, text lengths, with and without glyph text, one of them text-to-video
    (zero image tokens) in an I2V batch: each sample's output, its inputs' gradients and every
    parameter's gradient equal diffusers' runs of the samples one by one."""
    g = torch.Generator().manual_seed(2)
    cases = [
        Case(g, 2, 3, 4, text_len=3, glyph_len=2, t=0.3),
        Case(g, 3, 4, 2, text_len=7, glyph_len=0, t=0.9),
        Case(g, 1, 2, 6, text_len=1, glyph_len=4, t=0.5, image=False),  # an image
    ]
    batch = packed(cases)
    batch = batch.replace(**{name: getattr(batch, name).clone().requires_grad_(True)
                             for name in ("tokens", "text_embeds", "image_embeds")})  # fmt: skip
    model.zero_grad()
    out = model(batch)
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    reference.zero_grad()
    for index, case in enumerate(cases):
        inputs = case.diffusers_inputs(8 - len(case.text), 4 - len(case.glyph))
        for name in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_2", "image_embeds"):
            inputs[name].requires_grad_(True)
        expected = diffusers_output(reference, inputs)
        rows = visual_span(batch, index)
        close(out[rows].detach(), expected.detach())
        (expected * weights[rows]).sum().backward()
        assert batch.tokens.grad is not None and batch.text_embeds is not None
        assert batch.text_embeds.grad is not None and batch.image_embeds.grad is not None
        close(batch.tokens.grad[rows], patchify(inputs["hidden_states"].grad[0, :LATENT], PATCH))
        texts = [s for s in batch.spans if s.sample == index and s.kind == "text"]
        for span, name, width in zip(texts, ("encoder_hidden_states", "encoder_hidden_states_2"),
                                     (TEXT_DIM, GLYPH_DIM), strict=False):  # fmt: skip
            grad = batch.text_embeds.grad[span.start : span.start + span.length, :width]
            close(grad, inputs[name].grad[0, : span.length])
        if case.image is not None:
            close(batch.image_embeds.grad[index], inputs["image_embeds"].grad[0])
    expected_grads = {name: p.grad for name, p in reference.named_parameters()}
    largest = max(float(g.abs().max()) for g in expected_grads.values() if g is not None)
    for name, p in model.named_parameters():
        expected_grad = expected_grads[name]
        if expected_grad is None:  # the last block's text-stream outputs reach no visual row
            assert p.grad is None or not bool(p.grad.any()), name
            continue
        assert p.grad is not None, name
        # Within 1e-4 of the tensor's largest, or 1e-6 of the model's: the refiner's key biases
        # shift every score of a query alike, so their true gradient is 0 (both are fp32 noise).
        error = float((p.grad - expected_grad).abs().max())
        assert error <= max(1e-4 * float(expected_grad.abs().max()), 1e-6 * largest), name


def test_diffusers_config_round_trips() -> None:
    for task in ("t2v", "i2v"):
        config = {"_class_name": "HunyuanVideo15Transformer3DModel", **TINY, "task_type": task}
        assert diffusers_config(tiny_config(task)) == config
        assert model_config_from_diffusers(
            {**config, "_diffusers_version": "0.42.1"}
        ) == model_config_from_diffusers(config)


@pytest.mark.parametrize(
    ("key", "value"),
    [("use_meanflow", True), ("task_type", "ti2v"), ("qk_norm", "layer_norm"), ("guidance_embeds", True),
     ("rope_axes_dim", [4, 6, 4]), ("_class_name", "HunyuanVideoTransformer3DModel")],
)  # fmt: skip
def test_diffusers_config_refuses_what_it_cannot_represent(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        model_config_from_diffusers({**TINY, key: value})


@pytest.mark.parametrize(
    "preset", ["hunyuan_video_1.5_tiny", "hunyuan_video_1.5_t2v", "hunyuan_video_1.5_i2v"]
)
def test_presets_have_diffusers_parameters(preset: str) -> None:
    """On the meta device: the same names and shapes as diffusers' model of the same config, and
    the public models' 8.3B parameters within 1%."""
    cfg = load_recipe(QUICKSTART, [f"model={preset}", "model.prediction=velocity"]).model
    built = build_model(cfg, device="meta")
    assert isinstance(built, HunyuanVideo15Transformer)
    with torch.device("meta"):
        reference = dio.build_diffusers_model(cfg)
    shapes = {name: tuple(p.shape) for name, p in built.state_dict().items()}
    assert shapes == {name: tuple(p.shape) for name, p in reference.state_dict().items()}
    count = sum(p.numel() for p in built.parameters())
    if cfg.stated_params:
        assert abs(count / cfg.stated_params - 1) <= 0.01, count
    inputs = packing_spec(cfg)
    assert (inputs.image_embed_dim > 0) == (cfg.hunyuan_video_15.task_type == "i2v")
    assert inputs.channel_condition == ("latent_concat" if inputs.image_embed_dim else "")


def test_imontage_weights_load_strictly_by_diffusers_names(folder: Path) -> None:
    model = build_model(tiny_config())
    tensors: dict[str, torch.Tensor] = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    model.load_state_dict(tensors, strict=True)

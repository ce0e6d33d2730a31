"""The single-device DiT: shapes per segment, no cross-sample influence, preset sizes."""

import pytest
import torch
from conftest import REPO, tiny_model_config
from torch import nn

from imontage.config import load_recipe
from imontage.models import count_parameters, packing_spec
from imontage.models.common import Sample, Segment, pack_samples
from imontage.models.common.sequence import unpatchify_segments
from imontage.models.dit.model import DiT, build_dit


def randomised(model: DiT, seed: int = 0) -> DiT:
    """adaLN-zero makes a fresh model ignore its input; random weights make every path live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def mixed_samples(g: torch.Generator) -> list[Sample]:
    def seg(kind: str, role: str, t: int, h: int, w: int) -> Segment:
        return Segment(kind, role, torch.randn(3, t, h, w, generator=g))

    return [
        Sample([Segment("text", text="recolour the red circle blue"), seg("image", "condition", 1, 16, 16),
                seg("image", "target", 1, 16, 24)]),
        Sample([Segment("text", text="a clip"), seg("video", "target", 3, 8, 12)]),
        Sample([seg("image", "condition", 1, 8, 8), seg("image", "condition", 1, 12, 8),
                seg("image", "target", 1, 8, 16), seg("video", "condition", 2, 8, 8)]),
    ]  # fmt: skip


def test_outputs_have_the_shape_of_every_input_segment() -> None:
    cfg = tiny_model_config()
    g = torch.Generator().manual_seed(0)
    samples = mixed_samples(g)
    batch = pack_samples(samples, packing_spec(cfg))
    out = randomised(DiT(cfg))(batch)
    assert out.shape == batch.tokens.shape
    per_segment = unpatchify_segments(out, batch, cfg.patch_size)
    for sample, outputs in zip(samples, per_segment, strict=True):
        for segment, output in zip(sample.segments, outputs, strict=True):
            if segment.kind == "text":
                assert output is None
            else:
                assert output is not None and output.shape == segment.data.shape


def test_no_token_influences_another_sample() -> None:
    cfg = tiny_model_config()
    g = torch.Generator().manual_seed(1)
    batch = pack_samples(mixed_samples(g), packing_spec(cfg))
    batch.tokens.requires_grad_(True)
    model = randomised(DiT(cfg))
    out = model(batch)
    owner = batch.sample_index()
    out[owner == 1].square().sum().backward()
    grad = batch.tokens.grad
    assert grad is not None
    assert grad[owner == 1].abs().sum() > 0  # the sample's own tokens matter...
    assert torch.count_nonzero(grad[owner != 1]) == 0  # ...no other sample's do


def test_packing_does_not_change_a_samples_output() -> None:
    cfg = tiny_model_config()
    g = torch.Generator().manual_seed(2)
    samples = mixed_samples(g)
    spec = packing_spec(cfg)
    model = randomised(DiT(cfg))
    packed = model(pack_samples(samples, spec))
    alone = torch.cat([model(pack_samples([s], spec)) for s in samples])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_timestep_is_per_token_and_clean_tokens_use_zero() -> None:
    cfg = tiny_model_config()
    spec = packing_spec(cfg)
    g = torch.Generator().manual_seed(3)
    batch = pack_samples(mixed_samples(g), spec)
    model = randomised(DiT(cfg))
    noisy = batch.replace(timesteps=torch.where(batch.target_mask, 0.7, 0.0))
    assert not torch.allclose(model(batch), model(noisy))


def test_precomputed_text_embeddings() -> None:
    cfg = tiny_model_config(text_encoder="precomputed")
    spec = packing_spec(cfg)
    g = torch.Generator().manual_seed(4)
    embeds = torch.randn(5, cfg.text_dim, generator=g)
    sample = Sample(
        [Segment("text", data=embeds), Segment("image", "target", torch.randn(3, 1, 8, 8, generator=g))]
    )
    batch = pack_samples([sample], spec)
    assert batch.text_embeds is not None and batch.is_text.sum() == 5
    model = randomised(DiT(cfg))
    changed = pack_samples([Sample([Segment("text", data=embeds * 2), sample.segments[1]])], spec)
    assert not torch.allclose(model(batch)[5:], model(changed)[5:])
    with pytest.raises(ValueError, match="precomputed"):
        model(pack_samples([Sample([Segment("text", text="words"), sample.segments[1]])], spec))


def test_a_fresh_model_starts_as_identity_blocks_and_zero_output() -> None:
    """adaLN-zero: every block's gates and the output layer start at zero."""
    cfg = tiny_model_config()
    model = DiT(cfg)
    batch = pack_samples(mixed_samples(torch.Generator().manual_seed(5)), packing_spec(cfg))
    assert torch.count_nonzero(model(batch)) == 0


def test_explicit_flash_backend_without_flash_attn_is_an_error() -> None:
    cfg = tiny_model_config(attention_backend="flash")
    batch = pack_samples(mixed_samples(torch.Generator().manual_seed(6)), packing_spec(cfg))
    with pytest.raises(RuntimeError, match="flash-attn"):
        DiT(cfg)(batch)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    cfg = tiny_model_config()
    batch = pack_samples(mixed_samples(torch.Generator().manual_seed(7)), packing_spec(cfg))
    grads = []
    for checkpointing in (False, True):
        model = randomised(DiT(cfg))
        model.gradient_checkpointing = checkpointing
        model(batch).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("preset", ["dit_tiny", "dit_1b", "dit_14b"])
def test_preset_parameter_counts_are_within_3_percent(preset: str) -> None:
    cfg = load_recipe(REPO / "configs/recipes/quickstart.yaml", [f"model={preset}"]).model
    assert cfg.stated_params > 0
    model = build_dit(cfg, device="meta")  # shapes only: the 14B preset would need 56 GB
    count = count_parameters(model)
    assert abs(count / cfg.stated_params - 1) <= 0.03, (preset, count)
    assert all(isinstance(b, nn.Module) for b in model.blocks) and len(model.blocks) == cfg.depth


def test_data_prediction_returns_the_velocity_of_its_clean_estimate() -> None:
    """prediction=data: the network predicts x0 and forward returns (x_t − x0) / max(t, t_min)."""
    cfg = tiny_model_config(prediction="data", min_timestep=0.05)
    batch = pack_samples(mixed_samples(torch.Generator().manual_seed(8)), packing_spec(cfg))
    t = torch.rand(batch.tokens.shape[0], generator=torch.Generator().manual_seed(9))
    batch = batch.replace(timesteps=torch.where(batch.target_mask, t, 0.0))
    model = DiT(cfg)  # a fresh model's last layer outputs 0, so x0 = 0 and the velocity is x_t / t
    expected = batch.tokens / batch.timesteps.clamp(min=0.05)[:, None]
    torch.testing.assert_close(model(batch), expected)
    randomised(model)
    raw = DiT(tiny_model_config())  # the same weights with velocity prediction give the raw x0
    raw.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        model(batch), (batch.tokens - raw(batch)) / batch.timesteps.clamp(min=0.05)[:, None]
    )

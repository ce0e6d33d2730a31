"""Channel conditions and per-sample conditioning through packing, token selection and padding."""

import pytest
import torch

from imontage.models.common import PackingSpec, Sample, Segment, pack_samples
from imontage.models.common.sequence import patchify
from imontage.objectives.flow_matching import select_tokens
from imontage.parallel.collectives import pad_packed_batch

SPEC = PackingSpec(in_channels=4, patch_size=(1, 2, 2), max_text_len=8)


def conditioned_sample(key: str, frames: int, seed: int) -> Sample:
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(4, frames, 4, 6, generator=g)
    extra = torch.randn(3, frames, 4, 6, generator=g)
    return Sample(
        [
            Segment("text", data=torch.randn(5, 7, generator=g)),
            Segment("latent", "condition", data=torch.randn(4, 1, 4, 6, generator=g)),
            Segment("latent", "target", data=video, channel_condition=extra),
        ],
        key=key,
        pooled_text=torch.randn(9, generator=g),
        image_embeds=torch.randn(3, 2, generator=g),
        guidance=float(seed),
    )


def test_channel_condition_rows_are_the_patches_of_the_channel_concatenation() -> None:
    samples = [conditioned_sample("a", 2, 0), conditioned_sample("b", 3, 1)]
    batch = pack_samples(samples, SPEC)
    assert batch.channel_condition is not None
    for span in batch.spans:
        rows = slice(span.start, span.start + span.length)
        segment = samples[span.sample].segments[span.index]
        if segment.channel_condition is None:  # text and the condition image: zero rows
            assert not batch.channel_condition[rows].any()
            continue
        joined = torch.cat([batch.tokens[rows], batch.channel_condition[rows]], dim=1)
        both = torch.cat([segment.data, segment.channel_condition])  # type: ignore[list-item]
        torch.testing.assert_close(joined, patchify(both, SPEC.patch_size), rtol=0, atol=0)


def test_per_sample_fields_stack_and_survive_selection_and_padding() -> None:
    samples = [conditioned_sample("a", 2, 0), conditioned_sample("b", 1, 1)]
    batch = pack_samples(samples, SPEC)
    assert batch.pooled_text is not None and batch.image_embeds is not None and batch.guidance is not None
    assert batch.pooled_text.shape == (2, 9) and batch.image_embeds.shape == (2, 3, 2)
    torch.testing.assert_close(batch.guidance, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(batch.pooled_text[1], samples[1].pooled_text)

    kept = select_tokens(batch, ~batch.is_text)
    assert kept.channel_condition is not None and kept.channel_condition.shape[0] == kept.tokens.shape[0]
    assert kept.pooled_text is batch.pooled_text  # per-sample: no row is dropped

    padded = pad_packed_batch(batch, 7)
    assert padded.tokens.shape[0] % 7 == 0 and padded.num_samples == 3
    assert (
        padded.channel_condition is not None and padded.channel_condition.shape[0] == padded.tokens.shape[0]
    )
    for name in ("pooled_text", "image_embeds", "guidance"):
        value = getattr(padded, name)
        assert value.shape[0] == 3 and not value[2].any(), name  # a zero row for the padding sequence


def test_a_batch_where_only_some_samples_carry_a_field_is_refused() -> None:
    with_pooled = conditioned_sample("a", 1, 0)
    without = conditioned_sample("b", 1, 1)
    without.pooled_text = None
    with pytest.raises(ValueError, match="sample b has no pooled_text"):
        pack_samples([with_pooled, without], SPEC)


def test_a_channel_condition_must_lie_over_its_segment() -> None:
    with pytest.raises(ValueError, match="does not lie over"):
        Segment("latent", "target", data=torch.zeros(4, 2, 4, 6), channel_condition=torch.zeros(3, 1, 4, 6))

"""Imagic (Kawar et al., 2023) on a flow-matching model: edit one real image towards a target text.

The image is in the model's input space, ``[C, 1, H, W]``: pixels for the pixel-space DiT, a VAE
latent (normalised as latent shards store it) for a latent model such as Wan 2.1.

1. Embedding optimisation: from the target text's encoder features ``e_tgt`` ``[L, E]`` (what the
   model's text projection receives: the DiT's ``text_proj``, Wan's ``text_embedder``), Adam fits
   a free ``e_opt`` so that the frozen model reconstructs the image under it (the flow-matching
   loss with the image as the target segment).
2. Fine-tuning: with ``e_opt`` frozen, Adam fine-tunes every weight on the same loss, so the
   model reproduces the image's details near ``e_opt``.
3. Sampling: ``e = eta·e_tgt + (1 − eta)·e_opt`` for each eta, through the ordinary sampler with
   the embedding given as a precomputed text segment; eta = 0 reconstructs, larger eta edits more.

Text reaches the model as ``batch.text_embeds``, which :meth:`DiT.embed_text` reads in place of
its own encoder and Wan reads as its cross-attention context, so neither the model nor the
sampler needs a code path of its own for Imagic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from imontage.config.imagic import ImagicConfig, ImagicSampleConfig, PhaseConfig
from imontage.models.common import PackedBatch, PackingSpec, Sample, Segment, pack_samples
from imontage.models.common.sequence import byte_tokenize, patch_grid
from imontage.models.registry import FAMILIES, family_of_module
from imontage.objectives.flow_matching import FlowMatching
from imontage.sample.grid import make_grid
from imontage.sample.sampler import sample_flow


@dataclass
class ImagicResult:
    image: torch.Tensor  # the input as edited, in model space: [C, 1, H, W] (pixels: resized)
    target_embedding: torch.Tensor  # e_tgt [L, E]
    optimised_embedding: torch.Tensor  # e_opt [L, E]
    etas: list[float]
    edits: list[torch.Tensor]  # one [C, 1, H, W] per eta, in model space
    # Reconstruction loss on fixed draws: "initial" (e_tgt), after "embedding", after "finetune".
    losses: dict[str, float] = field(default_factory=dict)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def text_width(model: nn.Module) -> int:
    """``E`` of the text features ``[L, E]`` the model reads from ``batch.text_embeds``.

    Imagic edits through that path, which a family names (``ModelFamily.imagic_text_width``) when
    the model reads it alone; HunyuanVideo also takes a pooled CLIP vector per sample, which an
    optimised ``[L, E]`` embedding would not move with it.
    """
    record = family_of_module(model)
    if record.imagic_text_width is None:
        editable = ", ".join(name for name, r in FAMILIES.items() if r.imagic_text_width is not None)
        raise ValueError(f"Imagic edits with {editable} models; this one is a {record.name} model")
    return record.imagic_text_width(model)


def target_text_embedding(model: nn.Module, text: str, spec: PackingSpec) -> torch.Tensor:
    """``[L, E]``: the byte encoder's features of ``text``, the starting point of ``e_opt``."""
    encoder = getattr(model, "text_encoder", None)  # the DiT's byte encoder; Wan has none
    if encoder is None:
        raise ValueError(
            "the model takes precomputed text embeddings (text_encoder=precomputed): "
            "give the target text's embedding [L, E] instead of its string"
        )
    ids = byte_tokenize(text, spec.max_text_len)
    if ids.numel() == 0:
        raise ValueError("the target text is empty")
    device = model_device(model)
    with torch.no_grad():
        return encoder(ids.to(device), torch.arange(ids.numel(), device=device)).float()


def check_embedding(model: nn.Module, embedding: torch.Tensor, spec: PackingSpec) -> torch.Tensor:
    """The embedding as float32 on the model's device, cut to the text length the model packs."""
    text_dim = text_width(model)
    if embedding.dim() != 2 or embedding.shape[1] != text_dim or embedding.shape[0] == 0:
        raise ValueError(f"a text embedding must be [L, {text_dim}], got {tuple(embedding.shape)}")
    return embedding[: spec.max_text_len].float().to(model_device(model))


def resize_pixels(image: torch.Tensor, size: Sequence[int] = ()) -> torch.Tensor:
    """Pixels ``[C, 1, H, W]`` resized to ``size`` [H, W] (kept when empty), in [-1, 1]."""
    if size:
        image = F.interpolate(image.float(), size=tuple(size), mode="bilinear", antialias=True)
    return image.float().clamp(-1, 1)


def fit_image(
    image: torch.Tensor, spec: PackingSpec, size: Sequence[int] = (), latent: bool = False
) -> torch.Tensor:
    """The input ``[C, 1, H, W]`` checked against the model; it must divide into patches.

    Pixels come back in [-1, 1], resized to ``size`` [H, W] if given. A ``latent`` keeps its values
    (normalised latents are not bounded) and its size: resize the pixels before encoding them.
    """
    if image.dim() != 4 or image.shape[1] != 1 or image.shape[0] != spec.in_channels:
        kind = "a latent" if latent else "an image"
        raise ValueError(
            f"expected {kind} [{spec.in_channels}, 1, H, W] (the model's channels), got {tuple(image.shape)}"
        )
    if latent and size:
        raise ValueError(
            "a latent is edited at its own size: imagic.image_size resizes pixels (set it to [])"
        )
    image = image.float() if latent else resize_pixels(image, size)
    try:
        patch_grid(image.shape, spec.patch_size)
    except ValueError as error:
        raise ValueError(f"{error}: resize it (imagic.image_size=[H,W]) or crop it") from error
    return image


def reconstruction_batch(
    image: torch.Tensor, embedding: torch.Tensor, spec: PackingSpec, copies: int
) -> PackedBatch:
    """``copies`` samples of (text, image as the target), packed: one (t, noise) draw per copy.

    The embedding here only fixes the text rows' count; :func:`with_text_embedding` fills them.
    """
    sample = Sample(
        [Segment("text", data=embedding.detach().cpu()), Segment("image", "target", image)], "imagic"
    )
    return pack_samples([sample] * copies, spec)


def with_text_embedding(batch: PackedBatch, embedding: torch.Tensor) -> PackedBatch:
    """The batch with text row i of every copy reading ``embedding[i]``; gradients reach ``embedding``."""
    rows = embedding[batch.text_index]  # [N, E]; non-text rows have index 0 and are zeroed below
    return batch.replace(text_embeds=torch.where(batch.is_text[:, None], rows, torch.zeros_like(rows)))


def interpolate_embedding(target: torch.Tensor, optimised: torch.Tensor, eta: float) -> torch.Tensor:
    """``eta·e_tgt + (1 − eta)·e_opt``; eta outside [0, 1] extrapolates."""
    return eta * target + (1.0 - eta) * optimised


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter takes a gradient inside: the model cannot change, and no weight grads are built."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(model.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)


@torch.no_grad()
def reconstruction_loss(
    model: nn.Module,
    batch: PackedBatch,
    embedding: torch.Tensor,
    objective: FlowMatching,
    seed: int,
    draws: int,
) -> float:
    """Mean loss over ``draws`` fixed (t, noise) draws: comparable across phases, unlike a step's loss."""
    generator = torch.Generator().manual_seed(seed)
    embedded = with_text_embedding(batch, embedding)
    return sum(float(objective(model, embedded, generator).loss) for _ in range(draws)) / draws


def _minimise(
    loss_of: Callable[[], torch.Tensor], parameters: list[torch.Tensor], phase: PhaseConfig, bar: tqdm | None
) -> None:
    """Adam on ``parameters`` for ``phase.steps`` steps at a constant ``phase.lr``, as the paper does."""
    optimiser = torch.optim.Adam(parameters, lr=phase.lr)
    for _ in range(phase.steps):
        loss = loss_of()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()


def optimise_embedding(
    model: nn.Module,
    batch: PackedBatch,
    target: torch.Tensor,
    phase: PhaseConfig,
    objective: FlowMatching,
    generator: torch.Generator,
    bar: tqdm | None = None,
) -> torch.Tensor:
    """Stage 1: ``e_opt`` ``[L, E]`` fitted from ``target`` with every model weight frozen."""
    embedding = target.detach().clone().requires_grad_(True)
    model.eval()
    with frozen(model):
        _minimise(
            lambda: objective(model, with_text_embedding(batch, embedding), generator).loss,
            [embedding],
            phase,
            bar,
        )
    return embedding.detach()


def finetune_model(
    model: nn.Module,
    batch: PackedBatch,
    embedding: torch.Tensor,
    phase: PhaseConfig,
    objective: FlowMatching,
    generator: torch.Generator,
    bar: tqdm | None = None,
) -> None:
    """Stage 2: fine-tune the model in place on the same loss, ``embedding`` held fixed."""
    embedded = with_text_embedding(batch, embedding.detach())
    model.train()
    _minimise(
        lambda: objective(model, embedded, generator).loss,
        [p for p in model.parameters() if p.requires_grad],
        phase,
        bar,
    )
    model.eval()


def sample_edits(
    model: nn.Module,
    image: torch.Tensor,
    target: torch.Tensor,
    optimised: torch.Tensor,
    etas: Sequence[float],
    spec: PackingSpec,
    settings: ImagicSampleConfig,
    seed: int,
    bar: tqdm | None = None,
) -> list[torch.Tensor]:
    """One ``[C, 1, H, W]`` edit per eta, all from the same noise: columns differ by the embedding only."""
    model.eval()
    edits = []
    for eta in etas:
        embedding = interpolate_embedding(target, optimised, eta).detach().cpu()
        sample = Sample(
            [Segment("text", data=embedding), Segment("image", "target", torch.zeros_like(image))]
        )
        generator = torch.Generator().manual_seed(seed)
        [[_, edit]] = sample_flow(
            model,
            [sample],
            spec,
            settings.steps,
            settings.guidance,
            settings.shift,
            generator,
            model_device(model),
        )
        assert edit is not None
        edits.append(edit)
        if bar is not None:
            bar.update()
    return edits


def imagic_grid(image: torch.Tensor, edits: Sequence[torch.Tensor]) -> np.ndarray:
    """``[H, W, 3]`` uint8: the input, a gap, then one panel per eta in order."""
    return make_grid([[[image], list(edits)]])


def run_imagic(
    model: nn.Module,
    spec: PackingSpec,
    image: torch.Tensor,
    cfg: ImagicConfig,
    text: str | None = None,
    target_embedding: torch.Tensor | None = None,
    progress: bool = False,
    latent: bool = False,
) -> ImagicResult:
    """The three stages on one ``[C, 1, H, W]`` image; fine-tunes ``model`` in place.

    The image is pixels, resized to ``cfg.image_size``, or with ``latent`` a VAE latent, edited at
    its own size (its pixels were resized, if at all, before encoding). The target is ``text``
    (through the model's byte encoder) or ``target_embedding`` ``[L, E]``. Every random draw
    comes from CPU generators seeded from ``cfg.seed``: the result is repeatable.
    """
    if (text is None) == (target_embedding is None):
        raise ValueError("give the target as text or as an embedding [L, E], not both or neither")
    image = fit_image(image, spec, () if latent else cfg.image_size, latent=latent)
    if target_embedding is None:
        assert text is not None
        target_embedding = target_text_embedding(model, text, spec)
    target = check_embedding(model, target_embedding, spec)
    batch = reconstruction_batch(image, target, spec, cfg.loss.copies).to(model_device(model))
    objective = FlowMatching(cfg.loss.t_mean, cfg.loss.t_std, cfg.loss.shift, text_dropout=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)

    def report(embedding: torch.Tensor) -> float:
        return reconstruction_loss(model, batch, embedding, objective, cfg.seed + 1, cfg.loss.eval_draws)

    total = cfg.embedding.steps + cfg.finetune.steps + len(cfg.eta)
    with tqdm(total=total, disable=not progress, desc="imagic", dynamic_ncols=True) as bar:
        losses = {"initial": report(target)}
        bar.set_description("imagic: embedding")
        optimised = optimise_embedding(model, batch, target, cfg.embedding, objective, generator, bar)
        losses["embedding"] = report(optimised)
        bar.set_description("imagic: fine-tune")
        finetune_model(model, batch, optimised, cfg.finetune, objective, generator, bar)
        losses["finetune"] = report(optimised)
        bar.set_description("imagic: sampling")
        edits = sample_edits(model, image, target, optimised, cfg.eta, spec, cfg.sample, cfg.seed + 2, bar)
    return ImagicResult(image, target.cpu(), optimised.cpu(), list(cfg.eta), edits, losses)

"""Text embeddings from a text encoder that also sees an image (HunyuanVideo-I2V's LLaVA).

A family's text recipe with an :class:`~imontage.models.common.family.ImageInText` (``TextEncoding.image``)
is run by :class:`ImageTextEncoder`: the prompt in the recipe's template, whose one image placeholder
token becomes the image's token positions, through a ``LlavaForConditionalGeneration`` with the image's
pixel values; of the hidden state the recipe names, the image tokens' rows (every ``interleave``-th)
are stored ahead of the text's valid rows (the template's first ``crop_start`` tokens and the tokens that
open the assistant turn cut), as the family's pipeline feeds its transformer.

Which image the encoder sees (``--text-images``, :data:`TEXT_IMAGES`):

- ``first``: the sample's first condition segment, an image (a sample without one is left out,
  ``unpackable``): what the pipeline does with its one condition image;
- ``black``: an all-black image, as the pipeline encodes its negative prompt.

docs/data.md ("Latent shards") says why a sample of several input images shows the encoder only its
first.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Protocol

import numpy as np
import torch

from imontage.data.problems import DataError
from imontage.data.records import SampleRecord
from imontage.data.shards import RawSample
from imontage.models.common.family import ImageInText

TEXT_IMAGES = ("first", "black")
IMAGE_TEXT_ENCODER_CLASS = "LlavaForConditionalGeneration"  # for a folder whose config names none


class ImageTextRecipe(Protocol):
    """What :class:`ImageTextEncoder` reads of a text recipe (``imontage.dataprep.encode.TextRecipe``)."""

    @property
    def name(self) -> str: ...
    @property
    def template(self) -> str: ...
    @property
    def crop_start(self) -> int: ...
    @property
    def hidden_state(self) -> int | None: ...
    @property
    def image(self) -> ImageInText | None: ...
    @property
    def images(self) -> str: ...
    def to_json(self) -> dict[str, Any]: ...


def _config_id(config: Any, key: str, folder: str | os.PathLike[str]) -> int:
    value = getattr(config, key, None)
    if not isinstance(value, int):
        raise ValueError(
            f"{folder}: config.json has no integer '{key}', which the image-aware text recipe reads"
        )
    return value


class ImageTextEncoder:
    """A LLaVA-style text encoder with its tokenizer and image processor: (text, image) -> ``[L, E]``."""

    def __init__(
        self, model: Any, tokenizer: Any, processor: Any, max_length: int, recipe: ImageTextRecipe
    ) -> None:
        if recipe.image is None:
            raise ValueError(f"text recipe '{recipe.name}' shows its encoder no image")
        if recipe.hidden_state is None:
            raise ValueError(f"text recipe '{recipe.name}' names no hidden state")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_length = max_length
        self.recipe = recipe
        self.image_token = _config_id(model.config, "image_token_index", "text encoder")
        self.pad_token = _config_id(model.config, "pad_token_id", "text encoder")
        marker = tokenizer.convert_tokens_to_ids(self.spec.marker)
        if not isinstance(marker, int) or marker == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no token {self.spec.marker!r}, which ends the template's turn headers"
            )
        self.marker = marker

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        tokenizer_folder: str | os.PathLike[str] | None,
        processor_folder: str | os.PathLike[str] | None,
        device: str | torch.device,
        dtype: torch.dtype,
        max_length: int,
        recipe: ImageTextRecipe,
        model_loader: Any,
    ) -> ImageTextEncoder:
        """``model_loader(folder, default_class, dtype)``: the transformers model of ``folder``
        (``imontage.dataprep.encode.pretrained_model``: safetensors only)."""
        transformers = importlib.import_module("transformers")
        if recipe.image is None:
            raise ValueError(f"text recipe '{recipe.name}' shows its encoder no image")
        model = model_loader(folder, IMAGE_TEXT_ENCODER_CLASS, dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(tokenizer_folder or folder))
        processor_class = getattr(transformers, recipe.image.processor)
        processor = processor_class.from_pretrained(os.fspath(processor_folder or folder))
        return cls(model.to(device), tokenizer, processor, max_length, recipe)

    @property
    def name(self) -> str:
        return type(self.model).__name__

    @property
    def spec(self) -> ImageInText:
        """How the recipe shows the encoder its image."""
        if self.recipe.image is None:
            raise ValueError(f"text recipe '{self.recipe.name}' shows its encoder no image")
        return self.recipe.image

    def pixel_values(self, pixels: torch.Tensor | None) -> torch.Tensor:
        """The processor's pixel values of an image ``[3, 1, H, W]`` in [-1, 1], handed to it as the
        8-bit RGB PIL image a pipeline is given; None: an all-black image (its values do not depend on
        its size)."""
        from PIL import Image

        if pixels is None:
            image = Image.new("RGB", (64, 64), 0)
        else:
            rgb = ((pixels[:, 0].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
            image = Image.fromarray(np.ascontiguousarray(rgb.numpy()), "RGB")
        return self.processor(images=image, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def encode(self, text: str, pixels: torch.Tensor | None) -> torch.Tensor:
        """``[L, E]`` float32: the image tokens' rows (every ``interleave``-th), then the text's valid
        rows, of ``text`` with the image ``pixels`` (``[3, 1, H, W]`` in [-1, 1]; None: a black one)."""
        recipe, spec = self.recipe, self.spec
        tokens = self.tokenizer(
            recipe.template.format(text),
            max_length=self.max_length + recipe.crop_start,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tokens["input_ids"][0], tokens["attention_mask"][0]  # [S], [S]
        placed = (ids == self.image_token).nonzero().flatten().tolist()
        if placed != [spec.start]:
            raise ValueError(
                f"the tokenised template holds the image token at {placed}, the recipe's template at "
                f"[{spec.start}]: the tokenizer is not the text encoder's"
            )
        # The placeholder becomes the image's token positions; the attention mask is what is not the
        # model's padding token, the positions count the attended tokens (as the pipeline builds them).
        expanded = torch.cat(
            [ids[: spec.start], ids.new_full((spec.tokens,), self.image_token), ids[spec.start + 1 :]]
        )
        attention = (expanded != self.pad_token).to(mask.dtype)  # [S + tokens - 1]
        positions = (attention.cumsum(-1) - 1).masked_fill_(attention == 0, 1)
        device = next(self.model.parameters()).device
        output = self.model(
            input_ids=expanded[None].to(device),
            attention_mask=attention[None].to(device),
            position_ids=positions[None].to(device),
            pixel_values=self.pixel_values(pixels).to(device),
            output_hidden_states=True,
        )
        assert recipe.hidden_state is not None  # checked when built
        hidden = output.hidden_states[recipe.hidden_state][0]  # [S + tokens - 1, E]
        shift = spec.tokens - 1  # text positions after the image lie this much further on
        markers = (ids == self.marker).nonzero().flatten().tolist()
        if len(markers) == 2:  # the assistant's header truncated away: the pipeline cuts at the end
            markers.append(len(ids) - 1)
        if not markers:
            raise ValueError(f"the tokenised template holds no {spec.marker!r}")
        assistant = markers[-1] + 1  # the first position after the assistant turn's header
        rows = torch.cat(
            [hidden[recipe.crop_start + shift : assistant + shift - spec.cut], hidden[assistant + shift :]]
        )
        valid = (
            torch.cat([mask[recipe.crop_start : assistant - spec.cut], mask[assistant:]]).bool().to(device)
        )
        image_rows = hidden[spec.start : spec.start + spec.tokens : spec.interleave]
        return torch.cat([image_rows, rows[valid]]).float().cpu()


def text_image(
    raw: RawSample, record: SampleRecord, fitted: dict[int, torch.Tensor], which: str
) -> torch.Tensor | None:
    """The image the text encoder sees for a sample (``which``, one of :data:`TEXT_IMAGES`): its
    first condition segment's pixels ``[3, 1, H, W]`` (``first``; a :class:`DataError`
    ``unpackable`` when that is no image in pixels), or None for a black one."""
    if which == "black":
        return None
    if which != "first":
        raise ValueError(f"--text-images {which} is not one of {', '.join(TEXT_IMAGES)}")
    index = next((i for i, entry in enumerate(record.segments) if entry.role == "condition"), None)
    pixels = None if index is None else fitted.get(index)
    if index is None or pixels is None or pixels.shape[1] != 1:
        what = (
            "it has no condition segment"
            if index is None
            else f"segment {index}, its first condition, is not an image in pixels"
        )
        raise DataError.of(
            "unpackable", raw.url, raw.key,
            f"the text encoder sees the first condition image (--text-images first) and {what}; "
            "--text-images black shows it a black image",
        )  # fmt: skip
    return pixels

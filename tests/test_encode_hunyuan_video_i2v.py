"""tools/encode_shards.py for HunyuanVideo-I2V (``--text-recipe hunyuan_video_i2v``): a tiny random
``LlavaForConditionalGeneration`` built from transformers configs (a Llama text model, a CLIP vision
tower of 576 patches, a word-level tokenizer with Llama 3's special tokens and ``<image>``), a tiny
``AutoencoderKLHunyuanVideo`` and a tiny CLIP text model encode iMontage's six tasks into what diffusers'
``HunyuanVideoImageToVideoPipeline.encode_prompt`` computes from the same models and the sample's first
condition image, bit for bit; the CocktailMix recipe on HunyuanVideo-I2V then trains on those shards.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import runpy
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from latent_shards import (
    LATENT_CHANNELS,
    LLAMA_SPECIALS,
    POOLED_DIM,
    WORDS,
    save_tiny_clip,
    save_tiny_text_encoder,
    save_tiny_vae,
)
from PIL import Image
from safetensors.torch import load, load_file

from imontage.config import load_recipe
from imontage.data.shards import ShardWriter, read_shard
from imontage.dataprep import encode
from imontage.dataprep.encode import Encoders, EncodeSettings, TextRecipe, encode_shards
from imontage.dataprep.image_text import ImageTextEncoder
from imontage.dataprep.testing import image_bytes
from imontage.train.logger import read_metrics
from imontage.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs/recipes/imontage_hunyuan_video_i2v.yaml"
LLAVA_DIM = 16  # the Llama's width: the text rows' E, the tiny HunyuanVideo's text_dim
IMAGE_ROWS = 576 // 2  # the pipeline's image tokens, every 2nd (latent_concat)
TASKS = {  # task -> (condition images, target images, text): iMontage's six, as montage samples
    "editing": (1, 1, "the red circle moves left"),
    "character_reference": (2, 1, "a image of the blue square of the first image moves up"),
    "conditioned_reference": (2, 1, "the green circle of image 1 moves right of the red square"),
    "style_reference": (2, 1, "a red circle image of the second image"),
    "multi_view": (1, 3, "the blue circle left right and up"),
    "storyboard": (1, 3, "a video of the green square moves down then left then up"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, busy cores


def save_tiny_llava(folder: Path, template: str) -> dict[str, Path]:
    """A random LLaVA (a 3-layer Llama of width LLAVA_DIM, a 2-layer CLIP vision tower whose 24x24 patches
    of a 48x48 crop are the pipeline's 576 image tokens), a word-level tokenizer (the template's words,
    WORDS, digits; Llama 3's special tokens, ``<image>``, and ``\\n\\n`` as one token, as Llama 3's
    tokenizer reads it, so that ``<image>`` is token 5 as the template says) and a CLIPImageProcessor."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    specials = [*LLAMA_SPECIALS, "<image>"]
    vocab = {token: i for i, token in enumerate([*specials, "\n\n"])}
    spoken = [word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(template.replace("{}", " "))]
    for word in [*spoken, *WORDS, *map(str, range(10))]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.add_special_tokens([AddedToken(token, special=True) for token in specials])
    core.add_tokens([AddedToken("\n\n", normalized=False)])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>", unk_token="<unk>", padding_side="right",
    )  # fmt: skip
    tokenizer.save_pretrained(folder / "tokenizer")
    text = LlamaConfig(
        vocab_size=len(vocab), hidden_size=LLAVA_DIM, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=1,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=48,
        patch_size=2,
    )  # fmt: skip
    config = LlavaConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=vocab["<image>"],
        pad_token_id=vocab["<|end_of_text|>"],
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder / "text_encoder")
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(
        folder / "image_processor"
    )
    return {name: folder / name for name in ("text_encoder", "tokenizer", "image_processor")}


def montage_sample(task: str, index: int) -> tuple[str, dict[str, bytes]]:
    """A montage sample of ``task``: its condition and target images, 32x32 (4x4 latents)."""
    conditions, targets, text = TASKS[task]
    members, segments = {}, []
    for number in range(conditions + targets):
        members[f"{number}.png"] = image_bytes(32, 32, "png", seed=100 * index + number)
        role = "condition" if number < conditions else "target"
        segments.append({"role": role, "kind": "image", "member": f"{number}.png"})
    record = {"task": task, "text": f"{text} {index}", "segments": segments}
    return f"{task}-{index}", {**members, "json": json.dumps(record).encode()}


def condition_image(members: dict[str, bytes]) -> Image.Image:
    return Image.open(io.BytesIO(members["0.png"])).convert("RGB")


def doc_block(doc: str, starts: str) -> str:
    """The bash block of ``docs/<doc>`` that starts with ``starts``, its continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "docs" / doc).read_text(), re.S)
    [block] = [b.replace("\\\n", " ") for b in blocks if b.startswith(starts)]
    return block


def run_encode_loop(root: Path) -> None:
    """docs/data.md's encode_shards loop over the tasks, each command run in-process from ``root``."""
    loop = doc_block("data.md", "for task in ")
    match = re.fullmatch(r"for task in ([\w ]+); do\n(.*)\ndone\n", loop, re.S)
    assert match is not None, loop
    assert match.group(1).split() == list(TASKS)
    tool = runpy.run_path(str(REPO / "tools" / "encode_shards.py"), run_name="encode_shards")
    cwd = os.getcwd()
    os.chdir(root)  # the loop's paths are relative to where it runs
    try:
        for task in TASKS:
            command = shlex.split(match.group(2).replace("${task}", task).replace("$task", task))
            assert command[:2] == ["python", "tools/encode_shards.py"]
            assert tool["main"]([*command[2:], "--no-progress"]) == 0
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A sample of each task in ``data/<task>/shard-000000.tar``, the tiny models laid out as the
    diffusers folder ``models/HunyuanVideo-I2V``, docs/data.md's loop run on them (an empty negative
    prompt), and the pipeline holding the same models."""
    from diffusers import HunyuanVideoImageToVideoPipeline

    root = tmp_path_factory.mktemp("hv_i2v")
    folder = root / "models/HunyuanVideo-I2V"
    llava = save_tiny_llava(folder, TextRecipe.named("hunyuan_video_i2v").template)
    vae = save_tiny_vae(folder / "vae", family="hunyuan_video")
    _, clip_tokenizer = save_tiny_text_encoder(root / "clip")
    (folder / "tokenizer_2").symlink_to(clip_tokenizer)
    clip = save_tiny_clip(folder / "text_encoder_2")
    inputs: dict[str, dict[str, dict[str, bytes]]] = {}
    for task in TASKS:
        key, members = montage_sample(task, 0)
        inputs[task] = {key: members}
        (root / "data" / task).mkdir(parents=True)
        with ShardWriter(root / "data" / task / "shard-000000.tar") as writer:
            writer.add_sample(key, members)
    run_encode_loop(root)
    encoders = Encoders.load(
        str(vae), str(llava["text_encoder"]), str(llava["tokenizer"]), str(clip), str(clip_tokenizer),
        text_recipe="hunyuan_video_i2v", text_image_processor=str(llava["image_processor"]),
    )  # fmt: skip
    text, pooled = encoders.text, encoders.pooled
    assert isinstance(text, ImageTextEncoder) and pooled is not None
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=text.model, tokenizer=text.tokenizer, transformer=None, vae=encoders.vae.vae,
        scheduler=None, text_encoder_2=pooled.model, tokenizer_2=pooled.tokenizer, image_processor=text.processor,
    )  # fmt: skip
    latents = {task: root / "data" / f"{task}_latents" for task in TASKS}
    stored = {raw.key: raw for task in TASKS for raw in read_shard(str(latents[task] / "shard-000000.tar"))}
    return SimpleNamespace(
        root=root, inputs=inputs, stored=stored, encoders=encoders, pipe=pipe, latents=latents
    )


def pipeline_text(pipe: object, text: str, image: Image.Image, **kwargs: object) -> torch.Tensor:
    """The valid rows of what ``encode_prompt`` gives the transformer for ``text`` and ``image``."""
    return pipeline_prompt(pipe, text, image, **kwargs)[0]


def pipeline_prompt(
    pipe: object, text: str, image: Image.Image, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_prompt``'s valid text rows and its pooled CLIP text ``[E]``."""
    with torch.no_grad():
        embeds, pooled, mask = pipe.encode_prompt(  # type: ignore[attr-defined]
            image, text, device=torch.device("cpu"), dtype=torch.float32, **kwargs
        )
    return embeds[0][mask[0].bool()], pooled[0]


def test_text_equals_the_pipelines_encode_prompt_with_the_first_condition_image(run: SimpleNamespace) -> None:
    """For every task, one or two condition images: the stored text is ``encode_prompt``'s valid rows
    for the sample's text and its first condition image (288 image rows, then the text's), bit for
    bit; the pooled CLIP text is its pooled embedding; the negative prompt is the empty prompt with
    the pipeline's black image."""
    assert len(run.stored) == len(TASKS)
    for task, samples in run.inputs.items():
        for key, members in samples.items():
            raw = run.stored[key]
            record = json.loads(raw.members["json"])
            text = json.loads(members["json"])["text"]
            expected, pooled = pipeline_prompt(run.pipe, text, condition_image(members))
            stored = load(raw.members[record["text_embedding"]])["text_embedding"]
            torch.testing.assert_close(stored, expected, rtol=0, atol=0)
            assert stored.shape[0] > IMAGE_ROWS and stored.shape[1] == LLAVA_DIM
            assert record["text_encoder"] == {"model": "LlavaForConditionalGeneration", "tokens": stored.shape[0],
                                              "max_length": 256, "recipe": "hunyuan_video_i2v", "image": "first"}  # fmt: skip
            torch.testing.assert_close(
                load(raw.members[record["pooled_text"]])["pooled_text"], pooled, rtol=0, atol=0
            )
        if (
            task == "character_reference"
        ):  # another of its condition images gives other rows: the first is seen
            other = Image.open(io.BytesIO(members["1.png"])).convert("RGB")
            assert not torch.equal(pipeline_text(run.pipe, text, other), stored)
    negative = load_file(run.latents["editing"] / encode.NEGATIVE)
    black = Image.new("RGB", (32, 48), 0)
    torch.testing.assert_close(negative["text_embedding"], pipeline_text(run.pipe, "", black), rtol=0, atol=0)
    manifest = json.loads((run.latents["editing"] / encode.MANIFEST).read_text())
    recipe = manifest["text_encoder"]["recipe"]
    assert (recipe["crop_start"], recipe["hidden_state"], recipe["images"]) == (103, -3, "first")
    assert recipe["image"] == {"processor": "CLIPImageProcessor", "tokens": 576, "start": 5, "interleave": 2,
                               "marker": "<|end_header_id|>", "cut": 4}  # fmt: skip


def test_at_the_tokenizers_own_crop_and_under_token_replace(run: SimpleNamespace) -> None:
    """Cropped where this tokenizer's template ends (the real one's ends at the record's 103), the text
    rows are the whole prompt and the ``\\n\\n`` after the assistant header, as the pipeline's own
    function gives them at that crop; ``hunyuan_video_i2v_token_replace`` takes every 4th image row, as
    ``encode_prompt(image_embed_interleave=4)`` (the pipeline's choice for ``token_replace``)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

    text, pipe = run.encoders.text, run.pipe
    members = run.inputs["editing"]["editing-0"]
    prompt = json.loads(members["json"])["text"]
    pixels = torch.tensor(np.asarray(condition_image(members))).permute(2, 0, 1)
    pixels = (pixels.float() / 127.5 - 1).unsqueeze(1)  # [3, 1, H, W] in [-1, 1]
    prefix = len(text.tokenizer(text.recipe.template.split("{}")[0])["input_ids"])
    assert prefix < text.recipe.crop_start
    recipe = text.recipe
    try:
        text.recipe = dataclasses.replace(recipe, crop_start=prefix)
        own = text.encode(prompt, pixels)
        text.recipe = TextRecipe.named("hunyuan_video_i2v_token_replace")
        sparse = text.encode(prompt, pixels)
    finally:
        text.recipe = recipe
    with torch.no_grad():
        embeds, mask = pipe._get_llama_prompt_embeds(
            condition_image(members), prompt, {**DEFAULT_PROMPT_TEMPLATE, "crop_start": prefix},
            device=torch.device("cpu"), dtype=torch.float32,
        )  # fmt: skip
    torch.testing.assert_close(own, embeds[0][mask[0].bool()], rtol=0, atol=0)
    words = len(text.tokenizer(prompt)["input_ids"]) - 1  # without <|begin_of_text|>
    assert own.shape == (IMAGE_ROWS + words + 1, LLAVA_DIM)
    expected = pipeline_text(pipe, prompt, condition_image(members), image_embed_interleave=4)
    torch.testing.assert_close(sparse, expected, rtol=0, atol=0)
    assert sparse.shape[0] == expected.shape[0] and expected.shape[0] < own.shape[0]


def test_black_shows_a_black_image_and_first_needs_a_condition_image(
    run: SimpleNamespace, tmp_path: Path
) -> None:
    """``--text-images black`` stores what the pipeline gives with a black image; under ``first`` a
    sample without a condition image is left out, named, as unpackable; the two folders' manifests differ."""
    members = {"0.png": image_bytes(32, 32, "png", seed=7)}
    record = {"task": "storyboard", "text": "the red square moves up",
              "segments": [{"role": "target", "kind": "image", "member": "0.png"}]}  # fmt: skip
    with ShardWriter(tmp_path / "text_only.tar") as writer:
        writer.add_sample("text-only", {**members, "json": json.dumps(record).encode()})
    folders = run.encoders.folders
    reports = {}
    for which in ("first", "black"):
        encoders = Encoders.load(
            folders["vae"], folders["text_encoder"], folders["tokenizer"], text_recipe="hunyuan_video_i2v",
            text_image_processor=folders["text_image_processor"], text_images=which,
        )  # fmt: skip
        [reports[which]] = encode_shards(
            str(tmp_path / "text_only.tar"),
            tmp_path / which,
            encoders,
            settings=EncodeSettings(),
            progress=False,
        )
    assert (reports["first"].samples, dict(reports["first"].problems)) == (0, {"unpackable": 1})
    assert (reports["black"].samples, dict(reports["black"].problems)) == (1, {})
    [raw] = read_shard(str(tmp_path / "black" / "text_only.tar"))
    stored = load(raw.members["text.safetensors"])["text_embedding"]
    expected = pipeline_text(run.pipe, record["text"], Image.new("RGB", (32, 32), 0))
    torch.testing.assert_close(stored, expected, rtol=0, atol=0)
    assert json.loads(raw.members["json"])["text_encoder"]["image"] == "black"
    manifests = [json.loads((tmp_path / w / encode.MANIFEST).read_text()) for w in ("first", "black")]
    assert manifests[0]["text_encoder"] != manifests[1]["text_encoder"]


def test_the_cocktailmix_recipe_trains_the_tiny_model_on_these_shards(
    run: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/recipes/imontage_hunyuan_video_i2v.yaml declares iMontage's six tasks as datasets with a
    curriculum (editing alone first, all six at the end) reading ``data/<task>_latents``; docs/recipes.md's
    command trains a tiny latent_concat HunyuanVideo-I2V at the LLaVA's width from its diffusers folder on
    the shards the loop wrote (text up to 288 image rows + 256 text rows, model.max_text_len)."""
    from omegaconf import OmegaConf

    from imontage.checkpoint.diffusers import build_diffusers_model
    from imontage.config.schema import ModelConfig

    recipe = load_recipe(RECIPE)
    assert [(d.name, d.shards) for d in recipe.data.datasets] == [
        (task, f"data/{task}_latents/shard-*.tar") for task in TASKS
    ]
    first, last = recipe.data.mixture[0], recipe.data.mixture[-1]
    assert (first.step, dict(first.weights)) == (0, {"editing": 1.0})
    assert set(last.weights) == set(TASKS) and all(w > 0 for w in last.weights.values())
    assert recipe.model.max_text_len == IMAGE_ROWS + 256
    tiny = {"text_dim": LLAVA_DIM, "in_channels": 2 * LATENT_CHANNELS + 1,
            "hunyuan_video": {"image_condition_type": "latent_concat", "guidance_embeds": False,
                              "pooled_projection_dim": POOLED_DIM}}  # fmt: skip
    preset = OmegaConf.load(REPO / "configs/model/hunyuan_video_tiny.yaml")
    transformer = run.root / "models/HunyuanVideo-I2V/transformer"
    if not transformer.exists():
        build_diffusers_model(
            OmegaConf.merge(OmegaConf.structured(ModelConfig), preset, tiny)
        ).save_pretrained(transformer)
    command = shlex.split(
        doc_block("recipes.md", "imontage-train configs/recipes/imontage_hunyuan_video_i2v.yaml")
    )
    assert command[:2] == ["imontage-train", "configs/recipes/imontage_hunyuan_video_i2v.yaml"]
    overrides = [
        *command[2:], f"run_dir={tmp_path / 'run'}", "train.progress=false", "train.checkpoint.every=0",
        "stages.sft.steps=3", "data.max_tokens=2048", "data.batch_size=1", "data.num_workers=0",
        "data.shuffle_buffer=0", "model=hunyuan_video_tiny", f"model.text_dim={LLAVA_DIM}",
        f"model.in_channels={2 * LATENT_CHANNELS + 1}", "model.hunyuan_video.image_condition_type=latent_concat",
        "model.hunyuan_video.guidance_embeds=false", f"model.hunyuan_video.pooled_projection_dim={POOLED_DIM}",
        "parallel=single", "train.precision=fp32",
    ]  # fmt: skip
    monkeypatch.chdir(run.root)  # the recipe's and the command's paths are relative to it
    run_dir = train(load_recipe(RECIPE, overrides))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] for r in records)  # finite
    assert all(r.get("task_samples/editing", 0) > 0 for r in records)  # the curriculum's first task

"""tools/encode_shards.py for HunyuanVideo 1.5: tiny random encoders built from transformers configs
(a Qwen2.5-VL text model with a chat-template tokenizer, a ByT5 T5 encoder, a SigLIP vision model) and
a tiny ``AutoencoderKLHunyuanVideo15`` encode shards into what diffusers'
``HunyuanVideo15ImageToVideoPipeline`` computes from the same models: ``encode_prompt``'s two text
embeddings (their valid rows), ``encode_image``'s SigLIP tokens and ``_get_image_latents``' latent.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from latent_shards import WORDS, write_pixel_shards
from PIL import Image
from safetensors.torch import load, load_file

from imontage.data.shards import read_shard
from imontage.dataprep import encode
from imontage.dataprep.encode import Encoders, EncodeSettings, VideoVAE, decode_latent_sample, encode_shards
from imontage.dataprep.testing import image_bytes, video_bytes
from imontage.models.registry import FAMILIES

QWEN_DIM, BYT5_DIM, SIGLIP_DIM, LATENT_CHANNELS = 16, 8, 8, 8
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
# A chat template of Qwen's form (turns between <|im_start|> and <|im_end|>, the assistant's opened).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = {  # long enough to outlast the pipeline's crop of 108 tokens, longer than this tokenizer's system turn
    "glyph": 'a sign that says "OPEN" and \u201cbig sale\u201d moves left, then the red circle moves up and '
    "the blue square moves down to the green circle",  # glyph text: OPEN, big sale
    "plain": "the red circle moves up, then the blue square moves left and the green circle moves right "
    "of the red square, a video of the circle",  # no quoted text: no ByT5 rows
}


def save_tiny_qwen(folder: Path, system_message: str) -> tuple[Path, Path]:
    """A 3-layer random Qwen2.5-VL text model and a word-level tokenizer (the system message's words,
    WORDS, Qwen's chat tokens) with a Qwen-form chat template."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    spoken = [word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(system_message)]
    vocab = {token: i for i, token in enumerate(QWEN_SPECIALS)}
    for word in [*spoken, *WORDS, "system", "user", "assistant"]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.add_special_tokens([AddedToken(token, special=True) for token in QWEN_SPECIALS])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        padding_side="right",
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder / "tokenizer")
    config = Qwen2_5_VLTextConfig(
        vocab_size=len(vocab), hidden_size=QWEN_DIM, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]},
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2_5_VLTextModel(config).save_pretrained(folder / "text_encoder")
    return folder / "text_encoder", folder / "tokenizer"


def save_tiny_byt5(folder: Path) -> tuple[Path, Path]:
    """A 1-layer random T5 encoder over ByT5's byte vocabulary, and ByT5's tokenizer."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer_2")
    config = T5Config(
        vocab_size=len(tokenizer), d_model=BYT5_DIM, d_kv=4, num_heads=2, d_ff=16, num_layers=1,
        relative_attention_num_buckets=8,
    )  # fmt: skip
    T5EncoderModel(config).save_pretrained(folder / "text_encoder_2")
    return folder / "text_encoder_2", folder / "tokenizer_2"


def save_tiny_siglip(folder: Path) -> Path:
    """A 2-layer random SigLIP vision model (tokens of width SIGLIP_DIM) and its image processor at 32x32."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=SIGLIP_DIM, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=16,
    )  # fmt: skip
    SiglipVisionModel(config).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_tiny_vae(folder: Path) -> Path:
    """HunyuanVideo 1.5's VAE class (4x16x16 compression) at a tiny width, LATENT_CHANNELS channels."""
    from diffusers import AutoencoderKLHunyuanVideo15

    AutoencoderKLHunyuanVideo15(
        latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 16, 16, 16), layers_per_block=1
    ).save_pretrained(folder)
    return folder


def i2v_sample(key: str) -> tuple[str, dict[str, bytes]]:
    """A 32x64 condition image and a 5-frame 32x64 target clip: latents [8, 1, 2, 4] and [8, 2, 2, 4]."""
    segments = [{"role": "condition", "kind": "image", "member": "0.png"},
                {"role": "target", "kind": "video", "member": "1.mp4"}]  # fmt: skip
    seed = len(key)
    members = {"0.png": image_bytes(32, 64, seed=seed), "1.mp4": video_bytes(5, 32, 64, seed=seed)}
    return key, {**members, "json": json.dumps({"text": TEXTS[key], "segments": segments}).encode()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The two samples encoded with --text-recipe hunyuan_video_15 (and an empty negative prompt), and
    diffusers' image-to-video pipeline holding the same models."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    root = tmp_path_factory.mktemp("hv15")
    system = FAMILIES["hunyuan_video_15"].text_encoding().chat_system  # type: ignore[misc]
    assert system is not None
    qwen, qwen_tokenizer = save_tiny_qwen(root, system)
    byt5, byt5_tokenizer = save_tiny_byt5(root)
    siglip, vae = save_tiny_siglip(root / "image_encoder"), save_tiny_vae(root / "vae")
    spec = write_pixel_shards(root / "pixels", [[i2v_sample(key) for key in TEXTS]])
    encoders = Encoders.load(
        str(vae), str(qwen), str(qwen_tokenizer), image=str(siglip), text_recipe="hunyuan_video_15",
        text_2=str(byt5), tokenizer_2=str(byt5_tokenizer),
    )  # fmt: skip
    settings = EncodeSettings(negative_prompt="")
    [report] = encode_shards(spec, root / "out", encoders, settings=settings, progress=False)
    assert encoders.text is not None and encoders.text_2 is not None and encoders.image is not None
    pipe = HunyuanVideo15ImageToVideoPipeline(
        text_encoder=encoders.text.model, tokenizer=encoders.text.tokenizer, transformer=None,
        vae=encoders.vae.vae, scheduler=None, text_encoder_2=encoders.text_2.model,
        tokenizer_2=encoders.text_2.tokenizer, guider=None, image_encoder=encoders.image.model,
        feature_extractor=encoders.image.processor,
    )  # fmt: skip
    samples = {raw.key: raw for raw in read_shard(str(root / "out" / "pixels-000000.tar"))}
    return SimpleNamespace(root=root, report=report, encoders=encoders, pipe=pipe, samples=samples)


def pipeline_text(pipe: object, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid rows of both text embeddings ``encode_prompt`` gives for ``text``."""
    with torch.no_grad():
        embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(  # type: ignore[attr-defined]
            text, device=torch.device("cpu"), dtype=torch.float32
        )
    return embeds[0][mask[0].bool()], embeds_2[0][mask_2[0].bool()]


def test_text_embeddings_equal_the_pipelines_encode_prompt(run: SimpleNamespace) -> None:
    """Qwen2.5-VL's rows (the chat template, hidden_states[-3], the system turn cropped) and ByT5's
    (the quoted glyph text only) are ``encode_prompt``'s valid rows, bit for bit; a prompt without
    glyph text stores no ByT5 rows (the pipeline masks all of its), and the negative prompt likewise."""
    assert (run.report.samples, dict(run.report.problems)) == (2, {})
    for key, raw in run.samples.items():
        record = json.loads(raw.members["json"])
        qwen, byt5 = pipeline_text(run.pipe, TEXTS[key])
        stored = load(raw.members[record["text_embedding"]])["text_embedding"]
        torch.testing.assert_close(stored, qwen, rtol=0, atol=0)
        assert record["text_encoder"]["recipe"] == "hunyuan_video_15" and stored.shape[1] == QWEN_DIM
        assert stored.shape[0] >= 10
        assert record["text_encoder_2"]["tokens"] == byt5.shape[0]
        if key == "glyph":
            glyph = load(raw.members[record["text_embedding_2"]])["text_embedding"]
            torch.testing.assert_close(glyph, byt5, rtol=0, atol=0)
            assert glyph.shape == (len('Text "OPEN". Text "big sale". ') + 1, BYT5_DIM)  # bytes + </s>
        else:
            assert byt5.shape[0] == 0 and "text_embedding_2" not in record
    # The rows left after the crop are the prompt's last tokens and the closing ones; cropped where this
    # tokenizer's system turn ends, they are all of the prompt's (as the real tokenizer's 108 crops).
    text, recipe = run.encoders.text, run.encoders.text.recipe
    chat = [{"role": "system", "content": recipe.chat_system}, {"role": "user", "content": TEXTS["plain"]}]
    rendered = text.tokenizer.apply_chat_template([chat], tokenize=False, add_generation_prompt=True)[0]
    prefix = len(text.tokenizer(rendered.split(TEXTS["plain"])[0])["input_ids"])
    assert prefix < recipe.crop_start
    text.recipe = dataclasses.replace(recipe, crop_start=prefix)
    try:
        own = text.encode(TEXTS["plain"])
    finally:
        text.recipe = recipe
    with torch.no_grad():
        embeds, mask = run.pipe._get_mllm_prompt_embeds(
            text.model, text.tokenizer, TEXTS["plain"], torch.device("cpu"), crop_start=prefix
        )
    assert own is not None
    torch.testing.assert_close(own, embeds[0][mask[0].bool()], rtol=0, atol=0)
    words = len(text.tokenizer(TEXTS["plain"])["input_ids"])
    assert own.shape == (words + 3, QWEN_DIM)  # the prompt, <|im_end|>, <|im_start|>, assistant
    negative = load_file(run.root / "out" / encode.NEGATIVE)
    torch.testing.assert_close(negative["text_embedding"], pipeline_text(run.pipe, "")[0], rtol=0, atol=0)
    assert set(negative) == {"text_embedding"}  # the empty prompt has no glyph text


def test_the_recipe_is_the_pipelines_own_settings(run: SimpleNamespace) -> None:
    """The record reads the pipeline's defaults; they are the values its ``__init__`` sets for
    ``encode_prompt``. The manifest records both recipes and the image encoder's tokens."""
    recipe, recipe_2 = run.encoders.text.recipe, run.encoders.text_2.recipe
    pipe = run.pipe
    assert (
        recipe.chat_system == pipe.system_message
        and recipe.crop_start == pipe.prompt_template_encode_start_idx
    )
    assert run.encoders.text.max_length == pipe.tokenizer_max_length and recipe.hidden_state == -3
    assert run.encoders.text_2.max_length == pipe.tokenizer_2_max_length and recipe_2.hidden_state is None
    manifest = json.loads((run.root / "out" / encode.MANIFEST).read_text())
    assert manifest["vae"]["class"] == "AutoencoderKLHunyuanVideo15" and manifest["vae"]["spatial"] == 16
    assert manifest["text_encoder"]["recipe"]["chat_system"] == pipe.system_message
    assert manifest["text_encoder_2"]["recipe"]["select"].endswith("extract_glyph_texts")
    folders = run.encoders.folders
    with pytest.raises(ValueError, match="runs no second text encoder"):  # the plain recipe has none
        Encoders.load(folders["vae"], text_2=folders["text_encoder_2"])
    assert manifest["image_encoder"] == {
        "model": "SiglipVisionModel", "tokens": "last_hidden_state", "processor": "SiglipImageProcessor",
    }  # fmt: skip


def test_image_tokens_and_latents_equal_the_pipelines(run: SimpleNamespace) -> None:
    """The condition image's SigLIP tokens are ``encode_image``'s (its processor resizing, the last
    hidden state), bit for bit; its latent is ``_get_image_latents``' (the VAE's mode times the scaling
    factor), which the loader lays over the target as the I2V condition; the latents decode back."""
    raw = run.samples["glyph"]
    record = json.loads(raw.members["json"])
    image = Image.open(io.BytesIO(i2v_sample("glyph")[1]["0.png"])).convert("RGB")
    pipe = run.pipe
    with torch.no_grad():
        tokens = pipe.encode_image(image, 1, torch.device("cpu"), torch.float32)[0]
        latent = pipe._get_image_latents(pipe.vae, pipe.video_processor, image, 32, 64, torch.device("cpu"))[
            0
        ]
    torch.testing.assert_close(
        load(raw.members[record["image_embeds"]])["image_embeds"], tokens, rtol=0, atol=0
    )
    assert record["image_encoder"]["tokens"] == tokens.shape[0]
    stored = [load(raw.members[s["member"]])["latent"] for s in record["segments"]]
    assert [list(s.shape) for s in stored] == [[LATENT_CHANNELS, 1, 2, 4], [LATENT_CHANNELS, 2, 2, 4]]
    # Its processor scales by 1/255 and ours by 1/127.5: equal to rounding.
    torch.testing.assert_close(stored[0], latent)
    vae = VideoVAE.load(run.root / "vae")
    decoded = decode_latent_sample(raw, vae)
    assert [list(p.shape) for p in decoded if p is not None] == [[3, 1, 32, 64], [3, 5, 32, 64]]


def test_the_loader_packs_the_glyph_text_as_text_of_encoder_1_and_the_model_reads_it(
    run: SimpleNamespace,
) -> None:
    """With ``data.text_embeddings``, a model with a second text encoder (the tiny HunyuanVideo 1.5 I2V
    preset at these encoders' widths) gets each sample's ``text_embedding_2`` as a text segment of
    encoder 1 after its Qwen rows (none for the sample without glyph text), and runs on the batch."""
    from omegaconf import OmegaConf

    from imontage.config.schema import DataConfig
    from imontage.data import build_loader
    from imontage.models import build_model, packing_spec

    preset = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/model/hunyuan_video_1.5_tiny.yaml")
    widths = {"text_dim": QWEN_DIM, "in_channels": 2 * LATENT_CHANNELS + 1, "max_text_len": 1000,
              "hunyuan_video_15": {"out_channels": LATENT_CHANNELS, "text_embed_2_dim": BYT5_DIM,
                                   "image_embed_dim": SIGLIP_DIM}}  # fmt: skip
    from imontage.config.schema import ModelConfig

    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), preset, widths)
    spec = packing_spec(cfg)
    assert spec.text_embed_2_dim == BYT5_DIM
    data = DataConfig(
        shards=str(run.root / "out" / "*.tar"), batch_size=2, shuffle_buffer=0, text_embeddings=True
    )
    loader = build_loader(data, spec)
    batch = next(loader)
    loader.close()
    assert loader.last is not None and [key for _, key in loader.last.keys] == list(TEXTS)
    assert batch.text_encoder is not None and batch.text_embeds is not None
    glyph = load(run.samples["glyph"].members["text_2.safetensors"])["text_embedding"]
    rows = batch.is_text & (batch.text_encoder == 1)
    assert int(rows.sum()) == glyph.shape[0]
    torch.testing.assert_close(batch.text_embeds[rows, :BYT5_DIM], glyph, rtol=0, atol=0)
    assert bool((batch.text_embeds[rows, BYT5_DIM:] == 0).all())  # zero-padded to the Qwen width
    first = int(batch.cu_seqlens[1])
    assert not bool(rows[first:].any())  # the plain sample has none
    model = build_model(cfg)
    with torch.no_grad():
        out = model(batch)
    assert out.shape[0] == batch.tokens.shape[0] and bool(torch.isfinite(out).all())

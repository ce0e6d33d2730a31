"""tools/encode_shards.py with the Wan 2.2 VAE (TI2V-5B's): a tiny random ``AutoencoderKLWan`` with the
2.2 config options (48 latent channels, the residual blocks, a 2x2 pixel patchify before them, 4x16x16
compression) encodes shards as diffusers' Wan pipelines encode through it, and a sample whose latent
the 5B model's (1, 2, 2) patches do not divide is left out, named and counted.
"""

from __future__ import annotations

import io
import json
import logging
import runpy
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from latent_shards import write_pixel_shards
from safetensors.torch import load

from imontage.data.decode import decode_item
from imontage.data.shards import read_shard
from imontage.dataprep import encode
from imontage.dataprep.encode import EncodeSettings, VideoVAE, decode_latent_sample
from imontage.dataprep.testing import image_bytes, video_bytes

REPO = Path(__file__).resolve().parents[1]
Z_DIM = 48  # TI2V-5B's latent channels (configs/model/wan2.2_ti2v_5b.yaml, in_channels)
MEAN = [0.02 * c - 0.4 for c in range(Z_DIM)]
STD = [0.5 + 0.03 * c for c in range(Z_DIM)]


def save_tiny_wan22_vae(folder: Path) -> Path:
    """The Wan 2.2 VAE's config options (Wan-AI/Wan2.2-TI2V-5B-Diffusers' vae/: is_residual, patch_size
    2 on 12 = 3·2·2 channels, z_dim 48, scale factors 4 and 16) at a tiny width."""
    from diffusers import AutoencoderKLWan

    AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16, latents_mean=MEAN, latents_std=STD,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def sample(text: str, members: dict[str, bytes], kinds: list[str]) -> dict[str, bytes]:
    segments = [
        {"role": role, "kind": kind, "member": f"{i}.{'png' if kind == 'image' else 'mp4'}"}
        for i, (role, kind) in enumerate(zip(("condition", "target"), kinds, strict=False))
    ]
    return {**members, "json": json.dumps({"text": text, "segments": segments}).encode()}


SAMPLES = {
    # a 32x64 image and a 5-frame 32x64 clip: latents [48, 1, 2, 4] and [48, 2, 2, 4]
    "i2v": sample("the red circle", {"0.png": image_bytes(32, 64, seed=1), "1.mp4": video_bytes(5, 32, 64, seed=2)},
                  ["image", "video"]),
    # 48x48: a 3x3 latent, which the 5B model's (1, 2, 2) patches do not divide
    "odd": sample("the blue square", {"0.png": image_bytes(48, 48, seed=3)}, ["image"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The command-line tool run on the two samples with the tiny Wan 2.2 VAE; what it printed and logged."""
    root = tmp_path_factory.mktemp("wan22")
    vae = save_tiny_wan22_vae(root / "vae")
    spec = write_pixel_shards(root / "pixels", [list(SAMPLES.items())])
    tool = runpy.run_path(str(REPO / "tools" / "encode_shards.py"), run_name="encode_shards")
    log, printed = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger(encode.__name__).addHandler(handler)
    try:
        with redirect_stdout(printed):
            status = tool["main"]([spec, "--out", str(root / "out"), "--vae", str(vae), "--no-progress"])
    finally:
        logging.getLogger(encode.__name__).removeHandler(handler)
    return SimpleNamespace(
        status=status,
        printed=printed.getvalue(),
        log=log.getvalue(),
        vae=VideoVAE.load(vae),
        out=root / "out",
    )


def test_a_sample_the_5b_model_cannot_patchify_is_left_out_named_and_counted(
    encoded: SimpleNamespace,
) -> None:
    assert encoded.status == 0
    assert "left out: {'unpackable': 1}" in encoded.printed
    assert (
        "sample 'odd': unpackable: segment 0, member '0.png': its latent [48, 1, 3, 3] does not divide into "
        "the model's patches (1, 2, 2)" in encoded.log
    ), encoded.log
    assert [raw.key for raw in read_shard(str(encoded.out / "pixels-000000.tar"))] == ["i2v"]
    manifest = json.loads((encoded.out / encode.MANIFEST).read_text())["vae"]
    assert (manifest["class"], manifest["channels"], manifest["temporal"], manifest["spatial"]) == (
        "AutoencoderKLWan", Z_DIM, 4, 16,
    )  # fmt: skip


def test_latents_equal_the_wan_pipelines_vae_encoding(encoded: SimpleNamespace) -> None:
    """The image's latent is what ``WanImageToVideoPipeline.prepare_latents`` makes of the condition
    image under TI2V-5B's ``expand_timesteps`` (the image alone through the VAE, normalised); the clip's
    is what ``WanVideoToVideoPipeline.prepare_latents`` makes of the video before it adds noise (its
    scheduler here adds none). Both decode back to their pixel shapes."""
    from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline
    from diffusers.pipelines.wan.pipeline_wan_video2video import WanVideoToVideoPipeline

    [raw] = read_shard(str(encoded.out / "pixels-000000.tar"))
    record = json.loads(raw.members["json"])
    stored = [load(raw.members[s["member"]])["latent"] for s in record["segments"]]
    assert [list(s.shape) for s in stored] == [[Z_DIM, 1, 2, 4], [Z_DIM, 2, 2, 4]]
    source = next(
        r for r in read_shard(str(encoded.out.parent / "pixels" / "pixels-000000.tar")) if r.key == "i2v"
    )
    image, video = (s.data for s in decode_item(source, EncodeSettings().options).samples[0].segments[1:])
    vae = encoded.vae.vae
    pipe = SimpleNamespace(
        vae=vae, config=SimpleNamespace(expand_timesteps=True), vae_scale_factor_temporal=4,
        vae_scale_factor_spatial=16, scheduler=SimpleNamespace(add_noise=lambda latents, noise, t: latents),
    )  # fmt: skip
    with torch.no_grad():
        _, condition, _ = WanImageToVideoPipeline.prepare_latents(
            pipe, image[:, 0][None], 1, Z_DIM, 32, 64, 1, torch.float32, torch.device("cpu")
        )
        clip = WanVideoToVideoPipeline.prepare_latents(
            pipe,
            video[None],
            1,
            Z_DIM,
            32,
            64,
            torch.float32,
            torch.device("cpu"),
            timestep=torch.tensor([0]),
        )
    # The stored scale is 1/std in float64, the pipeline's float32's reciprocal: equal to rounding.
    torch.testing.assert_close(stored[0], condition[0])
    torch.testing.assert_close(stored[1], clip[0])
    decoded = decode_latent_sample(raw, encoded.vae)
    assert [list(p.shape) for p in decoded if p is not None] == [[3, 1, 32, 64], [3, 5, 32, 64]]

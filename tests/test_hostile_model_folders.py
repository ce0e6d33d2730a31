"""Model folders given to encode_shards (a VAE, text and image encoders; a VAE also to imontage-sample
and imontage-imagic) are untrusted input: each is checked against its own weights before diffusers
or transformers builds the model its config describes, so a config that claims a larger model than
its weights, a pickle in place of safetensors, or a config of the wrong kind ends in one line naming
the file, at once and without allocating what it claims; and a text encoder whose weights lack
some of its config's tensors is refused instead of being filled at random."""

from __future__ import annotations

import contextlib
import io
import json
import resource
import runpy
import shutil
import time
from pathlib import Path

import pytest
from latent_shards import save_tiny_encoders, write_pixel_shards

from imontage.checkpoint.components import check_component_folder, check_transformers_folder
from imontage.dataprep.encode import pretrained_model, vae_class_name
from imontage.untrusted import InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return save_tiny_encoders(tmp_path_factory.mktemp("models"))


class Variants:
    """Copies of a good model folder under ``root``, each with its config changed or its weights
    replaced by a pickle."""

    def __init__(self, good: Path, root: Path) -> None:
        self.good, self.root = good, root
        self.config = json.loads((good / "config.json").read_text())
        root.mkdir(parents=True, exist_ok=True)

    def changed(self, name: str, **changes: object) -> Path:
        folder = self.root / name
        shutil.copytree(self.good, folder)
        (folder / "config.json").write_text(json.dumps({**self.config, **changes}))
        return folder

    def pickled(self, weights: str) -> Path:
        folder = self.root / "pickled"
        folder.mkdir()
        shutil.copy(self.good / "config.json", folder)
        (folder / weights).write_bytes(b"\x80\x04not to be opened")
        return folder


def hostile_vaes(vae: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """{case: (folder, what its one-line error must say)} built from a good tiny AutoencoderKLWan."""
    made = Variants(vae, root)
    not_json = made.changed("not_json")
    (not_json / "config.json").write_text("<html>404</html>")
    return {
        "claims a terabyte": (made.changed("claims", base_dim=100_000), "has shape"),
        "claims more layers": (made.changed("deeper", num_res_blocks=1000), "more than the weights offered"),
        "wrong value kind": (made.changed("kind", dim_mult="wide"), "config.json"),
        "pickle only": (made.pickled("diffusion_pytorch_model.bin"), "pickle"),
        "not json": (not_json, "config.json"),
        "another class": (made.changed("other", _class_name="UNet2DConditionModel"), "VAE class"),
    }


def test_hostile_vae_folders_are_refused_at_once_naming_the_file(
    models: dict[str, str], tmp_path: Path
) -> None:
    for case, (folder, message) in hostile_vaes(Path(models["vae"]), tmp_path).items():
        start = time.perf_counter()
        with pytest.raises((InputError, ValueError)) as raised:
            check_component_folder(folder, vae_class_name(folder))
        elapsed = time.perf_counter() - start
        text = str(raised.value)
        assert message in text and str(folder) in text and "\n" not in text, (case, text)
        assert elapsed < 5.0, (case, elapsed)
    check_component_folder(models["vae"], "AutoencoderKLWan")  # the good folder passes


def hostile_text_encoders(text: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """{case: (folder, what its one-line error must say)} built from a good tiny UMT5 encoder."""
    made = Variants(text, root)
    return {
        "wider": (made.changed("wider", d_ff=10_000_000), "parameters, its weights hold"),
        "deeper": (made.changed("deeper", num_layers=3), "parameters, its weights hold"),
        "far deeper": (made.changed("far_deeper", num_layers=100_000), "more than the weights offered"),
        "not a model class": (
            made.changed("os", architectures=["logging"]),
            "not a transformers model class",
        ),
        "architectures a string": (made.changed("string", architectures="UMT5EncoderModel"), "architectures"),
        "pickle only": (made.pickled("pytorch_model.bin"), "pickle"),
    }


def test_hostile_text_encoder_folders_are_refused_at_once_naming_the_file(
    models: dict[str, str], tmp_path: Path
) -> None:
    for case, (folder, message) in hostile_text_encoders(Path(models["text_encoder"]), tmp_path).items():
        start = time.perf_counter()
        with pytest.raises((InputError, ValueError)) as raised:
            check_transformers_folder(folder, "UMT5EncoderModel")
        elapsed = time.perf_counter() - start
        text = str(raised.value)
        assert message in text and str(folder) in text and "\n" not in text, (case, text)
        assert elapsed < 5.0, (case, elapsed)
    check_transformers_folder(models["text_encoder"], "UMT5EncoderModel")  # the good folder passes


def test_weights_lacking_tensors_of_the_config_are_refused_not_filled_at_random(
    models: dict[str, str], tmp_path: Path
) -> None:
    """Two layers in the config, one in the weights plus an unrelated tensor as large as the
    missing layer: the meta-device check (sizes) passes, and the load names what is missing."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "padded"
    shutil.copytree(models["text_encoder"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": 2}))
    weights = load_file(folder / "model.safetensors")
    layer = sum(t.numel() for name, t in weights.items() if name.startswith("encoder.block.0."))
    save_file({**weights, "padding": torch.zeros(layer)}, folder / "model.safetensors")
    check_transformers_folder(folder, "UMT5EncoderModel")
    with pytest.raises(
        ValueError, match=r"its weights lack \d+ tensors of the UMT5EncoderModel .*encoder\.block\.1\."
    ):
        pretrained_model(folder, "UMT5EncoderModel", torch.float32)
    pretrained_model(models["text_encoder"], "UMT5EncoderModel", torch.float32)  # the good folder loads


def test_encode_shards_refuses_them_in_one_line_before_loading(
    models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pixels = write_pixel_shards(tmp_path / "pixels")
    tool = runpy.run_path(str(REPO / "tools" / "encode_shards.py"), run_name="encode_shards")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    vaes = hostile_vaes(Path(models["vae"]), tmp_path / "vaes")
    texts = hostile_text_encoders(Path(models["text_encoder"]), tmp_path / "texts")
    cases = {**{f"vae {case}": ("--vae", *folder) for case, folder in vaes.items()},
             **{f"text {case}": ("--text-encoder", *folder) for case, folder in texts.items()}}  # fmt: skip
    for case, (flag, folder, message) in cases.items():
        given = {"--vae": models["vae"], "--text-encoder": models["text_encoder"], flag: str(folder)}
        argv = [pixels, "--out", str(tmp_path / "out"), *(x for item in given.items() for x in item),
                "--tokenizer", models["tokenizer"], "--device", "cpu", "--no-progress"]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            assert tool["main"](argv) == 2, case
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, (case, err)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 256, grown_mib  # nothing of the claimed sizes was allocated
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tar"))

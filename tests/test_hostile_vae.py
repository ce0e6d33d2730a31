"""A VAE folder given to encode_shards (or imontage-sample, imontage-imagic) is untrusted input: it is
checked against its own weights before diffusers builds the model its config describes, so a config
that claims a larger VAE than its weights, a pickle in place of safetensors, or a config of the
wrong kind ends in one line naming the file, at once and without allocating what it claims."""

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

from imontage.checkpoint.diffusers import check_component_folder
from imontage.untrusted import InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return save_tiny_encoders(tmp_path_factory.mktemp("models"))


def hostile_vaes(vae: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """{case: (folder, what its one-line error must say)} built from a good tiny AutoencoderKLWan."""
    config = json.loads((vae / "config.json").read_text())
    root.mkdir(parents=True, exist_ok=True)

    def variant(name: str, **changes: object) -> Path:
        folder = root / name
        shutil.copytree(vae, folder)
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return folder

    pickled = root / "pickled"
    pickled.mkdir(parents=True)
    shutil.copy(vae / "config.json", pickled)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not to be opened")
    not_json = variant("not_json")
    (not_json / "config.json").write_text("<html>404</html>")
    return {
        "claims a terabyte": (variant("claims", base_dim=100_000), "has shape"),
        "claims more layers": (variant("deeper", num_res_blocks=1000), "more than the weights offered"),
        "wrong value kind": (variant("kind", dim_mult="wide"), "config.json"),
        "pickle only": (pickled, "pickle"),
        "not json": (not_json, "config.json"),
        "another class": (variant("other", _class_name="UNet2DConditionModel"), "VAE class"),
    }


def test_hostile_vae_folders_are_refused_at_once_naming_the_file(
    models: dict[str, str], tmp_path: Path
) -> None:
    for case, (folder, message) in hostile_vaes(Path(models["vae"]), tmp_path).items():
        start = time.perf_counter()
        with pytest.raises((InputError, ValueError)) as raised:
            from imontage.dataprep.encode import vae_class_name

            check_component_folder(folder, vae_class_name(folder))
        elapsed = time.perf_counter() - start
        text = str(raised.value)
        assert message in text and str(folder) in text and "\n" not in text, (case, text)
        assert elapsed < 5.0, (case, elapsed)
    check_component_folder(models["vae"], "AutoencoderKLWan")  # the good folder passes


def test_encode_shards_refuses_them_in_one_line_before_loading(
    models: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pixels = write_pixel_shards(tmp_path / "pixels")
    tool = runpy.run_path(str(REPO / "tools" / "encode_shards.py"), run_name="encode_shards")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for case, (folder, message) in hostile_vaes(Path(models["vae"]), tmp_path / "vaes").items():
        argv = [pixels, "--out", str(tmp_path / "out"), "--vae", str(folder), "--text-encoder",
                models["text_encoder"], "--tokenizer", models["tokenizer"], "--device", "cpu", "--no-progress"]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            assert tool["main"](argv) == 2, case
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, (case, err)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 256, grown_mib  # nothing of the claimed sizes was allocated
    assert not list((tmp_path / "out").glob("*.tar")) if (tmp_path / "out").exists() else True

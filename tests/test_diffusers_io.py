"""diffusers folders of the pretrained families: import, export, and the errors of bad folders.

diffusers' own tiny random ``WanTransformer3DModel`` stands in for imontage's Wan module (their
parameter names and shapes are equal by contract), saved with ``save_pretrained`` as one file and
as shards. Import then export must give the original tensors bit for bit; diffusers'
``from_pretrained`` must load the export and compute what the original computes.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from imontage.checkpoint import diffusers as dio
from imontage.config.model_file import check_model_config, model_config, read_model_config
from imontage.models.wan import diffusers_config as wan_config
from imontage.untrusted import ConversionError

sys.path.insert(0, str(REPO / "tools"))
import convert_checkpoint as convert_tool  # noqa: E402

TINY = {
    "patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
    "out_channels": 4, "text_dim": 16, "freq_dim": 8, "ffn_dim": 32, "num_layers": 2, "rope_max_seq_len": 32,
}  # fmt: skip
WAN_14B = {
    "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-06, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
}  # fmt: skip


def tiny_wan(seed: int = 0) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TINY).eval()
    model.to(torch.bfloat16)  # as the public checkpoints are stored...
    model.scale_shift_table.data = model.scale_shift_table.data.float()  # ...with one fp32 tensor, kept as is
    return model


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    return tiny_wan()


@pytest.fixture(scope="module", params=["single", "sharded"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, original) -> Path:
    path = tmp_path_factory.mktemp(request.param) / "transformer"
    original.save_pretrained(path, max_shard_size="4KB" if request.param == "sharded" else "10GB")
    assert (path / dio.INDEX).is_file() == (request.param == "sharded")
    return path


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = (
        [folder / dio.WEIGHTS]
        if (folder / dio.WEIGHTS).is_file()
        else sorted(folder.glob("*-of-*.safetensors"))
    )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def forward(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 2, 4, 4, generator=generator, dtype=torch.bfloat16)
    text = torch.randn(1, 5, 16, generator=generator, dtype=torch.bfloat16)
    with torch.no_grad():
        return model(latents, torch.tensor([500]), text, return_dict=False)[0]


# ------------------------------------------------------------------------------------------ config
def test_wan_config_maps_to_imontage_and_back() -> None:
    values = wan_config.model_config_from_diffusers({"_class_name": "WanTransformer3DModel", **WAN_14B})
    cfg = model_config(values, "test")  # the schema accepts it
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.mlp_hidden_size) == (5120, 40, 40, 13824)
    assert list(cfg.rope.bands) == [0, 22, 21, 21] and cfg.rope.pair_layout == "interleaved"
    assert (cfg.text_encoder, cfg.max_text_len, cfg.wan.image_dim) == ("precomputed", 512, 0)
    assert wan_config.diffusers_config(cfg) == WAN_14B


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs/model").glob("wan*.yaml")))
def test_every_wan_preset_has_a_diffusers_config_that_maps_back(preset: str) -> None:
    cfg = model_config(OmegaConf.to_container(OmegaConf.load(REPO / "configs/model" / preset)), preset)
    config = wan_config.diffusers_config(cfg)
    back = model_config(wan_config.model_config_from_diffusers(config), preset)
    for key in (
        "in_channels",
        "patch_size",
        "hidden_size",
        "depth",
        "num_heads",
        "mlp_hidden_size",
        "text_dim",
    ):
        assert back[key] == cfg[key], key
    assert back.rope == cfg.rope
    for key in ("out_channels", "freq_dim", "eps", "cross_attn_norm", "image_dim", "added_kv_proj_dim"):
        assert back.wan[key] == cfg.wan[key], key


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"num_heads_typo": 3}, "num_heads_typo"),
        ({"qk_norm": "rms_norm"}, "qk_norm"),
        ({"pos_embed_seq_len": 514}, "pos_embed_seq_len"),
        ({"ffn_dim": -1}, "ffn_dim"),
    ],
)
def test_a_bad_config_key_is_named_with_the_file(
    tmp_path: Path, folder: Path, change: dict, key: str
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for file in folder.iterdir():
        (bad / file.name).symlink_to(file)
    config = json.loads((folder / dio.CONFIG).read_text())
    (bad / dio.CONFIG).unlink()
    (bad / dio.CONFIG).write_text(json.dumps({**config, **change}))
    with pytest.raises(ConversionError, match=rf"{bad / dio.CONFIG}: key '{key}'"):
        dio.read_folder(bad, {})


# ---------------------------------------------------------------------------------- import / export
def test_import_then_export_is_bit_identical(tmp_path: Path, folder: Path, original) -> None:
    consolidated, cfg = dio.import_folder(folder, tmp_path / "wan.safetensors", shapes_of(original))
    assert cfg.family == "wan" and cfg.hidden_size == 24
    exported = dio.export_folder(consolidated, tmp_path / "export", expected=shapes_of(original))
    before, after = stored_tensors(folder), stored_tensors(exported)
    assert before.keys() == after.keys() == original.state_dict().keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name  # bf16 and the one fp32 tensor, restored
        assert torch.equal(after[name], tensor), name
    assert after["scale_shift_table"].dtype == torch.float32
    config, back = (json.loads((p / dio.CONFIG).read_text()) for p in (folder, exported))
    assert {k: v for k, v in back.items() if not k.startswith("_")} == {
        k: v for k, v in config.items() if not k.startswith("_")
    }
    assert (
        back["_class_name"] == "WanTransformer3DModel"
        and back["_diffusers_version"] == config["_diffusers_version"]
    )


def test_export_shards_and_diffusers_loads_it(tmp_path: Path, folder: Path, original) -> None:
    from diffusers import WanTransformer3DModel

    consolidated, _ = dio.import_folder(folder, tmp_path / "wan.safetensors", shapes_of(original))
    exported = dio.export_folder(
        consolidated, tmp_path / "export", max_shard_bytes=3000, expected=shapes_of(original)
    )
    index = json.loads((exported / dio.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert not (exported / dio.WEIGHTS).exists()
    loaded = WanTransformer3DModel.from_pretrained(exported, torch_dtype=torch.bfloat16).eval()
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(loaded.state_dict()[name].dtype)), name
    reference = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    assert torch.equal(forward(loaded), forward(reference))


def test_load_into_streams_every_tensor_into_a_module(folder: Path, original) -> None:
    other = tiny_wan(seed=7)
    assert not torch.equal(other.proj_out.weight, original.proj_out.weight)
    read = dio.load_into(other, folder)
    assert read.family == "wan" and read.dtypes["scale_shift_table"] == "F32"
    for name, tensor in original.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name


# --------------------------------------------------------------------------------------- bad folders
def copy_folder(folder: Path, to: Path) -> Path:
    to.mkdir()
    for file in folder.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def first_weights_file(folder: Path) -> Path:
    return folder / dio.WEIGHTS if (folder / dio.WEIGHTS).is_file() else sorted(folder.glob("*-of-*"))[0]


def rewrite(file: Path, change) -> None:
    with safe_open(str(file), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    change(tensors)
    save_file(tensors, str(file), metadata)


def test_a_missing_shard_is_named(tmp_path: Path, original) -> None:
    bad = tmp_path / "bad"
    original.save_pretrained(bad, max_shard_size="4KB")
    shard = first_weights_file(bad)
    shard.unlink()
    with pytest.raises(ConversionError, match=rf"{shard}: no such file \(named by .*index.json for tensor '"):
        dio.read_folder(bad, shapes_of(original))


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path: Path, folder: Path, original) -> None:
    bad = copy_folder(folder, tmp_path / "bad")
    file = first_weights_file(bad)
    with safe_open(str(file), framework="pt") as handle:
        name = next(iter(handle.keys()))

    def widen(tensors: dict) -> None:
        tensors[name] = torch.cat([tensors[name], tensors[name]])

    rewrite(file, widen)
    with pytest.raises(ConversionError, match=rf"{file}: tensor '{name}' has shape .*, the model's is"):
        dio.read_folder(bad, shapes_of(original))


def test_a_missing_tensor_is_named(tmp_path: Path, original) -> None:
    bad = tmp_path / "bad"
    original.save_pretrained(bad)
    rewrite(bad / dio.WEIGHTS, lambda tensors: tensors.pop("proj_out.bias"))
    with pytest.raises(ConversionError, match=rf"{bad / dio.WEIGHTS}: tensor 'proj_out.bias' missing"):
        dio.read_folder(bad, shapes_of(original))


def test_an_unexpected_tensor_is_named(tmp_path: Path, original) -> None:
    bad = tmp_path / "bad"
    original.save_pretrained(bad)
    rewrite(bad / dio.WEIGHTS, lambda tensors: tensors.update({"blocks.9.extra": torch.zeros(2)}))
    with pytest.raises(
        ConversionError, match=rf"{bad / dio.WEIGHTS}: tensor 'blocks.9.extra' is not in the model"
    ):
        dio.read_folder(bad, shapes_of(original))


class _Marker:
    """Unpickling it creates ``path``: proof that a file was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "model.pt", "weights.ckpt", "model.pth"])
def test_pickle_weights_are_refused_unopened(tmp_path: Path, folder: Path, name: str, monkeypatch) -> None:
    marker = tmp_path / "unpickled"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / dio.CONFIG).write_bytes((folder / dio.CONFIG).read_bytes())
    (bad / name).write_bytes(pickle.dumps(_Marker(marker)))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(ConversionError, match=rf"{bad / name}: a pickle checkpoint"):
        dio.read_folder(bad, {})
    with pytest.raises(ConversionError, match=rf"{bad / name}: a pickle checkpoint"):
        dio.read_folder(bad / name, {})  # the file itself given
    assert not marker.exists()


def test_an_index_naming_a_pickle_shard_is_refused(tmp_path: Path, folder: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / dio.CONFIG).write_bytes((folder / dio.CONFIG).read_bytes())
    (bad / "shard.bin").write_bytes(pickle.dumps(_Marker(tmp_path / "unpickled")))
    (bad / dio.INDEX).write_text(json.dumps({"weight_map": {"proj_out.bias": "shard.bin"}}))
    with pytest.raises(ConversionError, match=rf"{bad / 'shard.bin'}: a pickle checkpoint \(named by"):
        dio.read_folder(bad, {})
    assert not (tmp_path / "unpickled").exists()


def test_the_folder_must_match_the_recipe_model(folder: Path) -> None:
    _, _, cfg = read_model_config(folder)
    check_model_config(folder, cfg)  # its own config matches
    with pytest.raises(ConversionError, match=re.escape("family wan), the recipe's model.family is dit")):
        check_model_config(folder, OmegaConf.merge(cfg, {"family": "dit"}))
    with pytest.raises(ConversionError, match="ffn_dim: 32 != 64"):
        check_model_config(folder, OmegaConf.merge(cfg, {"mlp_hidden_size": 64}))


# ------------------------------------------------------------------- imontage's Wan, end to end
WAN_TINY_PRESET = REPO / "configs/model/wan_tiny.yaml"


def wan_tiny_folder(path: Path, **changes: object) -> tuple[Path, torch.nn.Module]:
    """A diffusers folder of the shape of configs/model/wan_tiny.yaml (random weights, bf16 + one fp32)."""
    from diffusers import WanTransformer3DModel

    preset = OmegaConf.merge(OmegaConf.load(WAN_TINY_PRESET), changes)
    torch.manual_seed(3)
    model = WanTransformer3DModel(
        patch_size=list(preset.patch_size), num_attention_heads=preset.num_heads,
        attention_head_dim=preset.hidden_size // preset.num_heads, in_channels=preset.in_channels,
        out_channels=preset.wan.out_channels, text_dim=preset.text_dim, freq_dim=preset.wan.freq_dim,
        ffn_dim=preset.mlp_hidden_size, num_layers=preset.depth,
    ).eval()  # fmt: skip
    model.to(torch.bfloat16)
    model.scale_shift_table.data = model.scale_shift_table.data.float()
    model.save_pretrained(path, max_shard_size="8KB")
    return path, model


def test_imontage_wan_imports_and_exports_through_the_tool(tmp_path: Path, capsys) -> None:
    from diffusers import WanTransformer3DModel

    from imontage.checkpoint.convert import load_consolidated
    from imontage.models import build_model

    folder, original = wan_tiny_folder(tmp_path / "transformer")
    preset = tmp_path / "wan_imported.yaml"
    assert convert_tool.main(["import-diffusers", str(folder), "--out", str(tmp_path / "wan.safetensors"),
                              "--config-out", str(preset)]) == 0  # fmt: skip
    cfg = model_config(OmegaConf.to_container(OmegaConf.load(preset)), str(preset))  # a usable preset
    assert cfg.family == "wan" and list(cfg.rope.bands) == [0, 4, 2, 2]
    model, _ = load_consolidated(tmp_path / "wan.safetensors")  # imontage's own Wan module
    assert type(model) is type(build_model(cfg, device="meta"))
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert convert_tool.main(["export-diffusers", str(tmp_path / "wan.safetensors"), "--config", str(preset),
                              "--out", str(tmp_path / "export"), "--max-shard-size", "6KB"]) == 0  # fmt: skip
    before, after = stored_tensors(folder), stored_tensors(tmp_path / "export")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "export", torch_dtype=torch.bfloat16).eval()
    reference = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    latents = torch.randn(1, 4, 2, 4, 4, dtype=torch.bfloat16)
    text = torch.randn(1, 5, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        outputs = [m(latents, torch.tensor([500]), text, return_dict=False)[0] for m in (loaded, reference)]
    assert torch.equal(*outputs)


def test_a_bad_folder_stops_the_tool_with_its_name(tmp_path: Path, capsys) -> None:
    folder, _ = wan_tiny_folder(tmp_path / "transformer")
    shard = sorted(folder.glob("*-of-*.safetensors"))[1]
    shard.unlink()
    assert convert_tool.main(["import-diffusers", str(folder), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert f"import-diffusers: {shard}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    from latent_shards import write_latent_shards

    return write_latent_shards(tmp_path_factory.mktemp("latents"))


def test_init_from_diffusers_starts_training_from_the_folder(tmp_path: Path, latent_shards: str) -> None:
    from latent_shards import TEXT_DIM

    from imontage.config import load_recipe
    from imontage.config.loader import RecipeError
    from imontage.train.logger import read_metrics
    from imontage.train.trainer import Trainer, train

    folder, original = wan_tiny_folder(tmp_path / "transformer", text_dim=TEXT_DIM)
    recipe = REPO / "configs/recipes/quickstart.yaml"
    overrides = ["model=wan_tiny", "model.prediction=velocity", f"model.text_dim={TEXT_DIM}", f"data.shards={latent_shards}",
                 "data.text_embeddings=true", "data.batch_size=2", "data.max_tokens=0", "data.shuffle_buffer=0",
                 "train.progress=false", "train.sample.every=0", "train.checkpoint.every=0",
                 "stages=[{name: sft, objective: flow_matching, steps: 3}]", f"model.init_from_diffusers={folder}"]  # fmt: skip
    with pytest.raises(RecipeError, match=r"model.init_from_diffusers.*ffn_dim: 64 != 128"):
        load_recipe(recipe, [*overrides, "model.mlp_hidden_size=128"])
    with pytest.raises(RecipeError, match=r"model.init_from_diffusers.*no such folder: .*nowhere"):
        load_recipe(recipe, [*overrides, f"model.init_from_diffusers={tmp_path / 'nowhere'}"])
    with pytest.raises(
        RecipeError, match=r"model.init_from_diffusers.*family wan\), the recipe's model.family is dit"
    ):
        load_recipe(recipe, [f"model.init_from_diffusers={folder}"])  # quickstart's own DiT
    trainer = Trainer(load_recipe(recipe, [*overrides, f"run_dir={tmp_path / 'probe'}"]))
    trainer.maybe_resume()
    trainer.start_stage(trainer.stages[0])
    weights = trainer.backend.model.state_dict()
    for name, tensor in original.state_dict().items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], tensor.float()), name
    trainer.loader.close()
    trainer.logger.close()

    run_dir = train(load_recipe(recipe, [*overrides, f"run_dir={tmp_path / 'run'}"]))
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    step = run_dir / "checkpoints" / "step_000003"
    assert (
        convert_tool.main(
            ["export-diffusers", str(step), "--weights", "live", "--out", str(tmp_path / "out")]
        )
        == 0
    )
    exported = stored_tensors(tmp_path / "out")
    trained = load_file(str(step / "model.safetensors"))
    for name, tensor in original.state_dict().items():  # dtypes of the folder it started from
        assert exported[name].dtype == tensor.dtype and torch.equal(
            exported[name], trained[name].to(tensor.dtype)
        )
    assert not torch.equal(
        exported["proj_out.weight"], original.state_dict()["proj_out.weight"]
    )  # it trained


def test_imontage_hunyuan_video_round_trips_bit_for_bit(tmp_path: Path) -> None:
    from diffusers import HunyuanVideoTransformer3DModel

    from imontage.checkpoint.convert import load_consolidated
    from imontage.models.hunyuan_video import diffusers_config as hunyuan_config

    cfg = model_config(
        OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/hunyuan_video_tiny.yaml")), "preset"
    )
    torch.manual_seed(5)
    original = HunyuanVideoTransformer3DModel(**hunyuan_config.diffusers_config(cfg)).to(torch.bfloat16)
    original.save_pretrained(tmp_path / "transformer", max_shard_size="16KB")
    consolidated, imported = dio.import_folder(tmp_path / "transformer", tmp_path / "hunyuan.safetensors")
    assert imported.family == "hunyuan_video"
    model, _ = load_consolidated(consolidated)  # imontage's own HunyuanVideo module
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor.float()), name
    exported = dio.export_folder(consolidated, tmp_path / "export", max_shard_bytes=16 * 2**10)
    before, after = stored_tensors(tmp_path / "transformer"), stored_tensors(exported)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    loaded = HunyuanVideoTransformer3DModel.from_pretrained(exported, torch_dtype=torch.bfloat16)
    assert loaded.config["num_single_layers"] == 1


RECIPE = REPO / "configs/recipes/quickstart.yaml"


def folder_training_overrides(folder: Path, shards: str, run_dir: Path, layout: str) -> list[str]:
    """quickstart on the tiny Wan of ``folder``, 3 steps of one sample each, under ``layout``."""
    from latent_shards import TEXT_DIM

    return ["model=wan_tiny", "model.prediction=velocity", f"model.text_dim={TEXT_DIM}", f"data.shards={shards}",
            "data.text_embeddings=true", "data.batch_size=1", "data.max_tokens=0", "data.shuffle_buffer=0",
            "train.progress=false", "train.sample.every=0", "train.checkpoint.every=0",
            f"parallel={layout}", "parallel.device=cpu", f"run_dir={run_dir}",
            "stages=[{name: sft, objective: flow_matching, steps: 3}]", f"model.init_from_diffusers={folder}"]  # fmt: skip


@pytest.fixture(scope="module")
def wan_training_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latent_shards import TEXT_DIM

    return wan_tiny_folder(tmp_path_factory.mktemp("wan") / "transformer", text_dim=TEXT_DIM)[0]


@pytest.fixture(scope="module")
def one_process_folder_losses(
    tmp_path_factory: pytest.TempPathFactory, wan_training_folder: Path, latent_shards: str
) -> list[float]:
    """The reference of every DP=1 layout: the same recipe on one process (engine local)."""
    from imontage.config import load_recipe
    from imontage.train.logger import read_metrics
    from imontage.train.trainer import train

    where = tmp_path_factory.mktemp("single") / "run"
    overrides = folder_training_overrides(wan_training_folder, latent_shards, where, "single")
    return [r["loss"] for r in read_metrics(train(load_recipe(RECIPE, overrides)))]


def init_from_diffusers_on_zero3(
    rank: int, world_size: int, overrides: list[str], folder: str
) -> list[float]:
    """Check that this rank's parameters (its TP slices) are the folder's tensors, then train."""
    import deepspeed
    from megatron.core import parallel_state

    from imontage.config import load_recipe
    from imontage.parallel.parallelize import tensor_split
    from imontage.train.logger import read_metrics
    from imontage.train.trainer import Trainer

    expected = stored_tensors(Path(folder))
    trainer = Trainer(load_recipe(RECIPE, overrides))
    trainer.maybe_resume()
    trainer.start_stage(trainer.stages[0])
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in trainer.backend.engine.module.named_parameters():
        split = tensor_split(name)
        full = expected[name].float()
        want = split.shard(full, tp_rank, tp_size) if split is not None else full
        with deepspeed.zero.GatheredParameters([param]):
            assert torch.equal(param.detach(), want), f"rank {rank}: {name}"
    trainer.loader.close()
    trainer.fit()
    return [r["loss"] for r in read_metrics(trainer.run_dir)] if rank == 0 else []


@pytest.mark.parametrize("layout", ["zero3_dp2", "tp2", "tp2_sp", "ulysses2"])
def test_zero3_ranks_start_from_a_diffusers_folder(
    tmp_path: Path, latent_shards: str, wan_training_folder: Path, one_process_folder_losses, layout: str
) -> None:
    """Every rank starts from the folder's tensors (its slice under TP); with DP=1 (TP=2, TP=2+SP,
    Ulysses=2) both ranks read the one process's batches and draw its noise, so each step's loss
    is the one process's. DP=2 ranks read their own batches and noise: no reference to equal."""
    from distributed import run_ranks

    overrides = folder_training_overrides(wan_training_folder, latent_shards, tmp_path / "run", layout)
    losses = run_ranks(init_from_diffusers_on_zero3, 2, overrides, str(wan_training_folder), timeout=300)[0]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    if layout != "zero3_dp2":
        assert losses == pytest.approx(one_process_folder_losses, rel=1e-4)


# ------------------------------------------------------- HunyuanVideo under ZeRO-3 from its folder
def hunyuan_training_overrides(folder: Path, shards: str, run_dir: Path, layout: str) -> list[str]:
    """quickstart on the tiny HunyuanVideo (T2V, distilled guidance) of ``folder``, 3 steps under ``layout``."""
    from latent_shards import POOLED_DIM, TEXT_DIM

    return ["model=hunyuan_video_tiny", "model.prediction=velocity", f"model.text_dim={TEXT_DIM}",
            f"model.hunyuan_video.pooled_projection_dim={POOLED_DIM}", "flow_matching.embedded_guidance=4.0",
            f"data.shards={shards}", "data.text_embeddings=true", "data.batch_size=2", "data.max_tokens=0",
            "data.shuffle_buffer=0", "train.progress=false", "train.sample.every=0", "train.checkpoint.every=0",
            "train.ema_decay=0", f"parallel={layout}", "parallel.device=cpu", f"run_dir={run_dir}",
            "stages=[{name: sft, objective: flow_matching, steps: 3}]", f"model.init_from_diffusers={folder}"]  # fmt: skip


def test_zero3_tp2_sp_hunyuan_video_starts_from_its_folder_and_equals_one_process(tmp_path: Path) -> None:
    """HunyuanVideo under ZeRO-3 with TP=2 + SP from model.init_from_diffusers: each rank's slices
    (the single-stream proj_out's joined [attention | MLP] columns too) are the folder's tensors,
    each step's loss is the one process's, and the TP checkpoint consolidates to the one process's
    final weights."""
    from conditioned_shards import write_conditioned_shards
    from distributed import run_ranks
    from latent_shards import pixel_samples

    from imontage.checkpoint.diffusers import build_diffusers_model
    from imontage.config import load_recipe
    from imontage.train.logger import read_metrics
    from imontage.train.trainer import train

    shards = write_conditioned_shards(tmp_path / "data", [[(k, m) for k, m, _ in pixel_samples()]], i2v=False)
    preset = load_recipe(RECIPE, hunyuan_training_overrides(Path("unused"), shards, tmp_path, "single")[:-1])
    torch.manual_seed(5)
    reference = build_diffusers_model(preset.model)
    with torch.no_grad():  # every weight random (diffusers zero-initialises some), so no path is silent
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape) * 0.05)
    folder = tmp_path / "transformer"
    reference.save_pretrained(folder)

    single = train(
        load_recipe(RECIPE, hunyuan_training_overrides(folder, shards, tmp_path / "single", "single"))
    )
    expected = [r["loss"] for r in read_metrics(single)]
    overrides = hunyuan_training_overrides(folder, shards, tmp_path / "tp2_sp", "tp2_sp")
    losses = run_ranks(init_from_diffusers_on_zero3, 2, overrides, str(folder), timeout=300)[0]
    assert len(losses) == 3 and losses == pytest.approx(expected, rel=1e-4)

    from imontage.checkpoint.convert import consolidate

    consolidated = load_file(
        consolidate(tmp_path / "tp2_sp/checkpoints/step_000003", tmp_path / "c.safetensors", "live")
    )
    final = load_file(single / "checkpoints/step_000003/model.safetensors")
    assert consolidated.keys() == final.keys()
    for name in ("single_transformer_blocks.0.proj_out.weight", "transformer_blocks.0.attn.to_q.weight"):
        torch.testing.assert_close(consolidated[name], final[name], rtol=1e-3, atol=1e-5)

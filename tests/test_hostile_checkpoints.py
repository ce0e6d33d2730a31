"""Bad diffusers folders, checkpoints and recipes: one line naming the file and key, exit status 2.

Each case is built from the formats (docs/checkpoints.md): a ``config.json`` or safetensors index
that is not JSON, nested too deep, or of the wrong type; a ``state.json`` lacking what a
conversion reads; a config whose sizes no tensor can have or whose layer count the weights do not
back; recipe interpolations that loop or point nowhere. The tools run in this process (an escaped
exception fails the test as a traceback would); the unbounded cases (class 2) run in a subprocess
that measures their time and peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, PoisonedObjective, tiny_model_config
from omegaconf import OmegaConf
from safetensors.torch import save_file

from imontage.checkpoint import convert
from imontage.checkpoint import diffusers as dio
from imontage.checkpoint import store as ckpt
from imontage.models.dit.model import build_dit
from imontage.train import cli as train_cli

sys.path.insert(0, str(REPO / "tools"))
import convert_checkpoint as convert_tool  # noqa: E402

TINY_WAN = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 2,
    "attention_head_dim": 12, "in_channels": 4, "out_channels": 4, "text_dim": 16, "freq_dim": 8,
    "ffn_dim": 32, "num_layers": 2, "rope_max_seq_len": 32,
}  # fmt: skip
DEEP = "[" * 100_000 + "]" * 100_000
HTML = "<!DOCTYPE html><html><body>404 Not Found</body></html>"


def tool_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Runs ``convert_checkpoint.py argv``; asserts exit 2 and one stderr line, which it returns."""
    assert convert_tool.main(argv) == 2
    return one_line(capsys.readouterr().err)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # tqdm bars aside
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """diffusers' tiny random WanTransformer3DModel, saved in shards with an index."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{k: v for k, v in TINY_WAN.items() if not k.startswith("_")})
    path = tmp_path_factory.mktemp("wan") / "transformer"
    model.save_pretrained(path, max_shard_size="8KB")
    assert (path / dio.INDEX).is_file()
    return path


def copy_folder(folder: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for file in folder.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


# ------------------------------------------------------------------------------ 1. clean errors
CONFIG_CASES = {
    "html": (HTML, "not JSON"),
    "nested": (DEEP, "nested too deeply"),
    "list": ("[1, 2]", "expected an object"),
    "empty": ("", "not JSON"),
    "binary": (b"\xff\xfe\x00garbage", "not JSON"),
    "class_name_number": ({**TINY_WAN, "_class_name": 7}, "_class_name"),
    "layers_a_list": ({**TINY_WAN, "num_layers": [2]}, "config.json"),
    "heads_overflow": ({**TINY_WAN, "num_attention_heads": 2**62}, "num_attention_heads"),
    "width_infinite": ({**TINY_WAN, "freq_dim": float("inf")}, "freq_dim"),
    "unknown_key": ({**TINY_WAN, "num_experts": 8}, "num_experts"),
    "storage_overflow": (
        {**TINY_WAN, "num_attention_heads": 2**30, "attention_head_dim": 2**20},
        "config.json",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_a_bad_config_json_is_one_line_naming_it(
    case: str, wan_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content, expected = CONFIG_CASES[case]
    folder = copy_folder(wan_folder, tmp_path / "folder")
    data = content if isinstance(content, str | bytes) else json.dumps(content)
    (folder / dio.CONFIG).write_bytes(data.encode() if isinstance(data, str) else data)
    line = tool_error(["import-diffusers", str(folder), "--out", str(tmp_path / "out.safetensors")], capsys)
    assert str(folder / dio.CONFIG) in line and expected in line, line
    assert not (tmp_path / "out.safetensors").exists()


INDEX_CASES = {
    "html": (HTML, "not JSON"),
    "nested": ('{"weight_map": ' + DEEP + "}", "nested too deeply"),
    "weight_map_a_list": ({"weight_map": ["a", "b"]}, "'weight_map' is list"),
    "no_weight_map": ({"metadata": {}}, "'weight_map' missing"),
    "shard_a_number": ({"weight_map": {"patch_embedding.weight": 3}}, "expected a string"),
    "shard_outside": ({"weight_map": {"patch_embedding.weight": "../x.safetensors"}}, "plain file name"),
    "shard_pickle": ({"weight_map": {"patch_embedding.weight": "w.bin"}}, "pickle"),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_a_bad_safetensors_index_is_one_line_naming_it(
    case: str, wan_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content, expected = INDEX_CASES[case]
    folder = copy_folder(wan_folder, tmp_path / "folder")
    (folder / dio.INDEX).write_text(content if isinstance(content, str) else json.dumps(content))
    line = tool_error(["import-diffusers", str(folder), "--out", str(tmp_path / "out.safetensors")], capsys)
    assert dio.INDEX in line and expected in line, line


def dit_checkpoint(root: Path, state: dict | None = None, **groups: dict[str, torch.Tensor]) -> Path:
    """A trainer-format checkpoint of the tiny DiT (a valid manifest over whatever it is given)."""
    cfg = tiny_model_config()
    torch.manual_seed(0)
    live = {name: torch.randn(t.shape) for name, t in build_dit(cfg).state_dict().items()}
    if state is None:
        state = {"step": 3, "model_config": OmegaConf.to_container(cfg, resolve=True)}
    return ckpt.save_checkpoint(root, 3, {"model": live, **groups}, state)


def rewrite(checkpoint: Path, name: str, data: bytes) -> None:
    """Replaces one file of a checkpoint and its manifest record, so that only the content is bad."""
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    manifest["files"][name] = {"sha256": ckpt._sha256(checkpoint / name), "bytes": len(data)}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))


STATE_CASES = {
    "html": (HTML, "not JSON"),
    "nested": (DEEP, "nested too deeply"),
    "a_list": ("[]", "expected an object"),
    "no_model_config": ({"step": 3}, "key 'model_config' missing"),
    "no_step": ({"model_config": {}}, "key 'step' missing"),
    "step_a_string": ({"step": "3", "model_config": {}}, "key 'step' is str"),
    "model_config_a_list": ({"step": 3, "model_config": [1]}, "key 'model_config' is list"),
    "depth_overflow": ({"step": 3, "model_config": {"depth": 10**30}}, "'depth'"),
}


@pytest.mark.parametrize("command", ["consolidate", "export-diffusers", "export-lora", "inspect"])
@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_a_bad_state_json_is_one_line_naming_it(
    case: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content, expected = STATE_CASES[case]
    checkpoint = dit_checkpoint(tmp_path / "checkpoints")
    rewrite(
        checkpoint, ckpt.STATE_FILE, (content if isinstance(content, str) else json.dumps(content)).encode()
    )
    out = tmp_path / "out"
    argv = {
        "consolidate": [command, str(checkpoint), str(out)],
        "export-diffusers": [command, str(checkpoint), "--out", str(out)],
        "export-lora": [command, str(checkpoint), "--out", str(out)],
        "inspect": [command, str(checkpoint)],
    }[command]
    line = tool_error(argv, capsys)
    assert str(checkpoint / ckpt.STATE_FILE) in line and expected in line, line


def test_export_lora_of_adapters_on_no_module_names_the_pattern(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_model_config()
    values = OmegaConf.to_container(cfg, resolve=True)
    values["lora"] = {"rank": 2, "targets": ["blocks.*.no_such_linear"]}
    checkpoint = dit_checkpoint(tmp_path / "checkpoints", {"step": 3, "model_config": values})
    line = tool_error(["export-lora", str(checkpoint), "--out", str(tmp_path / "lora.safetensors"),
                       "--weights", "live"], capsys)  # fmt: skip
    assert "blocks.*.no_such_linear" in line and "matches no module" in line, line


def test_a_consolidated_file_with_bad_metadata_is_named(tmp_path: Path, capsys) -> None:
    file = tmp_path / "model.safetensors"
    for metadata, expected in (
        ({"format": convert.FORMAT}, "'model_config' missing"),
        ({"format": convert.FORMAT, "model_config": HTML}, "not JSON"),
        ({"format": convert.FORMAT, "model_config": "[3]"}, "not an object"),
    ):
        save_file({"x": torch.zeros(2)}, str(file), metadata=metadata)
        line = tool_error(["export", str(file), str(tmp_path / "out")], capsys)
        assert str(file) in line and expected in line, line


@pytest.mark.parametrize("command", ["consolidate", "export-diffusers"])
def test_a_run_without_ema_names_the_flag(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = dit_checkpoint(tmp_path / "checkpoints")
    out = tmp_path / "out"
    argv = (
        [command, str(checkpoint), str(out)]
        if command == "consolidate"
        else [command, str(checkpoint), "--out", str(out)]
    )
    line = tool_error(argv, capsys)
    assert "ema.safetensors: no such file" in line and "--weights live" in line, line


@pytest.mark.parametrize("name", ["rng.safetensors", ckpt.STATE_FILE])
def test_a_checkpoint_file_of_another_format_names_the_file(tmp_path: Path, name: str) -> None:
    checkpoint = dit_checkpoint(tmp_path / "checkpoints", rng={"x": torch.zeros(1)})
    rewrite(checkpoint, name, HTML.encode())
    with pytest.raises(ckpt.CheckpointError, match=f"{checkpoint / name}: not "):
        ckpt.load_checkpoint(checkpoint)


def test_a_resume_from_a_checkpoint_of_another_format_exits_2(
    tmp_path: Path, synthetic_shards: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    base = ["configs/recipes/quickstart.yaml", f"run_dir={run}", f"data.shards={synthetic_shards}",
            "train.progress=false", "train.sample.every=0", "stages.sft.steps=1", "data.max_tokens=768"]  # fmt: skip
    os.chdir(REPO)
    assert train_cli.main(base) == 0
    checkpoint = run / "checkpoints" / ckpt.checkpoint_name(1)
    rng = (checkpoint / "rng.safetensors").read_bytes()
    rewrite(checkpoint, "rng.safetensors", HTML.encode())
    capsys.readouterr()
    assert train_cli.main([*base, "stages.sft.steps=2"]) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint / 'rng.safetensors'}" in err and "Traceback" not in err, err
    state = json.loads((checkpoint / ckpt.STATE_FILE).read_text())
    del state["stage_index"]  # a key the resume reads
    rewrite(checkpoint, ckpt.STATE_FILE, json.dumps(state).encode())
    rewrite(checkpoint, "rng.safetensors", rng)
    assert train_cli.main([*base, "stages.sft.steps=2"]) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "stage_index" in err and "Traceback" not in err, err


RECIPE_CASES = {
    "loop": (["data.batch_size=${data.seed}", "data.seed=${data.batch_size}"], "'data.", "Recursive"),
    "self": (["run_dir=${run_dir}"], "'run_dir'", "Recursive"),
    "nowhere": (["run_dir=${nowhere.at_all}"], "'run_dir'", "nowhere.at_all"),
    "unset_env": (["name=${oc.env:IMONTAGE_TEST_UNSET_VARIABLE}"], "'name'", "IMONTAGE_TEST_UNSET_VARIABLE"),
    "stage_loop": (
        ["optim.lr=${optim.warmup_steps}", "optim.warmup_steps=${optim.lr}"],
        "'optim.",
        "Recursive",
    ),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_recipe_interpolations_that_loop_or_point_nowhere_name_the_key(
    case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides, key, reason = RECIPE_CASES[case]
    assert train_cli.main([str(REPO / "configs/recipes/quickstart.yaml"), *overrides]) == 2
    line = one_line(capsys.readouterr().err)
    assert "<command line>" in line and key in line and reason in line, line


def test_config_yaml_keeps_environment_values_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imontage.config import load_recipe
    from imontage.config.loader import run_config_yaml

    monkeypatch.setenv("IMONTAGE_TEST_TOKEN", "hf_secret_123")
    cfg = load_recipe(
        REPO / "configs/recipes/quickstart.yaml",
        ["name=${oc.env:IMONTAGE_TEST_TOKEN}", "run_dir=runs/${name}", "seed=7"],
    )
    assert cfg.name == "hf_secret_123"  # the run itself sees the value
    text = run_config_yaml(cfg)
    assert "hf_secret_123" not in text
    again = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    assert again["name"] == "${oc.env:IMONTAGE_TEST_TOKEN}" and again["seed"] == 7
    assert again["run_dir"] == "runs/${name}"  # derived from it: kept as written


def test_pretrained_weights_with_nan_or_inf_are_refused_by_tensor(
    wan_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    for bad in (float("nan"), float("inf")):
        folder = copy_folder(wan_folder, tmp_path / f"folder_{bad}")
        index = json.loads((folder / dio.INDEX).read_text())
        name = "blocks.1.ffn.net.0.proj.weight"
        shard = folder / index["weight_map"][name]
        tensors = load_file(shard)
        tensors[name][0, 0] = bad
        save_file(tensors, str(shard), metadata={"format": "pt"})
        line = tool_error(["import-diffusers", str(folder), "--out", str(tmp_path / "o.safetensors")], capsys)
        assert f"{shard}: tensor '{name}' holds 1 NaN or Inf" in line, line


def test_a_stage_whose_every_step_is_skipped_stops_with_the_numerical_fault_code(
    tmp_path: Path, synthetic_shards: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imontage.config import load_recipe
    from imontage.train.resilience import NumericalFault
    from imontage.train.trainer import Trainer

    cfg = load_recipe(
        REPO / "configs/recipes/quickstart.yaml",
        [f"run_dir={tmp_path}", f"data.shards={synthetic_shards}", "train.progress=false", "train.sample.every=0",
         "stages.sft.steps=3", "data.max_tokens=768", "train.faults.max_consecutive_skips=10"],
    )  # fmt: skip
    trainer = Trainer(cfg)
    for stage in trainer.stages:
        stage.objective = PoisonedObjective(stage.objective, lambda: True)
    with pytest.raises(NumericalFault, match="all 3 step\\(s\\) run .* skipped"):
        trainer.fit()
    assert not ckpt.find_resume_checkpoint(tmp_path / "checkpoints")  # no NaN-era result saved


# --------------------------------------------------------------- 2. bounded time and memory
BOUNDED = textwrap.dedent(
    """
    import json, resource, sys, time
    sys.path.insert(0, "tools")
    import convert_checkpoint
    results = {}
    for name, argv in json.loads(sys.argv[1]).items():
        start = time.perf_counter()
        code = convert_checkpoint.main(argv)
        results[name] = [code, time.perf_counter() - start]
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(results))
    """
)


def test_claimed_sizes_cost_neither_time_nor_memory(wan_folder: Path, tmp_path: Path) -> None:
    """Configs claiming a million layers, and a 2 GiB file of the wrong size, are refused in
    bounded time and memory, whatever they claim: the model is built on meta against the
    tensors the weights offer, and sizes are compared before anything is hashed."""
    folder = copy_folder(wan_folder, tmp_path / "folder")
    (folder / dio.CONFIG).write_text(json.dumps({**TINY_WAN, "num_layers": 1_000_000}))
    cfg = tiny_model_config()
    huge = OmegaConf.to_container(cfg, resolve=True)
    huge["depth"] = 1_000_000
    checkpoint = dit_checkpoint(tmp_path / "checkpoints", {"step": 3, "model_config": huge})
    lora = {**huge, "lora": {"rank": 2, "targets": ["blocks.*.attn.qkv"]}}
    lora_checkpoint = dit_checkpoint(tmp_path / "lora_checkpoints", {"step": 3, "model_config": lora})
    big = dit_checkpoint(tmp_path / "big", big={"x": torch.zeros(4)})
    with (big / "big.safetensors").open("r+b") as file:
        file.truncate(2 * 2**30)  # sparse: 2 GiB the manifest does not list at this size
    cases = {
        "import-diffusers": ["import-diffusers", str(folder), "--out", str(tmp_path / "a.safetensors")],
        "consolidate": ["consolidate", str(checkpoint), str(tmp_path / "b.safetensors"), "--weights", "live"],
        "export-diffusers": ["export-diffusers", str(checkpoint), "--out", str(tmp_path / "c"), "--weights", "live"],
        "export-lora": ["export-lora", str(lora_checkpoint), "--out", str(tmp_path / "d"), "--weights", "live"],
        "inspect": ["inspect", str(checkpoint)],
        "verify": ["verify", str(big)],
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", BOUNDED, json.dumps(cases)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    assert "Traceback" not in done.stderr, done.stderr
    for name in cases:
        code, seconds = results[name]
        assert code == (0 if name == "inspect" else 2), (name, done.stderr)  # inspect builds no model
        assert seconds < 5.0, (name, seconds)
    # The interpreter with torch, diffusers and the tools is ~600 MiB; one million layers on the
    # meta device, or a 2 GiB file read, would be far above.
    assert results["peak_rss_mib"] < 1500, results
    err = done.stderr
    assert "more than" in err and str(folder / dio.CONFIG) in err
    assert f"{big / 'big.safetensors'}: {2 * 2**30} bytes" in err

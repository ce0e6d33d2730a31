"""docs/finetune_wan.md: every command of its bash blocks runs, in order, on tiny random models."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from latent_shards import TEXT_DIM, save_tiny_encoders, save_tiny_wan, write_pixel_shards

DOC = REPO / "docs/finetune_wan.md"
STEPS = 3
# The training line runs a tiny Wan on one process; everything else runs as the doc says.
TINY = [
    "model=wan_tiny", f"model.text_dim={TEXT_DIM}", "parallel=single", "train.precision=fp32",
    f"stages.sft.steps={STEPS}", "train.checkpoint.every=0", "train.progress=false", "data.num_workers=0",
    "data.batch_size=4", "data.max_tokens=0", "data.shuffle_buffer=0",
]  # fmt: skip


def doc_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [block.replace("\\\n", " ").strip() for block in blocks]


@pytest.mark.slow
def test_every_walkthrough_command_runs(tmp_path: Path) -> None:
    wan = tmp_path / "models/Wan2.1-T2V-1.3B-Diffusers"
    encoders = save_tiny_encoders(tmp_path / "encoders")
    for part in ("vae", "text_encoder", "tokenizer"):
        os.symlink(encoders[part], wan / part) if wan.exists() else (wan.mkdir(parents=True), os.symlink(encoders[part], wan / part))  # fmt: skip
    save_tiny_wan(wan / "transformer")
    pixels = write_pixel_shards(tmp_path / "pixel_shards")
    (tmp_path / "data/mine").mkdir(parents=True)
    for number, shard in enumerate(sorted(Path(pixels).parent.glob("*.tar"))):
        os.symlink(shard, tmp_path / f"data/mine/shard-{number:06d}.tar")
    (tmp_path / "runs").mkdir()
    commands = doc_commands()
    assert len(commands) == 5, commands
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        command = command.replace(" configs/", f" {REPO}/configs/").replace(" tools/", f" {REPO}/tools/")
        command = command.replace("step_005000", f"step_{STEPS:06d}")
        if command.startswith("imontage-train"):
            command += " " + " ".join(shlex.quote(o) for o in TINY)
        command = re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", command)
        result = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    exported = tmp_path / "runs/imontage_wan/transformer"
    assert (exported / "config.json").is_file() and list(exported.glob("*.safetensors"))
    assert (tmp_path / "runs/wan_model.yaml").is_file()

"""The training loop: a recipe's stages, run in order by one Trainer with small methods.

Single device in this module. A stage owns its objective, data loader, optimiser and LR
schedule; the model and its EMA carry over from stage to stage. Checkpoints hold everything a
resume needs to continue bit for bit: weights, EMA, optimiser, step, stage, loader position and
RNG states.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from imontage.config.loader import stage_section
from imontage.data import build_loader, preview_samples
from imontage.models.dit import build_dit
from imontage.models.dit.sequence import PackingSpec
from imontage.objectives.flow_matching import FlowMatching
from imontage.sample.grid import make_grid, save_png
from imontage.sample.sampler import sample_flow
from imontage.train import checkpoint as ckpt
from imontage.train.ema import EMA
from imontage.train.logger import RunLogger
from imontage.train.schedule import learning_rate

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One entry of the recipe's ``stages``, with its place on the global step axis."""

    index: int
    name: str
    first_step: int  # global step count before the stage starts
    last_step: int  # global step count when it is done
    data: DictConfig
    optim: DictConfig
    objective: FlowMatching


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("parallel.device=cuda, but CUDA is not available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def build_stages(cfg: DictConfig) -> list[Stage]:
    stages, first = [], 0
    for index, stage in enumerate(cfg.stages):
        objective = FlowMatching.from_config(cfg.flow_matching)
        data, optim = stage_section(cfg, index, "data"), stage_section(cfg, index, "optim")
        stages.append(Stage(index, stage.name, first, first + stage.steps, data, optim, objective))
        first += stage.steps
    return stages


class Trainer:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.device = resolve_device(cfg.parallel.device)
        torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
        torch.manual_seed(cfg.seed)  # the model's initial weights depend on the seed only
        self.model = build_dit(cfg.model).to(self.device)
        self.model.gradient_checkpointing = cfg.parallel.activation_checkpointing
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.spec = PackingSpec.from_model_config(cfg.model)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # noise, t and text dropout
        self.stages = build_stages(cfg)
        # Data-parallel rank and size the loaders split the data by; the parallel setup sets them.
        self.data_rank, self.data_world_size = 0, 1
        self.step = 0
        self.saved_step = -1
        self.optimizer: torch.optim.Optimizer | None = None
        self.loader: Any = None
        self.stage: Stage | None = None
        self._resume_state: dict[str, Any] | None = None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
        self.logger = RunLogger(self.run_dir)

    # ----------------------------------------------------------------------------------- loop
    def fit(self) -> None:
        """Run (or continue) every stage; returns early once ``train.stop_at_step`` is reached."""
        self.maybe_resume()
        try:
            for stage in self.stages:
                if self.step >= stage.last_step:
                    continue
                self.start_stage(stage)
                if not self.run_stage(stage):
                    return
        finally:
            self.logger.close()

    def run_stage(self, stage: Stage) -> bool:
        """Train ``stage`` to its end; False when the run stops early (``train.stop_at_step``)."""
        bar = tqdm(
            total=stage.last_step - stage.first_step,
            initial=self.step - stage.first_step,
            desc=f"stage {stage.name}",
            disable=not self.cfg.train.progress,
            dynamic_ncols=True,
        )
        with bar:
            while self.step < stage.last_step and not self.stop_requested():
                metrics = self.train_step(self.next_batch())
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                self.after_step(metrics)
        if self.saved_step != self.step:  # the periodic save may have just written this step
            self.save_checkpoint()
        self.finish_data(stage)
        if self.stop_requested():
            log.info("stopping at step %d (train.stop_at_step)", self.step)
            return False
        return True

    def next_batch(self) -> Any:
        """The loader's next batch; a mixture draws it with the weights of the current step."""
        self.loader.set_step(self.step)
        return next(self.loader)

    def stop_requested(self) -> bool:
        stop_at = self.cfg.train.stop_at_step
        return bool(stop_at) and self.step >= stop_at

    def train_step(self, batch: Any) -> dict[str, float]:
        assert self.optimizer is not None and self.stage is not None
        started = time.perf_counter()
        lr = self.set_learning_rate()
        batch = batch.to(self.device)
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16"
        ):
            output = self.stage.objective(self.model, batch, self.generator)
        if not torch.isfinite(output.loss):
            raise FloatingPointError(f"step {self.step + 1}: loss is {output.loss.item()}")
        output.loss.backward()
        grad_norm = self.clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        elapsed = time.perf_counter() - started
        return {
            "loss": output.loss.item(),
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time": elapsed,
            "tokens_per_s": batch.tokens.shape[0] / elapsed,
            "target_tokens": float(output.num_target_tokens),
        }

    def after_step(self, metrics: dict[str, float]) -> None:
        train = self.cfg.train
        if self.step % train.log_every == 0:
            self.logger.scalars(self.step, metrics)
            self.log_data_metrics()
        if train.sample.every and self.step % train.sample.every == 0:
            self.write_samples()
        if train.checkpoint.every and self.step % train.checkpoint.every == 0:
            self.save_checkpoint()

    # --------------------------------------------------------------------------- stage setup
    def start_stage(self, stage: Stage) -> None:
        """Fresh optimiser and loader for ``stage``; then the resumed state, if it belongs here."""
        self.stage = stage
        optim = stage.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        self.loader = build_loader(
            stage.data, self.spec, rank=self.data_rank, world_size=self.data_world_size
        )
        resume = self._resume_state
        if resume is not None and resume["stage_index"] == stage.index:
            tensors, state = resume["tensors"], resume["state"]
            optimizer_state = ckpt.optimizer_state_from_tensors(tensors["optimizer"], state["optimizer"])
            self.optimizer.load_state_dict(optimizer_state)
            self.loader.load_state_dict(state["loader"])
        self._resume_state = None
        log.info("stage %s: global steps %d..%d", stage.name, stage.first_step + 1, stage.last_step)

    # ----------------------------------------------------------------------------------- data
    def log_data_metrics(self) -> None:
        """The loader's counters (skips by reason, padding, samples, bytes) as TensorBoard scalars."""
        for name, value in self.loader.metrics().items():
            self.logger.writer.add_scalar(f"data/{name}", value, self.step)

    def finish_data(self, stage: Stage) -> None:
        """Log the stage's data summary, add it to RUN_DIR/data_summary.json and stop the loader's workers."""
        lines = self.loader.summary_lines()
        log.info("data, stage %s, step %d:\n%s", stage.name, self.step, "\n".join(lines))
        path = self.run_dir / "data_summary.json"
        summary = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        summary[stage.name] = {"step": self.step, "stats": self.loader.stats().to_dict(), "summary": lines}
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        self.loader.close()

    def set_learning_rate(self) -> float:
        assert self.optimizer is not None and self.stage is not None
        optim = self.stage.optim
        lr = learning_rate(
            self.step - self.stage.first_step,
            self.stage.last_step - self.stage.first_step,
            optim.lr,
            optim.warmup_steps,
            optim.schedule,
            optim.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def clip_gradients(self) -> float:
        limit = self.stage.optim.grad_clip if self.stage is not None else 0.0
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit if limit > 0 else float("inf"))
        return float(norm)

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        assert self.optimizer is not None and self.stage is not None
        optimizer_tensors, optimizer_meta = ckpt.optimizer_state_to_tensors(self.optimizer.state_dict())
        rng_tensors, rng_meta = ckpt.rng_state_to_tensors()
        rng_tensors["trainer_generator"] = self.generator.get_state()
        tensors = {
            "model": {name: t.detach() for name, t in self.model.state_dict().items()},
            "optimizer": optimizer_tensors,
            "rng": rng_tensors,
        }
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        state = {
            "step": self.step,
            "stage_index": self.stage.index,
            "stage_name": self.stage.name,
            "loader": self.loader.state_dict(),
            "optimizer": optimizer_meta,
            "rng": rng_meta,
            "model_config": OmegaConf.to_container(self.cfg.model, resolve=True),
        }
        path = ckpt.save_checkpoint(
            self.checkpoint_dir, self.step, tensors, state, self.cfg.train.checkpoint.keep_last
        )
        self.saved_step = self.step
        self.logger.flush()
        log.info("saved %s", path)
        return path

    def maybe_resume(self) -> None:
        mode = self.cfg.train.resume
        if mode == "never":
            return
        path = ckpt.find_resume_checkpoint(self.checkpoint_dir) if mode == "auto" else Path(mode)
        if path is None:
            return
        tensors, state = ckpt.load_checkpoint(path)
        self.model.load_state_dict(tensors["model"])
        if self.ema is not None:
            self.ema.load_state_dict(tensors["ema"])
        ckpt.restore_rng_state(tensors["rng"], state["rng"])
        self.generator.set_state(tensors["rng"]["trainer_generator"])
        self.step = int(state["step"])
        self._resume_state = {"tensors": tensors, "state": state, "stage_index": int(state["stage_index"])}
        log.info("resumed from %s at step %d (stage %s)", path, self.step, state["stage_name"])

    # -------------------------------------------------------------------------------- samples
    def write_samples(self) -> Path:
        """Sample the preview conditions with the EMA weights; PNG to RUN_DIR/samples and TensorBoard."""
        sample_cfg = self.cfg.train.sample
        samples = preview_samples(self.cfg.data, sample_cfg.num_samples, self.spec)
        generator = torch.Generator().manual_seed(self.cfg.seed)  # the same noise at every preview
        self.model.eval()
        try:
            if self.ema is not None and sample_cfg.use_ema:
                with self.ema.applied_to(self.model):
                    outputs = self.sample(samples, generator)
            else:
                outputs = self.sample(samples, generator)
        finally:
            self.model.train()
        image = make_grid(preview_rows(samples, outputs))
        path = self.run_dir / "samples" / f"{ckpt.checkpoint_name(self.step)}.png"
        save_png(image, path)
        self.logger.image(self.step, "samples", image)
        return path

    def sample(self, samples: list[Any], generator: torch.Generator) -> list[list[torch.Tensor | None]]:
        s = self.cfg.train.sample
        return sample_flow(
            self.model, samples, self.spec, s.steps, s.guidance, s.shift, generator, self.device
        )


def preview_rows(
    samples: list[Any], outputs: list[list[torch.Tensor | None]]
) -> list[list[list[torch.Tensor]]]:
    """Grid rows: [conditions, generated targets, ground-truth targets] per sample."""
    rows = []
    for sample, generated in zip(samples, outputs, strict=True):
        conditions = [s.data for s in sample.segments if s.kind != "text" and s.role == "condition"]
        targets = [s.data for s in sample.segments if s.role == "target"]
        made = [out for s, out in zip(sample.segments, generated, strict=True) if s.role == "target"]
        rows.append([conditions, made, targets])
    return rows


def train(cfg: DictConfig) -> Path:
    """Run a recipe; returns its run directory."""
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer.run_dir

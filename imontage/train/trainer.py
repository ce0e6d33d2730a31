"""The training loop: a recipe's stages, run in order by one Trainer with small methods.

A stage owns its objective, data loader, optimiser hyperparameters and LR schedule; the model,
its optimiser state only within a stage, and its EMA carry over. Where the weights live (one
process, or DeepSpeed ZeRO with TP/SP/Ulysses over many ranks) is the backend's business
(:mod:`imontage.train.backends`). Checkpoints hold everything a resume needs to continue bit for
bit: weights, EMA, optimiser, step, stage, loader position and RNG states of every rank.

Every rank runs this loop. Ranks of one tensor/context-parallel group read the same batches and
draw the same noise; data-parallel ranks read their own. Rank 0 alone writes logs, samples and
the run directory's files other than checkpoint shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from imontage.checkpoint import store as ckpt
from imontage.config.loader import run_config_yaml, stage_section
from imontage.data import build_loader, preview_samples
from imontage.models import build_model, packing_spec
from imontage.objectives.flow_dpo import FlowDPO
from imontage.objectives.flow_matching import FlowMatching, clean_first_frame
from imontage.parallel.state import resolve_device
from imontage.sample.grid import make_grid, preview_rows, save_png
from imontage.sample.sampler import sample_flow
from imontage.train.backends import build_backend
from imontage.train.logger import NullLogger, RunLogger
from imontage.train.resilience import (
    LossSpikeDetector,
    NonFiniteGuard,
    NumericalFault,
    StopSignals,
    agree_to_stop,
    max_requeues,
    requeue_verdict,
    set_collective_timeout,
)
from imontage.train.schedule import learning_rate
from imontage.train.validation import Validator, build_validators, progress_line

log = logging.getLogger(__name__)

NOISE_SEED_STRIDE = 1_000_003  # data-parallel rank r draws noise from seed + r × stride


class RunStopped(Exception):
    """The run stopped early on a signal with its checkpoint saved; ``exit_code`` says what follows."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Stage:
    """One entry of the recipe's ``stages``, with its place on the global step axis."""

    index: int
    name: str
    first_step: int  # global step count before the stage starts
    last_step: int  # global step count when it is done
    data: DictConfig
    optim: DictConfig
    objective: FlowMatching | FlowDPO
    init_from: str = ""  # weights the stage starts from instead of the previous stage's


def build_stages(cfg: DictConfig) -> list[Stage]:
    stages, first = [], 0
    for index, stage in enumerate(cfg.stages):
        objective: FlowMatching | FlowDPO = (
            FlowDPO.from_config(cfg.dpo, cfg.flow_matching, cfg.model)
            if stage.objective == "flow_dpo"
            else FlowMatching.from_config(cfg.flow_matching, cfg.model)
        )
        data, optim = stage_section(cfg, index, "data"), stage_section(cfg, index, "optim")
        stages.append(
            Stage(index, stage.name, first, first + stage.steps, data, optim, objective, stage.init_from)
        )
        first += stage.steps
    return stages


class Trainer:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
        torch.manual_seed(cfg.seed)  # the model's initial weights depend on the seed only
        self.backend = build_backend(build_model(cfg.model), cfg, resolve_device(cfg.parallel.device))
        self.device = self.backend.device
        self.model = self.backend.model  # what objectives and samplers call
        self.is_main = self.backend.rank == 0
        # What the loader decodes for the model: its channels, layout and per-sample inputs (pooled
        # text, image tokens, channel conditions, and the distilled guidance scale it trains at).
        self.spec = packing_spec(cfg.model, cfg.flow_matching.embedded_guidance)
        # Noise, t and text dropout: the same within a TP/CP group, different across DP ranks.
        self.generator = torch.Generator().manual_seed(cfg.seed + NOISE_SEED_STRIDE * self.backend.data_rank)
        self.stages = build_stages(cfg)
        # Held-out sets, read now: a wrong one stops the run before its first step.
        self.validators = build_validators(cfg, self.selected_stages(), self.spec)
        self.step = 0
        self.saved_step = -1
        self.loader: Any = None
        self.stage: Stage | None = None
        self._resumed: dict[str, Any] | None = None
        faults = cfg.train.faults
        max_requeues()  # a bad IMONTAGE_MAX_REQUEUES fails now, not at the preemption
        self.guard = NonFiniteGuard.from_config(faults)
        self.spikes = LossSpikeDetector.from_config(faults)
        self.signals = StopSignals(list(faults.stop_signals))
        self.preempted = False  # every rank agreed to stop on a signal
        self.timeout_lowered = False
        self.logger: RunLogger | NullLogger = NullLogger()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(run_config_yaml(cfg), encoding="utf-8")
            self.logger = RunLogger(self.run_dir)

    # ----------------------------------------------------------------------------------- loop
    def fit(self) -> None:
        """Run (or continue) every stage; returns early once ``train.stop_at_step`` is reached.

        On a stop signal (``train.faults.stop_signals``) every rank finishes its step, saves, and
        :class:`RunStopped` is raised with the exit code that tells the job script to requeue.
        """
        self.maybe_resume()
        # The handlers stay up to the last barrier: a late signal is one more (ignored) stop request.
        with self.signals:
            try:
                for stage in self.selected_stages():
                    if self.step >= stage.last_step:
                        continue
                    self.start_stage(stage)
                    if not self.run_stage(stage):
                        break
                if self.preempted:
                    self.stop_for_requeue()
            except RunStopped:  # every rank saved the stop checkpoint: they leave together
                self.logger.close()
                self.backend.close()
                raise
            except BaseException:
                # A failure leaves at once, without close()'s barrier: that would wait a whole
                # collective timeout more for ranks that may be gone (a host cut off), or meet a
                # collective of a rank still training.
                self.logger.close()
                raise
            self.logger.close()
            self.backend.close()

    def selected_stages(self) -> list[Stage]:
        """Every stage, or only ``train.only_stage`` (``stage=NAME`` on the command line)."""
        only = self.cfg.train.only_stage
        return [stage for stage in self.stages if not only or stage.name == only]

    def stop_for_requeue(self) -> None:
        """After the stop checkpoint: raise :class:`RunStopped` with the job's requeue verdict.

        No rank runs ``scontrol requeue``: the job script does, once srun has returned 75. Every
        rank leaves through ``backend.close()``'s barrier in :meth:`fit`, its checkpoint complete,
        with the stop signals ignored, so that each exits with the code itself.
        """
        received = self.signals.received
        result = requeue_verdict()
        where = f"{received.name} received here" if received is not None else "a stop signal on another rank"
        message = (
            f"stopped after step {self.step} ({where}); {result.detail}; exit status {int(result.exit_code)}"
        )
        log.warning(message)
        self.signals.ignore_until_exit()  # srun SIGTERMs the rest once one rank has exited
        raise RunStopped(message, int(result.exit_code))

    def run_stage(self, stage: Stage) -> bool:
        """Train ``stage`` to its end; False when the run stops early (``train.stop_at_step``)."""
        bar = tqdm(
            total=stage.last_step - stage.first_step,
            initial=self.step - stage.first_step,
            desc=f"stage {stage.name}",
            disable=not (self.cfg.train.progress and self.is_main),
            dynamic_ncols=True,
        )
        started = self.step
        validator = self.validators.get(stage.index)
        if validator is not None and validator.at_start and self.step == stage.first_step:
            self.validate(validator)  # the weights the stage starts from
        with bar:
            while self.step < stage.last_step and not self.stop_requested():
                metrics = self.train_step()
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                self.after_step(metrics)
                self.after_first_step()
                self.preempted = agree_to_stop(self.signals.requested, self.device)
        ran = self.step - started
        if ran and self.guard.consecutive >= ran and not self.preempted:
            # Fewer bad steps than max_consecutive_skips, but no good one: saving would pass off the
            # weights the stage started from as its result, and exit 0.
            raise NumericalFault(
                f"stage {stage.name}: all {ran} step(s) run had a non-finite loss or gradient and were "
                "skipped, so nothing was trained (the data or the weights hold NaN or Inf?); not saving"
            )
        if self.saved_step != self.step:  # the periodic save may have just written this step
            self.save_checkpoint()
        self.finish_data(stage)
        if isinstance(stage.objective, FlowDPO):
            stage.objective.reference = None  # its weights are not needed past the stage
        if self.stop_requested():
            log.info(
                "stopping at step %d (%s)", self.step, "signal" if self.preempted else "train.stop_at_step"
            )
            return False
        return True

    def after_first_step(self) -> None:
        """Start-up is over: a collective that now waits long means a lost rank, so fail faster."""
        if not self.timeout_lowered:
            set_collective_timeout(self.cfg.train.faults.timeout_s)
            self.timeout_lowered = True

    def next_batch(self) -> Any:
        """The loader's next batch; a mixture draws it with the weights of the current step."""
        self.loader.set_step(self.step)
        return next(self.loader)

    def stop_requested(self) -> bool:
        stop_at = self.cfg.train.stop_at_step
        return self.preempted or (bool(stop_at) and self.step >= stop_at)

    def train_step(self) -> dict[str, float]:
        """One optimiser step over ``train.grad_accumulation`` micro-batches; metrics over all DP ranks."""
        assert self.stage is not None
        started = time.perf_counter()
        lr = self.set_learning_rate()
        accumulation = self.cfg.train.grad_accumulation
        loss, tokens, target_tokens = 0.0, 0, 0
        tasks: Counter[str] = Counter()
        errors: dict[str, list[float]] = {}  # task -> [squared error, values]
        scalars: Counter[str] = Counter()  # the objective's own numbers (DPO: reward margin, accuracy)
        # The step's range of t, alike on every rank: with every expert in one run, the expert it trains.
        t_range = self.stage.objective.step_range(self.cfg.seed, self.step)
        self.backend.begin_step(t_range)
        for _ in range(accumulation):
            batch = self.next_batch().to(self.device)
            with self.backend.autocast():
                output = self.stage.objective(self.model, batch, self.generator, t_range)
            self.backend.backward(output.loss, accumulation)  # every rank, even with a NaN: ZeRO reduces
            loss += output.loss.item() / accumulation
            tokens += batch.tokens.shape[0]
            target_tokens += int(output.num_target_tokens)
            tasks.update(task or "untitled" for task in batch.tasks)
            scalars.update({name: v / accumulation for name, v in getattr(output, "scalars", {}).items()})
            for task, (error, count) in output.task_errors.items():
                errors.setdefault(task, [0.0, 0.0])
                errors[task][0] += error
                errors[task][1] += count
        # Decided on every rank before the optimiser step: skip the step, or raise in "fail" mode.
        check = self.guard.check(self.step + 1, loss, self.backend.gradient_norm())
        if check.skip:
            self.backend.discard_gradients()
            log.warning(check.detail)
            grad_norm = float("nan")
        else:
            grad_norm = self.backend.apply_step()
        elapsed = time.perf_counter() - started
        return {
            "loss": self.backend.mean_over_data(loss),
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time": elapsed,
            "tokens_per_s": self.backend.sum_over_data(tokens) / elapsed,
            "target_tokens": self.backend.sum_over_data(target_tokens),
            "skipped_steps": float(self.guard.skipped_total),
            "loss_spikes": float(self.spikes.spikes_total),
            **{name: self.backend.mean_over_data(value) for name, value in sorted(scalars.items())},
            # This rank's batches (rank 0's are logged): samples and loss of each task.
            **{f"task_samples/{task}": float(n) for task, n in sorted(tasks.items())},
            **{f"task_loss/{task}": e / max(c, 1.0) for task, (e, c) in sorted(errors.items())},
        }

    def after_step(self, metrics: dict[str, float]) -> None:
        train = self.cfg.train
        spike = self.spikes.observe(self.step, metrics["loss"])
        if spike is not None:
            log.warning(spike)
            metrics["loss_spikes"] = float(self.spikes.spikes_total)
        if self.step % train.log_every == 0:
            self.logger.scalars(self.step, metrics)
            self.log_data_metrics()
        if train.sample.every and self.step % train.sample.every == 0:
            self.write_samples()
        assert self.stage is not None
        validator = self.validators.get(self.stage.index)
        if validator is not None and validator.due(self.step):
            self.validate(validator)
        if validator is not None and validator.preview_due(self.step):
            self.write_samples(validator.heldout.previews(validator.preview_count), "val_")
        if train.checkpoint.every and self.step % train.checkpoint.every == 0:
            self.save_checkpoint()

    def validate(self, validator: Validator) -> dict[str, float]:
        """The stage's held-out numbers now: TensorBoard ``val/...``, metrics.jsonl and a console line."""
        assert self.stage is not None
        metrics = validator.evaluate(self.model, self.backend)
        self.logger.scalars(self.step, metrics, prefix="val", jsonl=False)
        self.logger.record(self.step, {f"val/{name}": value for name, value in metrics.items()})
        if self.is_main:
            log.info(progress_line(self.step, self.stage.name, metrics))
        return metrics

    # --------------------------------------------------------------------------- stage setup
    def start_stage(self, stage: Stage) -> None:
        """The stage's optimiser settings (fresh moments) and loader; or the resumed ones, if they belong here."""
        self.stage = stage
        resumed = (
            self._resumed
            if self._resumed is not None and self._resumed["stage_index"] == stage.index
            else None
        )
        if resumed is None and stage.init_from:
            log.info("stage %s: weights from %s (init_from)", stage.name, stage.init_from)
            self.backend.init_weights(Path(stage.init_from))
        elif resumed is None and stage.index == 0 and self.cfg.model.init_from_diffusers:
            pretrained = self.cfg.model.init_from_diffusers
            log.info("stage %s: weights from %s (model.init_from_diffusers)", stage.name, pretrained)
            self.backend.init_weights(Path(pretrained))
        if isinstance(stage.objective, FlowDPO):
            self.attach_reference(stage.objective, stage, None if resumed is None else resumed["path"])
        self.backend.begin_stage(stage.optim, fresh=resumed is None)
        self.loader = build_loader(
            stage.data, self.spec, rank=self.backend.data_rank, world_size=self.backend.data_world_size
        )
        if resumed is not None:
            self.loader.load_state_dict(resumed["loader"])
        self._resumed = None
        log.info("stage %s: global steps %d..%d", stage.name, stage.first_step + 1, stage.last_step)

    def attach_reference(self, objective: FlowDPO, stage: Stage, resumed_from: Path | None) -> None:
        """DPO's frozen reference: the policy's weights when ``stage`` starts (the previous stage's final ones).

        Resumed inside the stage (from ``resumed_from``), those weights are the stage's entry
        checkpoint, beside ``resumed_from``: it is loaded for the copy, then ``resumed_from`` again.
        """
        if resumed_from is None:
            objective.reference = self.backend.frozen_reference()
            return
        if stage.init_from:  # the stage started from these weights, not the previous stage's
            log.info("stage %s: reference from %s (init_from)", stage.name, stage.init_from)
            self.backend.init_weights(Path(stage.init_from))
            objective.reference = self.backend.frozen_reference()
            self.backend.load(resumed_from)
            return
        entry = resumed_from.parent / ckpt.checkpoint_name(stage.first_step)
        if not ckpt.is_complete(entry):
            raise ckpt.CheckpointError(
                f"stage {stage.name} (flow_dpo) resumes at step {self.step} from {resumed_from}, but its "
                f"reference is the policy at step {stage.first_step}, and {entry} is missing or incomplete "
                "(a flow_dpo stage that comes first has no such checkpoint; train.checkpoint.keep_last may "
                "have pruned it)"
            )
        log.info("stage %s: reference from %s", stage.name, entry)
        self.backend.load(entry)
        objective.reference = self.backend.frozen_reference()
        self.backend.load(resumed_from)

    # ----------------------------------------------------------------------------------- data
    def log_data_metrics(self) -> None:
        """The loader's counters (skips by reason, padding, samples, bytes) as TensorBoard scalars."""
        self.logger.scalars(self.step, self.loader.metrics(), prefix="data", jsonl=False)

    def finish_data(self, stage: Stage) -> None:
        """Log the stage's data summary, add it to RUN_DIR/data_summary.json and stop the loader's workers.

        The summary is rank 0's loader's (its share of the data).
        """
        if not self.is_main:
            self.loader.close()
            return
        lines = self.loader.summary_lines()
        log.info("data, stage %s, step %d:\n%s", stage.name, self.step, "\n".join(lines))
        path = self.run_dir / "data_summary.json"
        summary = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        summary[stage.name] = {"step": self.step, "stats": self.loader.stats().to_dict(), "summary": lines}
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        self.loader.close()

    def set_learning_rate(self) -> float:
        assert self.stage is not None
        optim = self.stage.optim
        lr = learning_rate(
            self.step - self.stage.first_step,
            self.stage.last_step - self.stage.first_step,
            optim.lr,
            optim.warmup_steps,
            optim.schedule,
            optim.min_lr_ratio,
        )
        self.backend.set_learning_rate(lr)
        return lr

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        assert self.stage is not None
        rng_tensors, rng_meta = ckpt.rng_state_to_tensors()
        rng_tensors["trainer_generator"] = self.generator.get_state()
        shared = {
            "step": self.step,
            "stage_index": self.stage.index,
            "stage_name": self.stage.name,
            "model_config": OmegaConf.to_container(self.cfg.model, resolve=True),
            "faults": {"nonfinite": self.guard.state_dict(), "spikes": self.spikes.state_dict()},
        }
        own = {"loader": self.loader.state_dict(), "rng": rng_meta}
        path = self.backend.save(
            self.checkpoint_dir, self.step, shared, own, rng_tensors, self.cfg.train.checkpoint.keep_last
        )
        self.saved_step = self.step
        self.logger.flush()
        log.info("saved %s", path)
        return path

    def maybe_resume(self) -> None:
        mode = self.cfg.train.resume
        path = None
        if mode != "never":
            path = self.backend.find_resume(self.checkpoint_dir) if mode == "auto" else Path(mode)
        only = self.selected_stages()[0] if self.cfg.train.only_stage else None
        if (
            only is not None
            and only.first_step > 0
            and (path is None or ckpt.checkpoint_step(path) < only.first_step)
        ):
            if only.init_from:  # the stage starts from its own weights, at its first global step
                self.step = only.first_step
                return
            path = self.stage_entry_checkpoint(only)
        if path is None:
            return
        if self.backend.frozen and self.cfg.model.init_from_diffusers:
            # Checkpoints leave out a frozen base (model.lora): it comes from its folder again (without
            # one it is the seeded initialisation the model was built with).
            log.info("frozen base from %s (model.init_from_diffusers)", self.cfg.model.init_from_diffusers)
            self.backend.init_weights(Path(self.cfg.model.init_from_diffusers))
        try:
            shared, own, rng_tensors = self.backend.load(path)
            ckpt.restore_rng_state(rng_tensors, own["rng"])
            self.generator.set_state(rng_tensors["trainer_generator"])
            self.step = int(shared["step"])
            if "faults" in shared:
                self.guard.load_state_dict(shared["faults"]["nonfinite"])
                self.spikes.load_state_dict(shared["faults"]["spikes"])
            self._resumed = {"stage_index": int(shared["stage_index"]), "loader": own["loader"], "path": path}
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            if isinstance(error, ckpt.CheckpointError):
                raise
            # The manifest vouches for the bytes, not for what they say: a checkpoint written by
            # hand (or by another version) that lacks a key or holds a tensor of another shape.
            raise ckpt.CheckpointError(
                f"{path}: cannot resume from it: {ckpt.STATE_FILE} or its tensors do not hold what "
                f"this run needs ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            ) from error
        log.info("resumed from %s at step %d (stage %s)", path, self.step, shared.get("stage_name"))

    def stage_entry_checkpoint(self, stage: Stage) -> Path:
        """The previous stage's final checkpoint, where ``stage=NAME`` starts (every stage saves at its end)."""
        path = self.checkpoint_dir / ckpt.checkpoint_name(stage.first_step)
        if not ckpt.is_complete(path):
            previous = self.stages[stage.index - 1].name
            raise ckpt.CheckpointError(
                f"stage={stage.name} starts from {path}, which is missing or incomplete: "
                f"run stage={previous} first (or the whole recipe)"
            )
        return path

    # -------------------------------------------------------------------------------- samples
    def write_samples(self, samples: list[Any] | None = None, prefix: str = "") -> Path:
        """Sample the preview conditions (or ``samples``: the held-out ones, with ``prefix`` ``val_``)
        with the EMA weights; PNG to RUN_DIR/samples/PREFIXstep_N.png and TensorBoard PREFIXsamples."""
        sample_cfg = self.cfg.train.sample
        if samples is None:
            samples = preview_samples(self.cfg.data, sample_cfg.num_samples, self.spec)
        generator = torch.Generator().manual_seed(self.cfg.seed)  # the same noise at every preview
        self.model.eval()  # every rank samples: the parallel model's collectives need them all
        try:
            with self.backend.ema_weights() if sample_cfg.use_ema else contextlib.nullcontext():
                outputs = self.sample(samples, generator)
        finally:
            self.model.train()
        path = self.run_dir / "samples" / f"{prefix}{ckpt.checkpoint_name(self.step)}.png"
        if not self.is_main:
            return path
        image = make_grid(preview_rows(samples, outputs))
        save_png(image, path)
        self.logger.image(self.step, f"{prefix}samples", image)
        return path

    def sample(self, samples: list[Any], generator: torch.Generator) -> list[list[torch.Tensor | None]]:
        s = self.cfg.train.sample
        return sample_flow(
            self.model, samples, self.spec, s.steps, s.guidance, s.shift, generator, self.device,
            clean_first_frame=clean_first_frame(self.cfg.model),  # token_replace: as it trains
        )  # fmt: skip


def train(cfg: DictConfig) -> Path:
    """Run a recipe; returns its run directory."""
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer.run_dir

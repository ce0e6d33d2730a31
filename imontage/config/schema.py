"""The recipe schema: typed dataclasses that OmegaConf merges in strict mode.

Every key a recipe may set is declared here, with its type and default. Values marked
``MISSING`` are required: a recipe (or one of the files its ``defaults:`` list composes, or a
command-line override) must provide them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from imontage.config.imagic import ImagicConfig
from imontage.config.keyframes import KeyframesConfig
from imontage.config.validation import ValidationConfig
from imontage.models.lora import LoraConfig
from imontage.models.registry import DEFAULT_FAMILY, FAMILIES

PAIR_LAYOUTS = ("half", "interleaved")
POSITION_LAYOUTS = ("video3d", "montage", "shared", "editverse4d")
TEXT_ENCODERS = ("byte", "precomputed")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash")
PREDICTIONS = ("velocity", "data")
OBJECTIVES = ("flow_matching", "flow_dpo")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("local", "deepspeed")
FRAME_SAMPLINGS = ("stride", "fps")
NONFINITE_MODES = ("skip", "fail")


@dataclass
class RopeConfig:
    # Rotary pairs per axis in the order (s, t, h, w); their sum may be below head_dim / 2,
    # and the pairs left over are not rotated.
    bands: list[int] = field(default_factory=lambda: [0, 22, 21, 21])
    theta: list[float] = field(default_factory=lambda: [10000.0, 10000.0, 10000.0, 10000.0])
    pair_layout: str = "half"  # "half": (x[i], x[i + D/2]); "interleaved": (x[2i], x[2i+1])


@dataclass
class PositionConfig:
    layout: str = "video3d"  # one of POSITION_LAYOUTS
    virtual_frames: int = 32  # montage: V, the length of the virtual clip
    head_window: int = 8  # montage: A, frames spanned by the condition images
    tail_window: int = 8  # montage: B, frames spanned by the target images


@dataclass
class SharedModelConfig:
    """The keys of the ``model`` section every family reads; :data:`ModelConfig` adds each
    registered family's own section (``model.<family>``, only read by that family)."""

    # A family of imontage.models.registry: "dit" (imontage's own DiT), "wan", "hunyuan_video", ...
    family: str = DEFAULT_FAMILY
    in_channels: int = MISSING
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (pt, ph, pw)
    hidden_size: int = MISSING
    depth: int = MISSING
    num_heads: int = MISSING
    mlp_hidden_size: int = MISSING
    text_encoder: str = "byte"  # "byte": built-in byte tokenizer; "precomputed": embeddings given
    text_dim: int = MISSING  # width of the text embeddings fed to the model
    max_text_len: int = 128  # text tokens kept per text segment
    qk_norm: bool = True
    # What the network's last layer predicts; forward() always returns the velocity ε − x0.
    # "data" predicts clean tokens x0 and returns (x_t − x0)/t: easier for narrow models on wide
    # pixel patches, which must otherwise reproduce the noise exactly.
    prediction: str = "velocity"
    min_timestep: float = 0.05  # "data": t is clamped to this in the division
    attention_backend: str = "auto"  # "auto": flash-attn on CUDA when installed, else SDPA
    rope: RopeConfig = field(default_factory=RopeConfig)
    positions: PositionConfig = field(default_factory=PositionConfig)
    stated_params: float = 0.0  # the size a preset is named for; 0 when it claims none
    # A model whose networks split the timesteps (its family's experts: Wan 2.2 A14B's `transformer`
    # for high noise, `transformer_2` for low noise): the one this run builds and trains alone, its
    # timesteps drawn only in its range; "" = every expert in one run, each step's expert drawn
    # alike on every rank (docs/finetune_wan.md).
    expert: str = ""
    # A diffusers model folder (config.json + diffusion_pytorch_model*.safetensors) of this family's
    # class that the first stage starts from (a stage's own init_from wins), or a pipeline folder
    # (model_index.json), of which model.expert's subfolder is read (every expert's when none is
    # named); "" = none.
    init_from_diffusers: str = ""
    # Low-rank adapters and partial fine-tuning (imontage/models/lora.py): with a rank or a
    # trainable list, the base model is frozen and only adapters and listed parameters train.
    lora: LoraConfig = field(default_factory=LoraConfig)


if TYPE_CHECKING:
    ModelConfig = SharedModelConfig
else:
    # The shared keys, then model.<family> for each registered family that has keys of its own.
    ModelConfig = dataclasses.make_dataclass(
        "ModelConfig",
        [
            (name, record.config_section, field(default_factory=record.config_section))
            for name, record in FAMILIES.items()
            if record.config_section is not None
        ],
        bases=(SharedModelConfig,),
    )


@dataclass
class BucketConfig:
    """Sizes samples are trained at; each empty list keeps that dimension as stored."""

    image: list[list[int]] = field(default_factory=list)  # [H, W] buckets for images
    video: list[list[int]] = field(default_factory=list)  # [H, W] buckets for video frames
    frames: list[int] = field(default_factory=list)  # frame counts a video may keep


@dataclass
class VideoSamplingConfig:
    sampling: str = "stride"  # one of FRAME_SAMPLINGS: every `stride`-th frame, or `fps` frames a second
    stride: int = 1
    fps: float = 8.0
    max_frames: int = 16  # sampled frames kept per video (the first ones)


@dataclass
class BadDataConfig:
    strict: bool = False  # raise on the first bad shard or sample, naming it; else skip and count
    # Fraction of a worker's share of an epoch that may be skipped before the run stops.
    skip_budget: float = 0.01
    max_pixels: int = 16_777_216  # images and video frames with more pixels are skipped
    max_video_frames: int = 4096  # videos with more frames are skipped before decoding


@dataclass
class DatasetConfig:
    """One dataset of a mixture (for example the samples of one task)."""

    name: str = MISSING
    shards: str = MISSING
    weight: float = 1.0  # relative weight when data.mixture is empty


@dataclass
class MixturePoint:
    step: int = MISSING
    weights: dict[str, float] = field(default_factory=dict)  # dataset name -> weight; unnamed ones weigh 0


@dataclass
class DataConfig:
    # One dataset: globs, brace ranges, paths or `pipe:` commands, comma-separated. Or `datasets`.
    shards: str = ""
    datasets: list[DatasetConfig] = field(default_factory=list)  # several datasets, each batch from one
    mixture: list[MixturePoint] = field(default_factory=list)  # weights over steps, linear between points
    batch_size: int = 8  # samples per micro-batch at most (0: no cap); without max_tokens, exactly
    max_tokens: int = 0  # token budget of a micro-batch; 0: batches of batch_size samples
    pack_buffer: int = 64  # samples the packer chooses from, decoded once picked (with max_tokens)
    shuffle_buffer: int = 64  # raw samples; 0 reads shards and samples in stored order
    num_workers: int = 0  # DataLoader worker processes; 0 reads in the training process
    prefetch: int = 2  # batches each worker prepares ahead
    seed: int = 0
    # Text from each sample's `text_embedding` member rather than its string (text_encoder=precomputed).
    text_embeddings: bool = False
    # Folder of shard indexes by file name; "": beside each local shard. `pipe:` shards need one.
    index_dir: str = ""
    buckets: BucketConfig = field(default_factory=BucketConfig)
    video: VideoSamplingConfig = field(default_factory=VideoSamplingConfig)
    bad_data: BadDataConfig = field(default_factory=BadDataConfig)
    # DreaMontage: which stored keyframe latents condition their clip, and how (imontage/data/keyframes.py).
    keyframes: KeyframesConfig = field(default_factory=KeyframesConfig)


@dataclass
class ParallelConfig:
    device: str = "auto"  # "auto": CUDA when available
    # "local": one process, torch AdamW. "deepspeed": every rank of torchrun/SLURM, ZeRO over DP×CP.
    engine: str = "local"
    tensor_parallel: int = 1  # TP: heads and MLP split with megatron-core's parallel linears
    context_parallel: int = 1  # CP (Ulysses): the packed sequence split, all-to-all around attention
    sequence_parallel: bool = False  # with TP: activations between blocks' linears on N/TP token shards
    zero_stage: int = 3  # DeepSpeed ZeRO stage over the data-parallel ranks (engine=deepspeed)
    activation_checkpointing: bool = False  # recompute each block in the backward pass


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class FlowMatchingConfig:
    t_mean: float = 0.0  # logit-normal: t = sigmoid(n), n ~ N(t_mean, t_std)
    t_std: float = 1.0
    shift: float = 1.0  # t -> shift * t / (1 + (shift - 1) * t); > 1 favours noisier t
    text_dropout: float = 0.1  # probability of training a sample without its text (for CFG)
    # The distilled guidance scale fed to a model with a guidance embedding (HunyuanVideo T2V's
    # guidance_embeds), per sample; null: 1.0, what finetrainers and musubi-tuner fine-tune it at
    # (imontage.models.common.sequence.DEFAULT_EMBEDDED_GUIDANCE). A model without one refuses a value.
    embedded_guidance: float | None = None


@dataclass
class DPOConfig:
    """Stages with ``objective: flow_dpo`` (t is drawn as ``flow_matching`` says; no text dropout)."""

    # Scales error differences into logits: thousands for latent ε/velocity MSE (Diffusion-DPO's
    # scripts use 2500-5000 on SD latents); see docs/recipes.md.
    beta: float = 2500.0


@dataclass
class SampleConfig:
    every: int = 0  # write a sample grid every N steps; 0 disables
    num_samples: int = 4
    steps: int = 20  # Euler steps of the flow ODE
    guidance: float = 3.0  # classifier-free guidance scale; 1 disables
    shift: float = 1.0
    use_ema: bool = True


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (and always at the end of a stage); 0: only at the end
    keep_last: int = 0  # prune older complete checkpoints beyond this many; 0 keeps all


@dataclass
class FaultConfig:
    """How a run meets faults: numerical ones, preemption signals, stuck collectives.

    The requeue limit is not here: it belongs to the job (``tools/submit.py --max-requeues``, read
    from ``IMONTAGE_MAX_REQUEUES``), since a requeued job runs the same recipe again.
    """

    # A non-finite loss or gradient norm on any rank: "skip" the optimiser step everywhere, or "fail".
    nonfinite: str = "skip"  # one of NONFINITE_MODES
    max_consecutive_skips: int = 10  # "skip": bad steps in a row that are skipped; one more stops the run
    spike_factor: float = 3.0  # a loss above this × the max of the last spike_window is a spike; 0: off
    spike_window: int = 100  # finite losses the spike detector remembers (it reports once it holds them all)
    stop_signals: list[str] = field(default_factory=lambda: ["SIGUSR2", "SIGTERM"])  # checkpoint, then stop
    timeout_first_step_s: float = 1800.0  # collective timeout until the first step is done (start-up)
    timeout_s: float = 600.0  # collective timeout after the first step: a lost rank fails the job this fast


@dataclass
class TrainConfig:
    precision: str = "fp32"  # "bf16": torch.autocast (engine local) or DeepSpeed's bf16 weights
    grad_accumulation: int = 1  # micro-batches (packed batches) per optimiser step and rank
    log_every: int = 1
    ema_decay: float = 0.999  # 0 disables EMA
    resume: str = "auto"  # "auto": continue from RUN_DIR/checkpoints/latest; "never"; or a path
    stop_at_step: int = 0  # stop once this global step is done (a checkpoint is saved); 0: never
    # Run this stage only (command line: stage=NAME), from the previous stage's final checkpoint.
    only_stage: str = ""
    progress: bool = True
    deterministic: bool = True  # torch.use_deterministic_algorithms
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)


def _overrides_of(cls: type) -> type:
    """A dataclass with the same field names as ``cls``, each optional and unset by default.

    Stages override a few keys of the top-level sections; an unset key keeps the top-level
    value, so the override schema must tell "not given" from "given the default".
    """
    fields = [(f.name, Any, field(default=None)) for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(f"{cls.__name__}Overrides", fields)


DataOverrides: Any = _overrides_of(DataConfig)
OptimOverrides: Any = _overrides_of(OptimConfig)
ValidationOverrides: Any = _overrides_of(ValidationConfig)


@dataclass
class StageConfig:
    name: str = MISSING
    objective: str = MISSING  # one of OBJECTIVES
    steps: int = MISSING
    data: Any = field(default_factory=DataOverrides)
    optim: Any = field(default_factory=OptimOverrides)
    validation: Any = field(default_factory=ValidationOverrides)  # this stage's held-out sets and settings
    # Weights the stage starts from instead of the previous stage's: a consolidated safetensors
    # file (tools/convert_checkpoint.py consolidate) or a training checkpoint directory; "" = none.
    init_from: str = ""


@dataclass
class RecipeConfig:
    name: str = MISSING
    run_dir: str = MISSING
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    # imontage-imagic's settings (imontage/config/imagic.py); the trainer does not read them.
    imagic: ImagicConfig = field(default_factory=ImagicConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Held-out validation (imontage/config/validation.py); a stage's `validation` overrides it.
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    stages: list[StageConfig] = field(default_factory=list)


# Config groups a recipe's `defaults:` list may compose, each from configs/<group>/<name>.yaml.
GROUPS = ("model", "data", "parallel", "optim")

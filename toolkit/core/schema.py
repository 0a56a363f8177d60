"""The recipe's schema: one dataclass per section, the base every architecture's model section
extends, and the limits past which a size is a typo. Plain data: loading, the registry lookups and
the checks across sections are `toolkit.runs.recipe`'s."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.core.config import setting


@dataclass(frozen=True)
class StorageConfig:
    """How shards at a URL (s3://, gs://, https://) are reached; never a credential: those come
    from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the AWS configuration."""

    # An S3-compatible store (MinIO, Ceph RGW, ...); null: AWS_ENDPOINT_URL, else AWS itself.
    endpoint_url: str | None = None
    # null: AWS_REGION / AWS_DEFAULT_REGION, or the AWS configuration's.
    region: str | None = None
    # Read a public bucket without credentials.
    anonymous: bool = False
    # Tries of a request that fails for a transient reason (a reset connection, a timeout, a
    # 5xx, throttling), with exponential backoff and jitter between them; then the job stops.
    attempts: int = setting(8, gt=0, le=100)
    # A node-local folder where each shard read from the store is kept whole, named by its
    # sha256 (checked when fetched), for data read every epoch; null: stream every epoch.
    cache_dir: str | None = None


@dataclass
class DataConfig:
    # Folder written by `python -m toolkit.shard`, holding manifest.json and the tar shards, or
    # its URL in an object store (s3://bucket/prefix; any fsspec URL).
    shards: str = "data/lensing-shards"
    # Where an object store is and how hard to try it (a URL's shards only).
    storage_options: StorageConfig = field(default_factory=StorageConfig)
    # Super-resolution factor: HR side = LR side * scale.
    scale: int = setting(2, choices=(2, 3, 4))
    # Samples per process per optimiser micro-step (the global batch is this x world size).
    batch_size: int = setting(64, gt=0)
    # Validation batch per process; null: same as batch_size.
    val_batch_size: int | None = setting(None, gt=0)
    # DataLoader worker processes per rank (0: load in the training process).
    num_workers: int = setting(4, ge=0)
    # Samples held in the shuffle buffer of each worker (0: no sample shuffling).
    shuffle_buffer: int = setting(1000, ge=0)
    # How LR inputs are made from HR-only shards (paired shards carry their own LR).
    degrade: str = setting("bicubic", choices=("bicubic",))
    # Random flips and 90-degree rotations; the workload used none.
    augment: bool = False
    # How values are mapped for the model (toolkit/data/normalise.py): unit, none, minmax,
    # percentile[:lo,hi], asinh[:soft]; null: what the shards' manifest records. The run's
    # recipe.yaml holds the one used.
    normalise: str | None = None
    # Train on this many samples of the train split (a label-efficiency study); null: all.
    # More than the split holds is refused. Validation is never cut.
    limit: int | None = setting(None, gt=0)
    # Labelled shards (`shard --labels`): train on this many samples of each class (stratified);
    # null: all. A class with fewer is refused (a smaller class taken whole would unbalance the
    # set the study meant to balance). Not together with limit.
    per_class: int | None = setting(None, gt=0)
    # Seed of the subset's choice, apart from train.seed so that every run of a study trains on
    # the same samples. Samples are ranked once by a hash of (this seed, their key), within their
    # class for per_class, and the first N taken: the 10 of a class are among its 30.
    subset_seed: int = setting(0, ge=0)
    # Hold out this fraction of the train split (chosen by a hash of data.subset_seed and each
    # key, so nested and the same for every run of a study) and evaluate on it instead of the
    # val split, which the run then never reads: the split to choose hyperparameters on, so
    # that the numbers reported on val are not tuned to it. null: train on the whole split.
    holdout: float | None = setting(None, gt=0, lt=1)


@dataclass
class InitConfig:
    # Run directory, checkpoint or .safetensors file of an earlier stage to start from, matched
    # by parameter name; null: random init.
    from_: str | None = setting(None, key="from")
    # What to take from it: the model weights only (the optimiser starts fresh).
    load: str = setting("weights", choices=("weights",))


@dataclass
class GroupRule:
    # Regular expression searched in each trainable parameter's name; the first matching rule wins.
    match: str = setting()
    # Learning rate for the group; null: optim.lr.
    lr: float | None = setting(None, gt=0)
    # Weight decay for the group; null: optim.weight_decay (norms, biases, position embeddings: 0).
    weight_decay: float | None = setting(None, ge=0)


@dataclass
class SchedulerConfig:
    # cosine_warm_restarts (the workload's), cosine (with linear warmup) or constant.
    name: str = setting(
        "cosine_warm_restarts", choices=("cosine_warm_restarts", "cosine", "constant")
    )
    # Epochs until the first restart (cosine_warm_restarts), stepped per optimiser step.
    T_0: int = setting(10, gt=0)
    # Factor by which each restart period grows (cosine_warm_restarts).
    T_mult: int = setting(1, ge=1)
    # Floor of the learning rate.
    eta_min: float = setting(0.0, ge=0)
    # Optimiser steps of linear warmup from 0 (cosine).
    warmup_steps: int = setting(0, ge=0)


@dataclass
class OptimConfig:
    # Optimiser; AdamW as in the workload.
    name: str = setting("adamw", choices=("adamw",))
    # Base learning rate: parameters that no group rule matches.
    lr: float = setting(5.0e-4, gt=0)
    # Base decoupled weight decay.
    weight_decay: float = setting(1.0e-4, ge=0)
    # Adam betas (beta1, beta2), each in [0, 1).
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # Adam epsilon.
    eps: float = setting(1.0e-8, gt=0)
    # Ordered param-group rules; a rule that matches no trainable parameter is an error.
    groups: list[GroupRule] = field(default_factory=list)
    # Layer-wise learning-rate decay of a ViT (mae, srmae, vit_classifier), as in the BEiT and
    # MAE finetuning: the parameters of layer l train at lr x layer_decay^(depth + 1 - l), where
    # the patch embedding is layer 0, encoder block i is layer i + 1, and everything after the
    # blocks (the encoder's last norm, head, decoder, SR layers) is layer depth + 1, at the full
    # rate. It multiplies the lr each parameter has without it (its group rule's, or optim.lr),
    # schedule floor (eta_min) included, and splits each group by layer; weight decay as
    # without. null or 1.0: off.
    layer_decay: float | None = setting(None, gt=0, le=1)
    # Learning-rate schedule; each group follows it from its own base lr.
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class TrainConfig:
    # Passes over the training split.
    epochs: int = setting(1, ge=0)
    # Stop after this many optimiser steps; null: run all epochs.
    max_steps: int | None = setting(None, gt=0)
    # Pixel loss of tasks that take one (sr: l1 or mse); null: the task's own (sr: l1; mae: its
    # masked-patch MSE).
    loss: str | None = setting(None, choices=("l1", "mse"))
    # Mixed precision: bf16 or no.
    precision: str = setting("bf16", choices=("bf16", "no"))
    # Micro-batches accumulated per optimiser step.
    grad_accum: int = setting(1, gt=0)
    # Maximum global gradient norm; null: no clipping.
    grad_clip: float | None = setting(1.0, gt=0)
    # Seed for model init, masking and data order (each rank derives its own stream).
    seed: int = setting(0, ge=0)
    # Evaluate every N optimiser steps; 0: at the end of each epoch.
    eval_every: int = setting(0, ge=0)
    # Checkpoint every N optimiser steps; 0: only at epoch ends and at the end.
    checkpoint_every: int = setting(500, ge=0)
    # Complete checkpoints kept on disk (older ones are deleted).
    keep_last: int = setting(3, gt=0)
    # Log training scalars every N optimiser steps (the loss is read from the device then).
    log_every: int = setting(10, gt=0)
    # Compile the model with torch.compile (in place: parameter names do not change, so
    # checkpoints move freely between compiled and uncompiled runs).
    compile: bool = False
    # Keep the model's 4-D weights, and so its convolutions' activations, channels-last (NHWC):
    # the layout oneDNN's CPU convolutions and cuDNN's tensor-core kernels run fastest in. Values
    # are unchanged up to rounding; a ViT's linear layers are not affected.
    channels_last: bool = False


@dataclass
class DeepSpeedConfig:
    # ZeRO stage: 0 (DeepSpeed without sharding), 1 (optimiser state), 2 (+gradients), 3 (+params).
    zero_stage: int = setting(2, choices=(0, 1, 2, 3))
    # Keep optimiser state in CPU memory (ZeRO >= 1).
    offload_optimizer: str = setting("none", choices=("none", "cpu"))
    # Keep parameters in CPU memory (ZeRO 3).
    offload_param: str = setting("none", choices=("none", "cpu"))
    # Data type of the gradients ranks exchange: fp32 keeps every bit of the bf16 run's gradient
    # sums (twice the traffic); null: DeepSpeed's own (the training precision).
    grad_comm_dtype: str | None = setting(None, choices=("fp32", "bf16"))


@dataclass
class ClusterConfig:
    # Slurm nodes for the job.
    nodes: int = setting(1, gt=0)
    # GPUs per node, one task each; 0: CPU nodes, one task per node.
    gpus_per_node: int = setting(8, ge=0)
    # Slurm generic resources instead of --gpus-per-node, e.g. gpu:a100:8 (its count, the last
    # number, is then the GPUs per node); null: --gpus-per-node.
    gres: str | None = None
    # Memory per node, Slurm syntax (e.g. 64G); null: the site's default.
    mem: str | None = None
    # Slurm workload characterisation key; null: none (sites that enforce wckeys name theirs).
    wckey: str | None = None
    # Slurm partition; null: the site's default.
    partition: str | None = "gpu"
    # Wall-clock limit, Slurm syntax: MM, HH:MM:SS or D-HH:MM:SS.
    time: str = "24:00:00"
    # Slurm account to charge; null: the user's default.
    account: str | None = None
    # Slurm quality of service; null: the default.
    qos: str | None = None
    # Slurm node feature constraint; null: none.
    constraint: str | None = None
    # CPU cores per task (data loading workers live here).
    cpus_per_task: int = setting(8, gt=0)
    # Requeue the job after preemption or a time-limit warning, resuming from the checkpoint.
    requeue: bool = True


@dataclass
class RunConfig:
    # Run directory; null: runs/<name>.
    dir: str | None = None


# Sizes past these are typos, not models (a depth with hundreds of digits would hang the dry run
# that builds the model to count its parameters): refused when the recipe is read.
MAX_LAYERS = 1024
MAX_WIDTH = 65536


@dataclass
class ModelBase:
    """What every architecture's section has; each registered architecture extends it with its
    own fields (`toolkit/models/<arch>.py`) and may add checks in `problems`."""

    # Architecture, a name registered in toolkit.models (mae, srmae, edsr, rcan, ...); null: the
    # task's own (mae: mae, sr: srmae).
    arch: str | None = None
    # Image channels: 1 for the lensing data, 3 for RGB photographs.
    in_chans: int = setting(1, gt=0, le=MAX_WIDTH)
    # Side of the square HR image (or HR training crop) the model works on.
    img_size: int = setting(150, gt=0, le=MAX_WIDTH)

    def problems(self) -> Iterator[tuple[str, str]]:
        """(field, message) for each cross-field problem of this section."""
        return iter(())


@dataclass
class Recipe:
    # Run name, used for the default run directory runs/<name>.
    name: str = "run"
    # What is trained and how it is scored, a name registered in toolkit.tasks: mae (masked-
    # autoencoder pretraining), sr (super-resolution), ...
    task: str = ""
    # Row name in reports (e.g. "frozen encoder"); null: made from the architecture and freeze.
    label: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    # Its fields are those of the architecture `arch` names (toolkit/models/<arch>.py): the recipe
    # loader builds it from that architecture's dataclass, a subclass of ModelBase.
    model: ModelBase = field(default_factory=ModelBase)
    init: InitConfig = field(default_factory=InitConfig)
    # Parameters that do not train: the architecture's named modes (srmae: encoder, mae) or
    # regular expressions searched in parameter names; each must match a parameter.
    freeze: list[str] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # DeepSpeed settings; null: plain DDP.
    deepspeed: DeepSpeedConfig | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.name

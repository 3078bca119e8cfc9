"""The `latte train` config: one dataclass, its fields are the keys of configs/training/*.yaml.

Defaults are the original Sky Timelapse recipe (Latte-XL/2, AdamW 1e-4 without weight decay, EMA
0.9999, gradient clipping to 0.1 from step 20,000, seed 3407). `validate()` runs once at the edge and
turns every impossible combination into a one-line ConfigError naming the key and the fix.
"""
from dataclasses import dataclass, field, fields

from models.config import ConfigError
from models.dtypes import DTYPE_NAMES, device_dtype_problem
from models.registry import MODEL_NAMES
from trainer.draws import BatchLayout


# Keys that fix the network's shapes: a resumed run must agree with its checkpoint on these.
ARCH_KEYS = ("model_name", "num_frames", "num_classes", "learn_sigma", "hidden_size", "depth", "num_heads")

# Keys that may change when a run is resumed because they cannot change what it computes: a resumed
# run with other values still repeats the uninterrupted one exactly. Every other key of the resolved
# config must equal the checkpoint's, or `--resume_allow_changes True` must say the change is meant.
RESULT_NEUTRAL_KEYS = frozenset({
    # where things go and how a resume is asked for
    "output_folder", "resume", "resume_allow_changes",
    # when to stop: a constant schedule continues the same trajectory however long it runs (a cosine
    # schedule ends at train_steps, so there it is compared: see resume_changes)
    "train_steps",
    # how often to write down what happened
    "ckpt_every", "keep_checkpoints", "log_every", "progress",
    # the held-out loss is measured without touching the training state (val_entries is not here:
    # it decides which entries are trained on)
    "val_every", "val_timesteps",
    # initial weights: read only by a fresh run, never by a resumed one
    "pretrained",
    # how fast, not what: the readers fill draws by number, in any order (cpu_threads is not here: the
    # thread count may change how kernels split a float sum, so the bits)
    "num_workers",
    # whether a launcher gives the ranks: the world size it gives is compared through the global batch
    "use_parallel",
})

# What one optimizer step averages over: world size x batch_size x gradient_accumulation_steps clips
# (the world size comes from the launcher and is kept in the checkpoint's sampler state). Only their
# product, the global batch, fixes what a run computes: every sample's order and randomness is keyed
# by its global position (trainer/draws.py), so a resume may trade ranks for accumulation steps (elastic
# resume) and differ only in how a step's float sums are split. `resume_changes` compares
# `global_batch(layout)`, never the factors.
BATCH_KEYS = ("world_size", "batch_size", "gradient_accumulation_steps")


def batch_layout(config, world_size, rank=0):
    """The `BatchLayout` of a config (a TrainConfig or its dict) run on `world_size` ranks."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    return BatchLayout(world_size, get("batch_size"), get("gradient_accumulation_steps"), rank)


def global_batch(layout):
    """Clips per optimizer step, as `BatchLayout` defines it."""
    return layout.global_batch


def resume_changes(saved, cfg, saved_world_size, world_size):
    """[(key, checkpoint's value, current value)] of every result-changing difference between a
    checkpoint's resolved config (`saved`, a dict) and `cfg`. Keys the checkpoint predates are skipped."""
    neutral = RESULT_NEUTRAL_KEYS - {"train_steps"} if cfg.lr_schedule == "cosine" else RESULT_NEUTRAL_KEYS
    changes = []
    for f in fields(cfg):
        if f.name in neutral or f.name in BATCH_KEYS or f.name not in saved:
            continue
        if saved[f.name] != getattr(cfg, f.name):
            changes.append((f.name, saved[f.name], getattr(cfg, f.name)))
    before, now = global_batch(batch_layout(saved, saved_world_size)), global_batch(batch_layout(cfg, world_size))
    if before != now:
        changes.append(("global_batch", before, now))
    return changes


@dataclass
class TrainConfig:
    # -- data -------------------------------------------------------------------------------------
    data_source: str = field(default="cache", metadata={
        "choices": ("cache", "video"),
        "help": "cache: latents from `latte ingest`; video: raw frame folders/videos, VAE-encoded on the fly"})
    cache_folder: str = field(default="", metadata={
        "help": "latent cache written by `latte ingest` (data_source cache): a folder or a URL (s3://bucket/prefix)"})
    s3_endpoint_url: str = field(default="", metadata={
        "help": "S3-compatible endpoint for an s3:// cache_folder (default: AWS_ENDPOINT_URL, else AWS)"})
    data_folder: str = field(default="", metadata={"help": "frame folders / videos (data_source video)"})
    vae_checkpoint: str = field(default="", metadata={"help": "converted SD VAE weights (data_source video)"})
    vae_micro_batch: int = field(default=8, metadata={"help": "frames per VAE encoder call (data_source video)"})
    image_size: int = field(default=256, metadata={"help": "frame size for data_source video (latents are 8x smaller with the SD VAE)"})
    num_frames: int = field(default=16, metadata={"help": "frames per training clip"})
    sample_stride: int = field(default=3, metadata={"help": "take every k-th frame of the source"})
    latent_sample: str = field(default="sample", metadata={
        "choices": ("sample", "mean"),
        "help": "sample: (mean + std*eps)*0.18215 drawn anew each time, as the original; mean: mean*0.18215"})
    scale_factor: str = field(default="", metadata={
        "help": "latent scale: '' the cache's recorded one (0.18215, SD's), 'auto' the unit-variance factor "
                "`latte cache stats` recorded, or a number"})
    val_entries: int = field(default=0, metadata={"help": "entries held out for the validation loss (0: none)"})
    val_every: int = field(default=0, metadata={"help": "validation loss every N steps (0: never)"})
    val_timesteps: int = field(default=8, metadata={"help": "evenly spaced t at which each held-out clip is scored"})
    num_workers: int = field(default=2, metadata={"help": "data reader threads"})

    # -- model ------------------------------------------------------------------------------------
    model_name: str = field(default="Latte-XL/2", metadata={
        "choices": MODEL_NAMES, "help": "Latte variant (its patch size; width/depth/heads unless overridden)"})
    hidden_size: int = field(default=0, metadata={"help": "override the variant's width (0: the variant's)"})
    depth: int = field(default=0, metadata={"help": "override the variant's depth (0: the variant's)"})
    num_heads: int = field(default=0, metadata={"help": "override the variant's heads (0: the variant's)"})
    num_classes: int = field(default=0, metadata={
        "help": "0: unconditional, or on a labelled cache (`latte ingest --labels`) its class count; >0: "
                "class-conditional on the cache's label column, with label dropout"})
    class_dropout_prob: float = field(default=0.1, metadata={"help": "label dropout for classifier-free guidance"})
    learn_sigma: bool = True
    pretrained: str = field(default="", metadata={"help": "initial Latte weights (.ckpt/.safetensors); ema group preferred"})
    dtype: str = field(default="fp32", metadata={"choices": DTYPE_NAMES, "help": "matmul precision"})
    use_recompute: bool = field(default=False, metadata={"help": "recompute block activations in backward (less memory)"})
    enable_flash_attention: bool = field(default=False, metadata={"help": "Ascend only"})

    # -- optimisation -----------------------------------------------------------------------------
    batch_size: int = field(default=5, metadata={"help": "clips per rank per micro-batch (the original's local_batch_size)"})
    gradient_accumulation_steps: int = 1
    train_steps: int = field(default=1_000_000, metadata={"help": "optimizer steps in all (may change on resume)"})
    learning_rate: float = 1e-4
    lr_schedule: str = field(default="constant", metadata={"choices": ("constant", "cosine")})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup from 0 over this many steps"})
    min_learning_rate: float = field(default=0.0, metadata={"help": "cosine schedule's final value"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled (AdamW) weight decay"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_max_norm: float = field(default=0.1, metadata={"help": "gradient clipping max norm (0: never clip)"})
    start_clip_iter: int = field(default=20_000, metadata={"help": "first step that clips"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per step (0: EMA equals the weights)"})
    loss_scale: float = field(default=65536.0, metadata={"help": "initial dynamic loss scale (dtype fp16 only)"})
    loss_scale_window: int = field(default=1000, metadata={"help": "finite steps before the loss scale doubles"})

    # -- run --------------------------------------------------------------------------------------
    output_folder: str = field(default="results/sky", metadata={"help": "checkpoints, logs, config and loss curve"})
    resume: str = field(default="", metadata={"help": "'' fresh; 'auto' newest valid checkpoint in output_folder; or a path"})
    resume_allow_changes: bool = field(default=False, metadata={
        "help": "resume even though result-changing keys differ from the checkpoint's (the run then differs "
                "from an uninterrupted one)"})
    ckpt_every: int = field(default=10_000, metadata={"help": "checkpoint every N steps (and always at the end)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "periodic checkpoints kept (the final one always is)"})
    log_every: int = field(default=1, metadata={"help": "JSONL log line every N steps"})
    seed: int = 3407
    use_parallel: bool = field(default=False, metadata={"help": "data parallel under msrun (one process per device)"})
    device_target: str = field(default="CPU", metadata={"choices": ("CPU", "GPU", "Ascend")})
    mode: str = field(default="graph", metadata={"choices": ("graph", "pynative")})
    cpu_threads: int = field(default=0, metadata={"help": "CPU intra-op threads (0: MindSpore's choice)"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar"})

    def validate(self):
        positive = ("num_frames", "sample_stride", "batch_size", "gradient_accumulation_steps", "train_steps",
                    "ckpt_every", "keep_checkpoints", "log_every", "val_timesteps", "vae_micro_batch", "image_size")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("val_entries", "val_every", "warmup_steps", "start_clip_iter", "num_workers", "cpu_threads",
                    "hidden_size", "depth", "num_heads", "num_classes"):
            if getattr(self, key) < 0:
                raise ConfigError(f"'{key}' must be >= 0, got {getattr(self, key)}")
        for key in ("learning_rate", "adam_eps", "loss_scale"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"'{key}' must be > 0, got {getattr(self, key)}")
        for key in ("adam_beta1", "adam_beta2", "ema_decay", "class_dropout_prob"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be in [0, 1), got {getattr(self, key)}")
        if self.weight_decay < 0 or self.clip_max_norm < 0 or self.min_learning_rate < 0:
            raise ConfigError("'weight_decay', 'clip_max_norm' and 'min_learning_rate' must be >= 0")
        if self.data_source == "cache" and not self.cache_folder:
            raise ConfigError("data_source is cache but 'cache_folder' is empty: pass --cache_folder DIR "
                              "(written by `latte ingest`)")
        if self.data_source == "video":
            if not self.data_folder:
                raise ConfigError("data_source is video but 'data_folder' is empty: pass --data_folder DIR")
            if not self.vae_checkpoint:
                raise ConfigError("data_source is video but 'vae_checkpoint' is empty: pass the converted "
                                  "SD VAE (`latte convert --kind vae ...`)")
        if self.val_every and not self.val_entries:
            raise ConfigError("'val_every' is set but 'val_entries' is 0: hold out some entries with --val_entries N")
        if self.resume not in ("", "auto") and not self.resume.endswith((".safetensors",)):
            raise ConfigError(f"'resume' is {self.resume!r}: use '', 'auto' or a step_*.safetensors checkpoint path")
        # Options that cannot run on the chosen device: say so now, not after minutes of setup.
        problem = device_dtype_problem(self.device_target, self.dtype, self.enable_flash_attention)
        if problem:
            raise ConfigError(problem)
        if self.hidden_size and self.num_heads and self.hidden_size % self.num_heads:
            raise ConfigError(f"'hidden_size' {self.hidden_size} is not divisible by 'num_heads' {self.num_heads}")
        if self.scale_factor not in ("", "auto"):
            try:
                ok = float(self.scale_factor) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"'scale_factor' is {self.scale_factor!r}: use '' (the cache's), 'auto' "
                                  f"(from `latte cache stats`) or a positive number")
        if self.depth % 2:
            raise ConfigError(f"'depth' {self.depth} must be even (blocks alternate spatial and temporal)")

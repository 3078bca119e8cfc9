"""The `latte ingest` config: one dataclass, its fields are the keys of configs/ingest/*.yaml.

Defaults are the paper's Sky Timelapse settings: 256 px frames, the original centre crop and bilinear
resize, the sd-vae-ft-mse VAE (scale factor 0.18215), latents stored as float16. Frames are read at
stride 1, so one cache serves every `num_frames` / `sample_stride` the trainer picks later.
`validate()` runs once at the edge; what needs the file system (folders, weights) is checked by the
pipeline before any work, also as one-line errors.
"""
from dataclasses import dataclass, field
from typing import Optional

from models.config import ConfigError

SD_VAE_CHANNELS = [128, 256, 512, 512]  # sd-vae-ft-mse


@dataclass
class IngestConfig:
    # -- what to read -----------------------------------------------------------------------------
    data_folder: str = field(default="", metadata={
        "help": "Sky Timelapse frame folders (nested or flat layout) and/or video files"})
    image_size: int = field(default=256, metadata={"help": "frames are centre-cropped and resized to this square"})
    frame_stride: int = field(default=1, metadata={
        "help": "encode every k-th source frame (1: all, so the cache serves any sample_stride later)"})
    min_frames: int = field(default=1, metadata={"help": "entries with fewer (strided) frames are recorded as skipped"})
    labels: str = field(default="", metadata={
        "help": "class labels: 'folder' (the first folder under data_folder, UCF-101 style), a CSV with "
                "columns id,label (unlisted entries are skipped), or '' for none"})

    # -- the VAE ----------------------------------------------------------------------------------
    vae_weights: Optional[str] = field(default=None, metadata={
        "help": "sd-vae-ft-mse converted by `latte convert --kind vae` (.ckpt / .safetensors)"})
    allow_random_vae: bool = field(default=False, metadata={
        "help": "tests/demo only: with vae_weights null, use a random VAE of the vae_* shape below"})
    random_vae_seed: int = field(default=0, metadata={"help": "seed of the random VAE (recorded as random-seed-<n>)"})
    vae_block_out_channels: list[int] = field(default_factory=lambda: list(SD_VAE_CHANNELS), metadata={
        "help": "VAE shape when the weights file does not record one (or for the random VAE)"})
    vae_layers_per_block: int = 2
    vae_latent_channels: int = 4
    vae_norm_num_groups: int = 32
    vae_dtype: str = field(default="fp32", metadata={
        "choices": ("fp32", "fp16", "bf16"), "help": "VAE compute precision (fp16/bf16 for GPU/Ascend)"})
    micro_batch: int = field(default=8, metadata={
        "help": "frames per VAE call; memory is bounded by this, not by video length"})
    scale_factor: float = field(default=0.18215, metadata={
        "help": "SD latent scale, recorded for the trainer (latents are stored unscaled)"})

    # -- the cache --------------------------------------------------------------------------------
    cache_folder: str = field(default="", metadata={
        "help": "the latent cache to create or continue: a folder or a URL (s3://bucket/prefix, zarr only)"})
    s3_endpoint_url: str = field(default="", metadata={
        "help": "S3-compatible endpoint for an s3:// cache_folder (default: AWS_ENDPOINT_URL, else AWS)"})
    format: str = field(default="zarr", metadata={"choices": ("zarr", "mindrecord"), "help": "store format"})
    dtype: str = field(default="float16", metadata={
        "choices": ("float16", "float32"), "help": "stored dtype of the posterior mean and std"})
    commit_every: int = field(default=64, metadata={
        "help": "commit the manifest every N entries (a crash redoes at most these)"})
    commit_seconds: float = field(default=300.0, metadata={"help": "... or every this many seconds"})
    chunk_frames: int = field(default=16, metadata={"help": "zarr frames per chunk (used when the cache is created)"})
    shard_frames: int = field(default=1024, metadata={
        "help": "zarr frames per shard file (used when the cache is created)"})
    segment_frames: int = field(default=16, metadata={
        "help": "mindrecord frames per record (used when the cache is created)"})

    # -- the run ----------------------------------------------------------------------------------
    resume_index: int = field(default=0, metadata={
        "help": "start at the N-th entry of the sorted order (committed entries are never touched)"})
    retry_failed: bool = field(default=False, metadata={"help": "also redo entries whose manifest row is failed"})
    num_shards: int = field(default=0, metadata={
        "help": "split the entries over K processes (0: msrun's RANK_SIZE / MS_WORKER_NUM, else 1)"})
    shard_index: int = field(default=-1, metadata={"help": "this process's shard (-1: msrun's RANK_ID / MS_NODE_ID)"})
    prefetch_batches: int = field(default=4, metadata={"help": "decoded batches the reader thread may run ahead"})
    progress: bool = field(default=True, metadata={"help": "tqdm bars over frames and entries"})
    device_target: str = field(default="CPU", metadata={"choices": ("CPU", "GPU", "Ascend")})
    mode: str = field(default="graph", metadata={"choices": ("graph", "pynative")})
    cpu_threads: int = field(default=1, metadata={
        "help": "MindSpore CPU threads (1 leaves a core to the reader thread; 0: MindSpore's choice)"})

    def validate(self):
        if not self.data_folder:
            raise ConfigError("'data_folder' is empty: pass --data_folder DIR (frame folders and/or videos)")
        if not self.cache_folder:
            raise ConfigError("'cache_folder' is empty: pass --cache_folder OUT (the latent cache to write)")
        for key in ("image_size", "frame_stride", "min_frames", "micro_batch", "commit_every", "prefetch_batches",
                    "chunk_frames", "shard_frames", "segment_frames", "vae_layers_per_block",
                    "vae_latent_channels", "vae_norm_num_groups"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' is {getattr(self, key)}; it must be a positive integer")
        if not self.vae_block_out_channels or min(self.vae_block_out_channels) < 1:
            raise ConfigError(f"'vae_block_out_channels' is {self.vae_block_out_channels}; "
                              f"give positive channel counts")
        if self.resume_index < 0:
            raise ConfigError(f"'resume_index' is {self.resume_index}; it must be >= 0 (0: from the first entry)")
        if self.commit_seconds <= 0:
            raise ConfigError(f"'commit_seconds' is {self.commit_seconds}; it must be > 0")
        if self.num_shards < 0:
            raise ConfigError(f"'num_shards' is {self.num_shards}; it must be >= 1 (or 0: from msrun's environment)")
        if self.num_shards and not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"'shard_index' is {self.shard_index} with num_shards {self.num_shards}; "
                              f"pass --shard_index 0..{self.num_shards - 1}")
        if not self.num_shards and self.shard_index != -1:
            raise ConfigError(f"'shard_index' is {self.shard_index} but 'num_shards' is not set; pass both")
        if self.labels and self.labels != "folder" and not self.labels.lower().endswith(".csv"):
            raise ConfigError(f"'labels' is {self.labels!r}: use 'folder', a FILE.csv with columns id,label, "
                              f"or '' for an unlabelled cache")
        if self.vae_weights in ("", None) and not self.allow_random_vae:
            raise ConfigError("'vae_weights' is not set: convert sd-vae-ft-mse with `latte convert --kind vae "
                              "--source diffusion_pytorch_model.bin --target sd-vae-ft-mse.ckpt` and pass "
                              "--vae_weights sd-vae-ft-mse.ckpt (random weights need allow_random_vae: true)")

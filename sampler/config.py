"""The `latte sample` config: one dataclass, its fields are the keys of configs/inference/*.yaml.

The model keys (model_name, image_size, num_frames, num_classes) default to null: the architecture is
taken from the checkpoint and these are only checked against it (sampler/sample.py). `validate()` runs
once at the edge and turns every impossible value into a one-line ConfigError naming the key and the fix.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from models.config import ConfigError
from models.dtypes import DTYPE_NAMES, device_dtype_problem
from models.registry import MODEL_NAMES


@dataclass
class SampleConfig:
    # -- what to load -----------------------------------------------------------------------------
    checkpoint: str = field(default="", metadata={
        "help": "Latte weights: a `latte train` step_*.safetensors, its output folder (newest checkpoint), "
                "or a `latte convert` .ckpt/.safetensors"})
    vae: str = field(default="", metadata={"help": "VAE weights (.ckpt/.safetensors from `latte convert --kind vae`)"})
    weights: str = field(default="ema", metadata={
        "choices": ("ema", "model"), "help": "which weights of a training checkpoint (a converted file holds one set)"})
    scale_factor: Optional[float] = field(default=None, metadata={
        "help": "latents are divided by this before decoding (null: the checkpoint's, else SD's 0.18215)"})
    # -- the model: taken from the checkpoint when it saved its architecture, else from these --------
    model_name: Optional[str] = field(default=None, metadata={
        "choices": MODEL_NAMES, "help": "Latte variant (null: from the checkpoint)"})
    image_size: Optional[int] = field(default=None, metadata={"help": "frame size in pixels (null: from the checkpoint)"})
    num_frames: Optional[int] = field(default=None, metadata={"help": "frames per video (null: from the checkpoint)"})
    num_classes: Optional[int] = field(default=None, metadata={
        "help": "0 unconditional, N class-conditional (null: from the checkpoint)"})
    learn_sigma: bool = field(default=True, metadata={"help": "used only for a checkpoint without saved architecture"})
    # -- sampling ---------------------------------------------------------------------------------
    num_samples: int = field(default=4, metadata={"help": "videos to generate"})
    batch_size: int = field(default=0, metadata={"help": "videos denoised together (0: all at once)"})
    sample_method: str = field(default="ddpm", metadata={"choices": ("ddpm", "ddim")})
    sampling_steps: int = field(default=250, metadata={"help": "denoising steps, evenly respaced from the 1000"})
    eta: float = field(default=0.0, metadata={"help": "DDIM noise (0: deterministic given x_T)"})
    guidance_scale: float = field(default=1.0, metadata={
        "help": "classifier-free guidance scale; > 1 needs a class-conditional model (1: off)"})
    class_labels: List[str] = field(default_factory=list, metadata={
        "help": "labels of the samples, cycled: class names the checkpoint carries, or indices "
                "(class-conditional models; default: 0, 1, 2, ... cycled)"})
    seed: int = field(default=42, metadata={"help": "sample i uses generators seeded by (seed, i)"})
    # -- device -----------------------------------------------------------------------------------
    dtype: str = field(default="fp32", metadata={"choices": DTYPE_NAMES, "help": "Latte matmul precision"})
    enable_flash_attention: bool = field(default=False, metadata={"help": "Ascend only"})
    device_target: str = field(default="CPU", metadata={"choices": ("CPU", "GPU", "Ascend")})
    mode: str = field(default="graph", metadata={"choices": ("graph", "pynative")})
    cpu_threads: int = field(default=0, metadata={"help": "CPU intra-op threads (0: MindSpore's choice)"})
    # -- output -----------------------------------------------------------------------------------
    output_folder: str = field(default="samples", metadata={"help": "a timestamped folder is made inside"})
    fps: int = field(default=8, metadata={"help": "frames per second of the GIF and MP4 files"})
    save_gif: bool = True
    save_mp4: bool = field(default=True, metadata={"help": "needs PyAV; skipped with a note without it"})
    save_latents: bool = field(default=False, metadata={"help": "also write latents.npy (N, F, C, h, w), scaled"})
    decode_micro_batch: int = field(default=8, metadata={"help": "frames per VAE decoder call (bounds memory)"})
    progress: bool = field(default=True, metadata={"help": "tqdm bar over the denoising steps"})

    def validate(self):
        for key in ("num_samples", "sampling_steps", "fps", "decode_micro_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("batch_size", "cpu_threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"'{key}' must be >= 0, got {getattr(self, key)}")
        for key in ("image_size", "num_frames", "num_classes"):
            value = getattr(self, key)
            if value is not None and value < (0 if key == "num_classes" else 1):
                raise ConfigError(f"'{key}' is {value}: use a positive number, or null to take it from the checkpoint")
        if self.sampling_steps > 1000:
            raise ConfigError(f"'sampling_steps' is {self.sampling_steps}: the diffusion has 1000 steps, ask for at most 1000")
        if self.eta < 0:
            raise ConfigError(f"'eta' must be >= 0, got {self.eta}")
        if self.eta and self.sample_method != "ddim":
            raise ConfigError(f"'eta' {self.eta} applies to DDIM only: set --sample_method ddim or --eta 0")
        if self.guidance_scale < 1:
            raise ConfigError(f"'guidance_scale' is {self.guidance_scale}: use 1 (no guidance) or more")
        if any(str(label).lstrip("-").isdigit() and int(label) < 0 for label in self.class_labels):
            raise ConfigError(f"'class_labels' {self.class_labels} must be >= 0")
        if self.scale_factor is not None and not self.scale_factor > 0:
            raise ConfigError(f"'scale_factor' must be > 0, got {self.scale_factor}")
        problem = device_dtype_problem(self.device_target, self.dtype, self.enable_flash_attention)
        if problem:
            raise ConfigError(problem)

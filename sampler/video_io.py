"""Kept so `from sampler import video_io` goes on working: the writers moved to models/video_io.py,
where `latte cache preview` (ingest/, which must not import sampler) can share them."""
from models.video_io import mp4_available, to_uint8, write_gif, write_grid, write_mp4  # noqa: F401

"""`latte ingest`: Sky Timelapse frame folders and videos -> SD VAE posterior per frame -> latent cache.

    from ingest import IngestConfig, run_ingest
    result = run_ingest(IngestConfig(data_folder=..., cache_folder=..., vae_weights=...))

Reading half: `sources.discover_entries` (one `Entry` per frame folder or video, sorted), `readers`
(`open_reader`, `probe`, `iter_frame_batches`: bounded batches, `EntryError` for a bad entry),
`transforms.transform_frames` (the original's crop + bilinear resize), `synthetic` (test data).
Writing half: `pipeline` (`run_ingest`, `prepare`, `status_lines`: the job loop) into a `cache_store`,
fed by `reader_thread.Prefetcher` (named events), with `vae_setup` (describe, build, encode) and
`shards.resolve_shards`; `cli.main` is `latte ingest`. Importing this package loads no MindSpore; the
pipeline does when it runs.
"""
from ingest.config import IngestConfig
from ingest.sources import Entry, EntryError, discover_entries

__all__ = ["IngestConfig", "Entry", "EntryError", "discover_entries", "run_ingest", "prepare", "main",
           "status_lines"]


def __getattr__(name):  # the pipeline imports cache_store, zarr and tqdm: only on first use
    if name == "main":
        from ingest import cli
        return cli.main
    if name in ("run_ingest", "prepare", "status_lines"):
        from ingest import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'ingest' has no attribute {name!r}")

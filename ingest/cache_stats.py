"""`latte cache stats CACHE`: per-channel latent statistics, frame counts and the unit-variance scale
factor of a cache, recorded in its attributes, with a histogram PNG.

    latte cache stats outputs/demo/cache                      # prints, records, writes CACHE/stats.png
    latte cache stats CACHE --output stats.png --record false --json true

The work is cache_store.stats (bottom layer); this is only its command line, here because the
`-c`/`--key` config machinery lives in models.config, which cache_store does not import.
`latte train --scale_factor auto` then trains on the recorded factor.
"""
import json
import sys
from dataclasses import dataclass, field

from models.config import ConfigError, parse_config


def with_positional(argv, key="cache_folder"):
    """`CACHE --k v` (or `--k v CACHE`) -> `--cache_folder CACHE --k v`: the cache is positional like
    `latte cache info`. Every option takes one value (lists are comma-separated), so a bare token
    where an option is due is the cache."""
    argv, out, positional, i = list(argv), [], [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-") and token not in ("-h", "--help") and "=" not in token and i + 1 < len(argv):
            out += argv[i:i + 2]
            i += 2
            continue
        (out if token.startswith("-") else positional).append(token)
        i += 1
    return ([f"--{key}", positional[0]] if positional else []) + out + positional[1:]


@dataclass
class StatsConfig:
    cache_folder: str = field(default="", metadata={"help": "the latent cache (also the first positional argument)"})
    output: str = field(default="", metadata={"help": "histogram PNG ('' : CACHE/stats.png)"})
    record: bool = field(default=True, metadata={
        "help": "store the result in the cache's attributes (what `latte train --scale_factor auto` reads)"})
    chunk_frames: int = field(default=64, metadata={"help": "frames read at a time (bounds memory)"})
    seed: int = field(default=0, metadata={"help": "seed of the posterior samples' noise"})
    json: bool = field(default=False, metadata={"help": "print the summary as JSON"})
    progress: bool = field(default=True, metadata={"help": "tqdm bar over frames"})

    def validate(self):
        if not self.cache_folder:
            raise ConfigError("no cache given: pass `latte cache stats CACHE` (a folder written by `latte ingest`)")
        if self.chunk_frames < 1:
            raise ConfigError(f"'chunk_frames' must be >= 1, got {self.chunk_frames}")


def format_summary(s):
    fmt = lambda v: " ".join(f"{x:8.4f}" for x in v)  # noqa: E731
    fc = s["frame_counts"]
    return "\n".join([
        f"entries:  {s['entries']} ok, {s['frames']} frames; frames per entry min {fc['min']}, "
        f"median {fc['median']:g}, mean {fc['mean']:.1f}, max {fc['max']} (p10 {fc['p10']:g}, p90 {fc['p90']:g})",
        f"posterior mean  per-channel mean {fmt(s['posterior_mean']['mean'])}",
        f"                per-channel std  {fmt(s['posterior_mean']['std'])}",
        f"samples         per-channel mean {fmt(s['sample']['mean'])}",
        f"                per-channel std  {fmt(s['sample']['std'])}",
        f"pooled sample std {s['sample']['pooled_std']:.5f} -> scale factor for unit variance "
        f"{s['scale_factor']:.5f} (the store records {s['recorded_scale_factor']}; SD's 0.18215 = 1/5.49)",
    ])


def main(argv=None):
    cfg = parse_config(StatsConfig, with_positional(sys.argv[1:] if argv is None else argv), prog="latte cache stats",
                       description="Per-channel latent statistics and the unit-variance scale factor of a cache.")
    import cache_store
    from cache_store.stats import compute_stats, plot_histograms, record_stats

    try:
        store = cache_store.open(cfg.cache_folder)
        stats = compute_stats(store, cfg.chunk_frames, cfg.seed, progress=cfg.progress)
        png = plot_histograms(stats, cfg.output or store.path / "stats.png", title=store.path.name)
        if cfg.record:
            record_stats(store.path, stats["summary"])
    except (ValueError, OSError) as err:
        print(f"latte cache stats: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    if cfg.json:
        print(json.dumps(stats["summary"], indent=2))
    else:
        print(format_summary(stats["summary"]))
    print(f"histogram: {png}" + (f"; recorded in {store.path}'s attributes" if cfg.record else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

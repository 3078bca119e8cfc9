"""Which shard of the sorted entries this process ingests: explicit, or the rank msrun gives each worker.

Entry i of the sorted order belongs to shard i % K (see `pipeline.prepare`).
"""
import os


def resolve_shards(cfg, environ=None):
    """(num_shards, shard_index, where they came from). --num_shards/--shard_index win; else msrun's
    environment: it exports RANK_ID/RANK_SIZE (and MS_NODE_ID/MS_WORKER_NUM) to every worker."""
    environ = os.environ if environ is None else environ
    if cfg.num_shards:
        return cfg.num_shards, cfg.shard_index, "--num_shards/--shard_index"
    for size_key, rank_key in (("RANK_SIZE", "RANK_ID"), ("MS_WORKER_NUM", "MS_NODE_ID")):
        size, rank = environ.get(size_key), environ.get(rank_key)
        if size is None or rank is None:
            continue
        try:
            k, i = int(size), int(rank)
        except ValueError:
            raise ValueError(f"environment {rank_key}={rank!r} {size_key}={size!r} are not integers: "
                             f"fix them or pass --num_shards K --shard_index I") from None
        if not 0 <= i < k:
            raise ValueError(f"environment {rank_key}={i} is outside 0..{size_key}-1={k - 1}: fix them or "
                             f"pass --num_shards K --shard_index I")
        return k, i, f"{rank_key}/{size_key}"
    if environ.get("MS_WORKER_NUM"):
        raise ValueError("msrun started this worker without a rank (several nodes and no --node_rank): pass "
                         "--node_rank to msrun, or --num_shards K --shard_index I")
    return 1, 0, "single process"

"""`latte ingest`: frame folders and videos -> VAE posterior (mean, std) of every frame -> a latent cache.

    latte ingest -c configs/ingest/sky.yaml --data_folder sky_train --cache_folder sky_cache \
        [--format zarr|mindrecord] [--resume_index N] [--retry_failed] [--num_shards K --shard_index I]
    msrun --worker_num 8 --local_worker_num 8 latte_cli.py ingest -c ...    (shards from msrun's rank)

Argument handling and exit codes only; the run itself is `ingest.pipeline` (see its docstring).
"""
import dataclasses
import os
import signal
import sys
import threading

import cache_store
from ingest.config import IngestConfig
from ingest.pipeline import prepare
from models.config import first_line, parse_config


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt  # a cluster's SIGTERM then commits finished entries like Ctrl-C does


BOOL_KEYS = {f.name for f in dataclasses.fields(IngestConfig) if f.type is bool}


def parse_args(argv):
    """`-c file.yaml --key value ...` -> IngestConfig. A bool key given alone (`--retry_failed`) means
    true, as the documented command line spells it."""
    argv = list(argv)
    expanded = []
    for k, token in enumerate(argv):
        expanded.append(token)
        if token.startswith("--") and token[2:] in BOOL_KEYS and (k + 1 == len(argv) or argv[k + 1].startswith("-")):
            expanded.append("true")
    return parse_config(IngestConfig, expanded, prog="latte ingest",
                        description="Encode frame folders / videos with the SD VAE into a resumable latent cache.")


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        print("latte ingest: msrun scheduler process; the workers do the ingest")
        return 0
    try:
        job = prepare(cfg, setup_device=True)
    except (ValueError, OSError) as err:
        print(f"latte ingest: error: {first_line(err)}", file=sys.stderr)
        return 2
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        job.run()
    except cache_store.StorageError as err:  # the object store went away mid-run: commits are kept
        print(f"latte ingest: error: {first_line(err)}", file=sys.stderr)
        return 1
    except ValueError as err:  # another process took this shard between prepare()'s check and now
        print(f"latte ingest: error: {first_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the disk filled up mid-run: finished entries are committed
        print(f"latte ingest: error: {first_line(err)}; rerun the same command to go on", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`latte cache info CACHE` and `latte cache verify CACHE`: `main(argv)` returns the exit code.

Exit codes: 0 fine, 1 verify found corruption, 2 the command could not run (bad path, not a cache).
"""
import argparse
import json
import os
import sys

from .store import open_store


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def cmd_info(args):
    info = open_store(args.out, args.s3_endpoint_url).info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    counts = ", ".join(f"{k} {v}" for k, v in info["by_status"].items())
    print(f"{info['path']}: {info['format']} latent cache (format version {info['format_version']})")
    print(f"entries:  {info['entries']} ({counts})")
    print(f"frames:   {info['frames']} in ok entries, {_size(info['latent_bytes'])} of latents")
    print(f"disk:     {_size(info['disk_bytes'])} used on disk, {_size(info['file_bytes'])} of file "
          f"sizes" + (" (MindRecord preallocates its pages; only the used part takes disk space)"
                      if info["format"] == "mindrecord" else ""))
    print("settings: " + ", ".join(f"{k}={v}" for k, v in sorted(info["settings"].items())))
    print("layout:   " + ", ".join(f"{k}={v}" for k, v in sorted(info["layout"].items())))
    for entry_id, status, reason in info["not_ok"]:
        print(f"{status.upper()} {entry_id}: {reason}")
    return 0


def _kept_meta(row):
    """What a failed row keeps of the ok row it hides: source, kind, frames, label and the extra meta."""
    meta = json.loads(row["extra"]) if row["extra"] else {}
    meta.update({k: row[k] for k in ("source", "kind", "source_bytes", "num_frames", "label") if k in row})
    return meta


def cmd_verify(args):
    store = open_store(args.out, args.s3_endpoint_url)
    n_ok = store.info()["by_status"]["ok"]
    problems = store.verify()
    for entry_id, what in problems:
        print(f"CORRUPT {entry_id}: {what}")
    if problems and args.mark_failed:
        # A newer 'failed' row hides the bad ok row, so `ingest --retry_failed` redoes the entry.
        rows = store.rows()
        with store.writer(name="verify") as w:
            for entry_id, what in problems:
                w.record_failure(entry_id, "failed", f"verify: {what}", _kept_meta(rows[entry_id]))
        print(f"marked {len(problems)} entries failed; rerun the ingest with --retry_failed")
    print(f"verified {n_ok} ok entries: {len(problems)} corrupt")
    return 1 if problems else 0


def build_parser():
    p = argparse.ArgumentParser(
        prog="latte cache", description="Inspect and check a latent cache.",
        epilog="also: `latte cache stats CACHE` (latent statistics, scale factor, histogram) and `latte cache "
               "preview CACHE --vae_weights VAE` (decode entries to GIF/MP4/PNG, reconstruction PSNR); "
               "see their --help.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="entries by status, frames, bytes, settings, failures")
    info.add_argument("out", metavar="CACHE", help="the cache folder or URL (the ingest's --cache_folder)")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=cmd_info)
    verify = sub.add_parser("verify", help="re-read every ok entry and check checksum and shape")
    verify.add_argument("out", metavar="CACHE", help="the cache folder or URL (the ingest's --cache_folder)")
    verify.add_argument("--mark_failed", action="store_true",
                        help="mark corrupt entries failed so `latte ingest --retry_failed` redoes them")
    verify.set_defaults(func=cmd_verify)
    for cmd in (info, verify):
        cmd.add_argument("--s3_endpoint_url", default=None,
                         help="S3-compatible endpoint for s3:// URLs (default: AWS_ENDPOINT_URL, else AWS)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # StorageError is both: an unreachable/refused object store
        print(f"latte cache: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `latte cache info ... | head`: the reader has what it wanted. Point stdout at /dev/null so
        # the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

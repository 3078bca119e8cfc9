"""Where a store lives: a local folder (the default, unchanged) or an fsspec URL such as s3://bucket/prefix.

`resolve(path_or_url, endpoint_url=None)` gives a `Location`. Local locations keep using the
file-system code in store.py / manifest.py / zarr_backend.py (temp file + rename + fsync + flock);
remote ones go through one fsspec filesystem (s3fs for s3://) with these primitives only:

- `cat` / `cat_range`: whole-object and byte-range GETs;
- `pipe`: one PUT of a whole object. On S3 a PUT is atomic (readers see the old object or the new one,
  never a torn one) and reads after it are strongly consistent, so it is the remote twin of
  "temp file, fsync, rename";
- `create_exclusive`: a conditional PUT (`If-None-Match: *`): exactly one of several racing creators
  wins; used for the store root and for the writers' leases;
- `ls` / `exists` / `rm` / `du`, listings never cached (another writer's commit must be seen).

Credentials and region come from botocore's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN / AWS_PROFILE / AWS_REGION, ~/.aws/config); the endpoint from `endpoint_url`, else
AWS_ENDPOINT_URL. Every call has bounded timeouts and retries, and every failure comes out as one
`StorageError` line that names the URL and the likely fix, never a key or a secret.
"""
import atexit
import json
import os
import socket
import time
from pathlib import Path

# Bounded: a refused connection fails in about a second, a black-holed endpoint in CONNECT_TIMEOUT x
# MAX_ATTEMPTS, one that accepts and never answers in READ_TIMEOUT x MAX_ATTEMPTS x S3FS_RETRIES (2 min).
# LATTE_S3_CONNECT_TIMEOUT / LATTE_S3_READ_TIMEOUT (seconds) override the two timeouts.
MAX_ATTEMPTS, S3FS_RETRIES = 3, 2


def _timeouts():
    return (float(os.environ.get("LATTE_S3_CONNECT_TIMEOUT", 5)), float(os.environ.get("LATTE_S3_READ_TIMEOUT", 20)))


EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", None), "gcs": ("gcsfs", None),
          "az": ("adlfs", None), "abfs": ("adlfs", None)}


class StorageError(OSError, ValueError):
    """A remote store could not be reached or used. One line, no secrets. It is an OSError (work
    already committed stays valid; rerun to go on) and a ValueError (bad input before any work)."""


TRANSPORT_ERRORS = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ClientConnectorError", "ServerDisconnectedError", "FSTimeoutError", "NoCredentialsError")


def is_transport_error(err):
    """Whether `err` (or what it wraps) is the store being unreachable or refusing us, not damaged data:
    such a read failure is reported as the store's problem, never as a corrupt entry."""
    while err is not None:
        if isinstance(err, (StorageError, ConnectionError, TimeoutError, PermissionError)) \
                or type(err).__name__ in TRANSPORT_ERRORS:
            return True
        err = err.__cause__ or err.__context__
    return False


def is_url(path):
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def resolve(path, endpoint_url=None):
    """A Location for a local path (str/Path/file://) or an fsspec URL; remote ones are cached."""
    if isinstance(path, Location):
        return path
    if not is_url(path):
        p = str(path)
        return Location(Path(p[len("file://"):] if p.startswith("file://") else p))
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    key = (path.rstrip("/"), endpoint_url)
    if key not in _REMOTE:
        _REMOTE[key] = Location.remote(path.rstrip("/"), endpoint_url)
    return _REMOTE[key]


_REMOTE = {}


def _strip_userinfo(url):
    """scheme://user:pass@host/... -> scheme://host/... (for messages)."""
    scheme, sep, rest = url.partition("://")
    host, slash, tail = rest.partition("/")
    return scheme + sep + host.rpartition("@")[2] + slash + tail


class Location:
    def __init__(self, path=None):
        self.local = path is not None
        self.path = path           # pathlib.Path (local)
        self.url = str(path)       # what messages show
        self.fs = self.root = self.endpoint_url = self.protocol = None
        self._async_fs = None

    @classmethod
    def remote(cls, url, endpoint_url):
        loc = cls()
        loc.url, loc.endpoint_url = url, endpoint_url
        loc.protocol, _, rest = url.partition("://")
        if "@" in rest.partition("/")[0]:
            raise StorageError(f"{_strip_userinfo(url)}: credentials in the URL are not accepted (they would "
                               f"end up in logs and manifests); use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                               f"or AWS_PROFILE")
        if not rest.strip("/"):
            raise StorageError(f"{url}: no bucket in the URL; use {loc.protocol}://BUCKET/PREFIX")
        loc.fs = loc._make_fs(asynchronous=False)
        loc.root = loc.fs._strip_protocol(url).rstrip("/")
        return loc

    def _options(self):
        if self.protocol not in ("s3", "s3a"):
            return {}
        connect, read = _timeouts()
        return {"client_kwargs": {"endpoint_url": self.endpoint_url} if self.endpoint_url else {},
                "config_kwargs": {"connect_timeout": connect, "read_timeout": read,
                                  "retries": {"max_attempts": MAX_ATTEMPTS, "mode": "standard"}},
                "use_listings_cache": False}

    def _make_fs(self, asynchronous):
        try:
            import fsspec

            cls = fsspec.get_filesystem_class(self.protocol)
        except (ImportError, ValueError) as e:
            lib, extra = EXTRAS.get(self.protocol, (None, None))
            how = (f"pip install latte-ms[{extra}]" if extra else f"pip install {lib}" if lib
                   else "install the fsspec implementation for it")
            raise StorageError(f"{self.url}: the {self.protocol}:// scheme needs "
                               f"{lib or 'a library that is not installed'} ({how})") from e
        opts = self._options()
        if asynchronous:
            opts = {**opts, "asynchronous": True, "skip_instance_cache": True}
        fs = cls(**opts)
        if hasattr(fs, "retries"):
            fs.retries = S3FS_RETRIES  # s3fs's own retry loop, on top of botocore's attempts
        return fs

    # -- naming -------------------------------------------------------------------------------
    def __str__(self):
        return self.url

    def __repr__(self):
        return f"Location({self.url!r})"

    def __getstate__(self):  # the async twin is bound to zarr's event loop: rebuild it on use
        return {**self.__dict__, "_async_fs": None}

    def key(self, rel=""):
        return f"{self.root}/{rel}" if rel else self.root

    def display(self, rel=""):
        """What a message calls `rel` under this location (a local Path, or url/rel)."""
        if self.local:
            return self.path / rel if rel else self.path
        return f"{self.url}/{rel}" if rel else self.url

    # -- errors -------------------------------------------------------------------------------
    def explain(self, err, rel=""):
        """One line for a failed remote call: what, where and the fix. Never credentials."""
        where = self.display(rel)
        name = type(err).__name__
        text = str(err).splitlines()[0] if str(err).strip() else name
        response = getattr(err, "response", None)
        code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
        ep = f" at {_strip_userinfo(self.endpoint_url)}" if self.endpoint_url else ""
        if "NoSuchBucket" in (code + text) or (isinstance(err, FileNotFoundError) and not rel):
            return f"{where}: bucket {self.root.split('/')[0]!r} does not exist{ep}; create it or fix the URL"
        if (isinstance(err, PermissionError) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                        "ExpiredToken", "InvalidToken")
                or any(s in text for s in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                           "Forbidden"))):
            return (f"{where}: access denied{ep} ({code or name}); check AWS_ACCESS_KEY_ID/"
                    f"AWS_SECRET_ACCESS_KEY/AWS_PROFILE and the bucket policy")
        if name == "NoCredentialsError":
            return f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        if (name in TRANSPORT_ERRORS and name != "NoCredentialsError") or isinstance(err, (ConnectionError,
                                                                                        TimeoutError)):
            return (f"{where}: cannot reach the object store{ep or ' (AWS default endpoint)'} ({name}, "
                    f"{MAX_ATTEMPTS} attempts); check --s3_endpoint_url / AWS_ENDPOINT_URL and the network, "
                    f"then rerun: committed entries are kept")
        return f"{where}: {name}: {text}"

    def call(self, what, fn, *args, **kwargs):
        """fn(*args, **kwargs) with any failure turned into one StorageError line (rel = what).
        Local locations call fn as it is: their errors are the file system's own."""
        if self.local:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore, aiohttp and OSError kinds alike
            raise StorageError(self.explain(e, what)) from None

    def check(self):
        """Fail now, in one line, if the bucket is missing, the credentials are refused or the
        endpoint is unreachable (an S3 HEAD of the bucket)."""
        if self.protocol in ("s3", "s3a"):
            bucket = self.root.split("/")[0]
            try:
                self.fs.call_s3("head_bucket", Bucket=bucket)
            except Exception as e:  # noqa: BLE001
                raise StorageError(self.explain(e)) from None
        return self

    # -- objects ------------------------------------------------------------------------------
    def cat(self, rel):
        return self.call(rel, self.fs.cat_file, self.key(rel))

    def cat_range(self, rel, start, end=None):
        """Bytes [start, end) of an object; a negative start with no end reads the last -start bytes."""
        return self.call(rel, self.fs.cat_file, self.key(rel), start=start, end=end)

    def pipe(self, rel, data):
        """Write a whole object in one PUT (atomic on S3; see the module docstring)."""
        self.call(rel, self.fs.pipe_file, self.key(rel), bytes(data))

    def create_exclusive(self, rel, data):
        """Create the object only if absent; True if this call created it."""
        try:
            self.call(rel, self.fs.pipe_file, self.key(rel), bytes(data), mode="create")
            return True
        except FileExistsError:
            return False
        except StorageError as e:
            if "PreconditionFailed" in str(e) or "pre-conditions" in str(e):
                return False
            raise

    def exists(self, rel):
        try:
            self.call(rel, self.fs.info, self.key(rel))
            return True
        except FileNotFoundError:
            return False

    def ls(self, rel=""):
        """Names (not paths) directly under rel; [] if there is nothing."""
        try:
            out = self.call(rel, self.fs.ls, self.key(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in out)

    def rm(self, rel):
        try:
            self.call(rel, self.fs.rm_file, self.key(rel))
        except FileNotFoundError:
            pass

    def du(self):
        try:
            return int(self.call("", self.fs.du, self.root, total=True))
        except FileNotFoundError:
            return 0

    def zarr_store(self, read_only=False):
        """zarr 3's FsspecStore over this location (an async twin of the filesystem)."""
        from zarr.storage import FsspecStore

        if self._async_fs is None:
            self._async_fs = self._make_fs(asynchronous=True)
            atexit.register(_close_async, self._async_fs)
        return FsspecStore(self._async_fs, path=self.root, read_only=read_only)


def _close_async(fs):
    """Close the async twin's HTTP session on zarr's event loop before that loop stops (else aiohttp
    prints 'Unclosed client session' at exit)."""
    client = getattr(fs, "_s3", None)
    close = getattr(type(fs), "close_session", None)
    if client is None or close is None:
        return
    try:
        from zarr.core.sync import _get_loop

        close(_get_loop(), client)
    except Exception:  # noqa: BLE001 - best effort at interpreter exit
        pass


# ------------------------------------------------------------------------------------------------
# Leases: the remote stand-in for the local flock on a writer's shard
# ------------------------------------------------------------------------------------------------

def acquire_lease(loc, rel, what):
    """Create the lease object `rel` (conditional PUT); refuse if a live writer holds it.

    A lease left by a killed process on this host (its pid is gone) is taken over, so the same
    command resumes after a kill -9. A lease from another host cannot be checked from here: the
    message says who holds it and how to clear it if that process is dead."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                  time.gmtime())}
    for _ in range(3):
        if loc.create_exclusive(rel, json.dumps(me).encode()):
            return
        try:
            held = json.loads(loc.cat(rel))
        except (FileNotFoundError, ValueError):
            continue  # released (or half-visible) just now: try again
        if held.get("host") == me["host"] and not _pid_alive(held.get("pid", -1)):
            loc.rm(rel)  # its process died (kill -9, crash): the shard is free
            continue
        raise ValueError(f"{loc.url}: another process (host {held.get('host')}, pid {held.get('pid')}, since "
                         f"{held.get('since')}) is writing {what}; wait for it, or if it is dead delete "
                         f"{loc.display(rel)}")
    raise ValueError(f"{loc.url}: could not take the lease {loc.display(rel)} for {what}; retry")


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True

"""Find what to ingest under `data_folder`: one `Entry` per leaf folder of frames or per video file.

Both Sky Timelapse layouts found in the wild are leaf folders of frames:

    sky_train/<video>/<video>_<k>/<video>_frames_<8 digits>.jpg     (nested: one folder per clip)
    root/<video>/<frame>.jpg                                         (flattened)

and video files (mp4, avi, mkv, webm, mov) may sit beside them in any folder. An entry's id is its path
relative to `data_folder` in posix form (`"."` when `data_folder` itself holds the frames), so the same
data gives the same ids on any machine, and entries come back in one deterministic (natural) order.

Discovery never decodes anything; it only lists folders and stats files. Problems it can already see
become entries with status "skipped" (nothing to ingest: an empty folder, a folder without images, a
symlink loop) or "failed" (something that should be data but cannot be read: a broken symlink, a
frame that is not a regular file, a name that is not UTF-8, a folder that cannot be listed). Problems
found while decoding are raised by `ingest.readers` as `EntryError`. A `data_folder` that is missing,
unreadable or holds nothing ingestible is a `ValueError` before any work.
"""
import csv
import dataclasses
import errno
import os
import re
import stat
from dataclasses import dataclass

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov"})

_TRAILING_INT = re.compile(r".*_([0-9]+)")
_DIGITS = re.compile(r"([0-9]+)")


class EntryError(Exception):
    """A problem with one entry (corrupt frame, truncated video, ...). The message is one line a person
    understands; the pipeline records it as the entry's `failed` reason and moves on to the next."""


@dataclass(frozen=True)
class Entry:
    id: str  # posix path relative to data_folder: the stable key of this entry everywhere
    path: str  # the folder of frames or the video file, as reached from data_folder (links not resolved)
    kind: str  # "frames" or "video"
    frame_files: tuple = ()  # "frames" only: full paths in temporal order
    source_size: int = 0  # bytes on disk (sum over frames for a folder)
    status: str = "ok"  # "ok", or "skipped" / "failed" when discovery already knows it cannot be read
    reason: str = ""  # why it was skipped or failed
    label: str = ""  # class name (`latte ingest --labels`), "" when unlabelled

    @property
    def num_files(self):
        return len(self.frame_files)


def natural_key(name):
    """'clip_2' < 'clip_10': digit runs compare as integers (ASCII digits only), ties by the raw name."""
    parts = _DIGITS.split(name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def sort_frame_files(names):
    """Temporal order of a folder's frame file names. Sky Timelapse numbers frames after the last `_`
    (`<video>_frames_00000046.jpg`, numbers continuing across clip folders), so when every name has an
    integer there we sort by it; otherwise the whole folder falls back to natural sort."""
    stems = [os.path.splitext(n)[0] for n in names]
    matches = [_TRAILING_INT.fullmatch(s) for s in stems]
    if all(matches):
        order = sorted(range(len(names)), key=lambda i: (int(matches[i].group(1)), natural_key(names[i])))
    else:
        order = sorted(range(len(names)), key=lambda i: natural_key(names[i]))
    return [names[i] for i in order]


def _ext(name):
    return os.path.splitext(name)[1].lower()


def _utf8_problem(rel):
    try:
        rel.encode("utf-8")
        return ""
    except UnicodeEncodeError:
        return f"name is not valid UTF-8 ({ascii(rel)}): rename it"


def _make(out, rel, path, kind, status="ok", reason="", frame_files=(), source_size=0):
    entry_id = rel.replace(os.sep, "/") if rel else "."
    bad_name = _utf8_problem(entry_id)
    if bad_name and status == "ok":
        status, reason = "failed", bad_name
    out.append(Entry(entry_id, path, kind, tuple(frame_files), source_size, status, reason))


def _rel(parent_rel, name):
    return os.path.join(parent_rel, name) if parent_rel else name


def _frames_entry(out, dirpath, rel, names):
    """One entry for the images directly inside `dirpath`, after checking each is a readable file."""
    names = sort_frame_files(names)
    paths = [os.path.join(dirpath, n) for n in names]
    total = 0
    for k, (name, path) in enumerate(zip(names, paths)):
        try:
            st = os.stat(path)
        except OSError:
            return _make(out, rel, dirpath, "frames", "failed", f"frame {k} ({name!r}): {_dead_link_reason(path)}")
        if not stat.S_ISREG(st.st_mode):
            return _make(out, rel, dirpath, "frames", "failed", f"frame {k} ({name!r}) is not a regular file")
        total += st.st_size
    _make(out, rel, dirpath, "frames", frame_files=paths, source_size=total)


def _video_entry(out, path, rel):
    try:
        st = os.stat(path)
    except OSError:
        reason = _dead_link_reason(path)
        return _make(out, rel, path, "video", "skipped" if "loop" in reason else "failed", f"video file: {reason}")
    if not stat.S_ISREG(st.st_mode):
        return _make(out, rel, path, "video", "failed", "video path is not a regular file")
    _make(out, rel, path, "video", source_size=st.st_size)


def _dead_link_reason(path):
    """Why a path that os.stat cannot follow is unusable: a link to itself, or a link to nothing."""
    try:
        os.stat(path)
        return ""
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop (the link points to itself)"
        return f"broken symlink: {err.strerror}" if os.path.islink(path) else f"cannot be read: {err.strerror}"


def _walk(dirpath, rel, ancestors, excluded, out):
    """Depth-first, sorted. Symlinked folders are followed (datasets are often assembled from links),
    but a link back to a folder on the current path is a loop: reported once, never entered."""
    try:
        with os.scandir(dirpath) as it:
            children = sorted(it, key=lambda d: natural_key(d.name))
    except OSError as err:
        return _make(out, rel, dirpath, "frames", "failed", f"cannot list folder: {err.strerror}")
    start = len(out)
    images, others, subdirs = [], [], []
    for child in children:
        name, path = child.name, child.path
        if name.startswith("."):  # .DS_Store, ._frame.jpg (AppleDouble), .ipynb_checkpoints: never data
            continue
        child_rel = _rel(rel, name)
        ext = _ext(name)
        try:
            is_dir = child.is_dir()  # follows links
        except OSError:
            is_dir = False
        if is_dir:
            real = os.path.realpath(path)
            if real in excluded:
                continue
            if real in ancestors:
                back = os.path.relpath(real, ancestors[0]).replace(os.sep, "/")
                back = "the data folder itself" if back == "." else repr(back)
                _make(out, child_rel, path, "frames", "skipped",
                      f"symlink loop: it points back to {back}, which is already being read")
            else:
                subdirs.append((path, child_rel, real))
        elif ext in IMAGE_EXTS:
            images.append(name)  # broken links and FIFOs named like frames fail the folder, naming the frame
        elif ext in VIDEO_EXTS:
            _video_entry(out, path, child_rel)
        elif not ext and child.is_symlink() and _dead_link_reason(path):
            # most likely a linked folder whose target is gone (a dead link named notes.txt is ignored)
            reason = _dead_link_reason(path)
            _make(out, child_rel, path, "frames", "skipped" if "loop" in reason else "failed", reason)
        else:
            others.append(name)
    if images:
        _frames_entry(out, dirpath, rel, images)
    elif not subdirs and len(out) == start:  # a leaf folder with nothing to ingest in it
        if not children:
            _make(out, rel, dirpath, "frames", "skipped", "empty folder")
        else:
            example = f", e.g. {others[0]!r}" if others else ""
            _make(out, rel, dirpath, "frames", "skipped",
                  f"no image or video files in this folder (it holds {len(children)} other file(s){example})")
    for path, child_rel, real in subdirs:
        _walk(path, child_rel, ancestors + (real,), excluded, out)


def discover_entries(data_folder, exclude=()):
    """All entries under `data_folder`, sorted by id (natural order). `exclude`: folders never to
    enter, e.g. the cache being written when it sits inside the data folder.

    Raises ValueError (one line) when `data_folder` is missing, not a folder, unreadable, or holds no
    entry that can be ingested; otherwise every problem is an entry with status skipped/failed."""
    root = os.fspath(data_folder)
    hint = "set data_folder to a folder of Sky Timelapse frame folders and/or video files"
    if not os.path.exists(root):
        raise ValueError(f"data_folder {root!r} does not exist: {hint}")
    if not os.path.isdir(root):
        raise ValueError(f"data_folder {root!r} is not a folder: {hint}")
    try:
        os.listdir(root)
    except OSError as err:
        raise ValueError(f"data_folder {root!r} cannot be read ({err.strerror}): check its permissions") from None
    out = []
    _walk(root, "", (os.path.realpath(root),), {os.path.realpath(p) for p in exclude}, out)
    out.sort(key=lambda e: natural_key(e.id))
    if not any(e.status == "ok" for e in out):
        found = f" (found only {len(out)} skipped/failed: {out[0].id!r}: {out[0].reason})" if out else ""
        raise ValueError(f"data_folder {root!r} holds no frame folders ({', '.join(sorted(IMAGE_EXTS))}) "
                         f"or video files ({', '.join(sorted(VIDEO_EXTS))}){found}: {hint}")
    return out


# ----------------------------------------------------------------------------------------------
# Class labels (`latte ingest --labels folder|FILE.csv`)
# ----------------------------------------------------------------------------------------------

def read_label_csv(path):
    """{entry id: class name} from a CSV with a header row holding `id` and `label` columns."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [n.strip() for n in reader.fieldnames or []]
            if "id" not in fields or "label" not in fields:
                raise ValueError(f"labels file {path} needs a header row with columns id,label (it has "
                                 f"{', '.join(fields) or 'no header'}): one row per entry id, as "
                                 f"`latte cache info` lists them")
            reader.fieldnames = fields
            out = {}
            for k, row in enumerate(reader, start=2):
                entry_id, label = (row.get("id") or "").strip(), (row.get("label") or "").strip()
                if not entry_id or not label:
                    raise ValueError(f"labels file {path} line {k}: empty id or label; give both or drop the line")
                if out.get(entry_id, label) != label:
                    raise ValueError(f"labels file {path} line {k}: entry {entry_id!r} is labelled both "
                                     f"{out[entry_id]!r} and {label!r}; keep one")
                out[entry_id] = label
            return out
    except OSError as err:
        raise ValueError(f"labels file {path} cannot be read ({err.strerror}): pass --labels folder or an "
                         f"existing CSV with columns id,label") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"labels file {path} is not a UTF-8 CSV ({err}): save it as CSV with columns id,label") from None


def apply_labels(entries, labels):
    """(entries with `label` set, sorted class names). `labels`: "folder" (the class is the first folder
    under data_folder, as in UCF-101's `<class>/<video>.avi`) or a CSV path (columns id,label). An ok
    entry without a label becomes `skipped`, saying why; class indices follow the sorted names, so the
    same labels give the same indices on any machine."""
    table = None if labels == "folder" else read_label_csv(labels)
    out = []
    for e in entries:
        if table is None:
            label = e.id.split("/", 1)[0] if "/" in e.id else ""
            why = "no class folder: under --labels folder every entry must sit in <data_folder>/<class>/"
        else:
            label = table.get(e.id, "")
            why = f"no label in {labels}: add a row '{e.id},<class>' or remove the entry"
        if not label and e.status == "ok":
            e = dataclasses.replace(e, status="skipped", reason=why)
        out.append(dataclasses.replace(e, label=label))
    names = sorted({e.label for e in out if e.label and e.status == "ok"}, key=natural_key)
    if not names:
        raise ValueError(f"--labels {labels} gives no entry a class: "
                         + ("put the entries in one folder per class under data_folder" if table is None
                            else f"the ids in {labels} match none of the entries (ids are paths relative to "
                                 f"data_folder, e.g. {entries[0].id!r})"))
    return out, names

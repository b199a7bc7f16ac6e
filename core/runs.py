"""Run directories: written atomically, listed (damaged ones as damaged), loaded, deleted, traced; who owns a
run and who may read it (the dashboard's sessions, the command line, share links)."""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_FILES = ("run.json", "audit.npz", "model.safetensors", "model.json")
# What the Audit and Runs pages read from run.json without a fallback: a run.json without them is damaged.
REQUIRED_METRICS = ("forget_acc", "retain_acc", "test_acc", "per_class_test_acc")
# The original model's outputs cached under <runs root>/.cache: least recently used files go first
# once the folder holds more than $STRUCTGUARD_CACHE_MB (0: no cache on disk).
CACHE_DIR = ".cache"
DEFAULT_CACHE_MB = 256
# A run builds its folder (.<run_id>.partial) only while saving, its last few seconds, then renames it
# into place; one older than an hour belongs to a killed process, never to a run still saving.
PARTIAL_MAX_AGE_S = 3600
WRITER_FILE = ".writer"     # in a .partial folder: the process writing it (process_token)
RUNNING_DIR = ".running"    # <root>/.running/<id>.json while a run executes: left behind by a killed one


class RunError(RuntimeError):
    """A run directory is missing or damaged; the message says which part."""


class StorageError(RunError):
    """A write failed (full disk, read-only folder); the message names no server path."""


_WHY = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
        errno.EROFS: "the folder is on a read-only file system", errno.EACCES: "the folder is not writable",
        errno.EPERM: "the folder is not writable", errno.ENOTDIR: "a file stands where a folder is needed",
        errno.EEXIST: "a file stands where a folder is needed",
        errno.ENOENT: "the folder does not exist", errno.EFBIG: "the file is larger than the system allows"}


def storage_error(exc: OSError, what: str) -> StorageError:
    """A one-line, path-free StorageError for an OSError raised while writing `what`."""
    why = _WHY.get(exc.errno or 0) or (exc.strerror or type(exc).__name__).lower()
    hint = "free some space and try again" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else \
        "make the folder writable (or choose another one) and try again"
    return StorageError(f"could not save {what}: {why}; nothing was left behind; {hint}")


def redact_paths(text: str) -> str:
    """A message without absolute file-system paths (each shown as its last part): for the pages."""
    return re.sub(r"(?<![\w.:/])/(?:[^\s/'\"`:;,()]+/)*([^\s/'\"`:;,()]+)", r"\1", str(text))


def file_mode() -> int:
    """The permission bits a new file gets under this process's umask (read without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


_fdopen = os.fdopen  # the OS-level file every atomic write goes through (tests make it fail like a full disk)


def write_atomic(path: Path, data: bytes | str | None = None, *, what: str = "the file",
                 writer=None, parents: bool = True, mode: int | None = None, exclusive: bool = False) -> Path:
    """Write `data` (or call writer(file object)) to a hidden temporary file beside `path`, then rename it into
    place; on any failure the temporary file is removed and an OSError becomes a StorageError. The file gets
    the umask's permissions, like any other file the process creates, unless `mode` is given. parents=False:
    only the file's own folder may be created (a cache beside a run never re-creates a run folder deleted
    meanwhile). exclusive=True: an existing file is kept and FileExistsError raised (first writer wins)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=parents, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with _fdopen(fd, "wb") as fh:
            if writer is not None:
                writer(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, file_mode() if mode is None else mode)  # mkstemp creates 0600
        if exclusive:
            os.link(tmp, path)  # fails when the file exists; the temporary name is removed below
        else:
            os.replace(tmp, path)
            tmp = None
        return path
    except FileExistsError as exc:
        if exclusive:
            raise
        raise storage_error(exc, what) from exc
    except OSError as exc:
        raise storage_error(exc, what) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def runs_root(root: str | Path | None = None) -> Path:
    """`root`, else $STRUCTGUARD_RUNS, else ./runs under the project."""
    if root:
        return Path(root)
    env = os.environ.get("STRUCTGUARD_RUNS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "runs"


def new_run_id(method: str, k: int, seed: int, root: Path) -> str:
    base = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{method}-k{k}-s{seed}"
    run_id, n = base, 1
    while (root / run_id).exists() or (root / f".{run_id}.partial").exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def ensure_writable(root: Path) -> None:
    """Fail early, before minutes of work, when runs cannot be saved under `root` (StorageError)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".write-test-", suffix=".part")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise storage_error(exc, "the run") from exc


def partial_dir(root: Path, run_id: str) -> Path:
    """Where a run is built; renamed to root/run_id only when complete. It names the process writing it
    (WRITER_FILE), so the next start removes it at once when that process was killed."""
    path = root / f".{run_id}.partial"
    path.mkdir(parents=True, exist_ok=False)
    (path / WRITER_FILE).write_text(json.dumps(process_token()))
    return path


def finalize(partial: Path, meta: dict, audit: dict[str, np.ndarray], check=None) -> Path:
    """Write run.json and audit.npz into the partial directory, then rename it into place.

    `check()` (the run's cancel check) is called between the writes; the rename is the commit point.
    A failed write raises StorageError; the caller discards the partial directory."""
    check = check or (lambda: None)
    try:
        np.savez_compressed(partial / "audit.npz", **audit)
        check()
        meta = dict(meta, status="complete")
        (partial / WRITER_FILE).unlink(missing_ok=True)
        (partial / "run.json").write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        mode = file_mode()
        for f in partial.iterdir():  # one mode for every file of a run: the umask's
            if f.is_file():
                os.chmod(f, mode)
        check()
        final = partial.parent / partial.name[1:].removesuffix(".partial")
        os.replace(partial, final)
    except OSError as exc:
        raise storage_error(exc, "the run") from exc
    return final


def discard(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


@dataclass
class RunInfo:
    run_id: str
    path: Path
    status: str  # "complete" or "damaged"
    meta: dict | None = None
    error: str | None = None
    origin: str = "unrecorded"  # who made it, from run.json: "session", "cli" or "unrecorded"
    owner: str | None = None  # origin "session": sha256 of the owning session's secret
    access: str = "read"  # for the session that listed it (visible_runs): "own" or "read"
    shared: bool = False  # its owner shares it by link (visible_runs)

    @property
    def ok(self) -> bool:
        return self.status == "complete"

    @property
    def own(self) -> bool:
        return self.access == "own"

    @property
    def origin_label(self) -> str:
        """Where the run comes from, as the pages say it."""
        if self.own:
            return "this session" + (" (shared by link)" if self.shared else "")
        return {"session": "shared by another session", "cli": "CLI",
                "unrecorded": "unknown (no owner recorded)"}[self.origin]


@dataclass
class RunRecord:
    path: Path
    meta: dict
    audit: dict[str, np.ndarray] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # parts that could not be read

    @property
    def run_id(self) -> str:
        return self.meta.get("run_id", self.path.name)


def meta_problem(meta: object) -> str | None:
    """What a run.json lacks that the pages and commands read without a fallback, or None."""
    if not isinstance(meta, dict):
        return "run.json does not describe a run"
    if meta.get("status") != "complete":
        return "run.json does not mark the run complete"
    if not isinstance(meta.get("method"), str):
        return "run.json names no method"
    metrics = meta.get("metrics")
    if not isinstance(metrics, dict):
        return "run.json has no metrics"
    for when in ("before", "after"):
        m = metrics.get(when)
        if not isinstance(m, dict):
            return f"run.json has no metrics {when} unlearning"
        lacking = [k for k in REQUIRED_METRICS if k not in m]
        if lacking:
            return f"run.json's metrics {when} unlearning lack {', '.join(lacking)}"
        if not all(isinstance(m[k], (int, float)) for k in REQUIRED_METRICS[:3]) \
                or not isinstance(m["per_class_test_acc"], list):
            return f"run.json's metrics {when} unlearning are not numbers"
    return None


def _check(path: Path) -> tuple[dict | None, str | None]:
    try:
        meta = json.loads((path / "run.json").read_text())
    except FileNotFoundError:
        return None, "run.json is missing"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"run.json is not valid JSON ({exc})"
    except OSError as exc:
        return None, f"run.json cannot be read ({exc.strerror})"
    problem = meta_problem(meta)
    if problem:
        return (meta if isinstance(meta, dict) else None), problem
    missing = [f for f in REQUIRED_FILES[1:] if not (path / f).is_file()]
    if missing:
        return meta, f"missing {', '.join(missing)}"
    try:  # reads only the archive's directory (at its end): a truncated file fails here
        with zipfile.ZipFile(path / "audit.npz") as z:
            z.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        return meta, f"audit.npz is damaged ({exc})"
    return meta, None


def check_run(run_dir: str | Path) -> dict:
    """The run.json of a complete run, else RunError in one line (for the commands that take a run folder)."""
    path = Path(run_dir)
    hint = "give a complete run folder such as runs/<run_id>"
    if not path.is_dir():
        raise RunError(f"{path} is not a directory; {hint}")
    meta, error = _check(path)
    if error == "run.json is missing":
        raise RunError(f"{path} is not a run folder: it has no run.json; {hint}")
    if error:
        raise RunError(f"{path} is damaged, not a complete run: {error}; {hint}")
    return meta


def list_runs(root: str | Path | None = None) -> list[RunInfo]:
    """Every run directory, newest first; unreadable ones are listed as damaged, never raised."""
    root = runs_root(root)
    if not root.is_dir():
        return []
    out = []
    for path in root.iterdir():
        if not path.is_dir() or path.name.startswith("."):
            continue
        meta, error = _check(path)
        origin, owner = run_origin(meta)
        out.append(RunInfo(path.name, path, "damaged" if error else "complete", meta, error, origin, owner))
    return sorted(out, key=lambda r: r.run_id, reverse=True)


def load_run(run_dir: str | Path, strict: bool = False) -> RunRecord:
    """The run's metadata and audit arrays. Damaged parts are listed in `.missing`
    (or raised with strict=True); only an unreadable run.json always raises."""
    path = Path(run_dir)
    try:
        meta = json.loads((path / "run.json").read_text())
    except FileNotFoundError as exc:
        raise RunError(f"{path} is not a run directory: run.json is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}/run.json is damaged: {exc}") from exc
    if not isinstance(meta, dict):
        raise RunError(f"{path}/run.json is damaged: it does not describe a run")
    record = RunRecord(path, meta)
    if meta.get("status") != "complete":
        record.missing.append("status: the run did not complete")
    elif problem := meta_problem(meta):
        record.missing.append(problem)
    try:
        with np.load(path / "audit.npz", allow_pickle=False) as z:
            record.audit = {k: z[k] for k in z.files}
    except FileNotFoundError:
        record.missing.append("audit.npz (audit arrays)")
    except Exception as exc:  # zipfile/numpy raise several types for damaged archives
        record.missing.append(f"audit.npz is damaged ({exc})")
    for f in ("model.safetensors", "model.json"):
        if not (path / f).is_file():
            record.missing.append(f)
    if strict and record.missing:
        raise RunError(f"{path} is damaged: {'; '.join(record.missing)}")
    return record


def delete_run(run_dir: str | Path, root: str | Path | None = None) -> None:
    """Remove a run directory; refuses anything outside the runs root."""
    root = runs_root(root).resolve()
    path = Path(run_dir).resolve()
    if path.parent != root:
        raise RunError(f"{path} is not a run inside {root}")
    shutil.rmtree(path)


def lineage(run_dir: str | Path, visible: set[str] | None = None) -> list[dict]:
    """The chain of runs from the first request to this one (oldest first). With `visible` (the run ids a
    session may see), another session's run is an entry that says only that: its id and record stay private."""
    chain, path, seen = [], Path(run_dir), set()
    while path is not None and path.name not in seen:
        seen.add(path.name)
        try:
            meta = json.loads((path / "run.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            chain.append({"run_id": path.name, "missing": True})
            break
        if visible is not None and path.name not in visible:
            chain.append({"run_id": f"a run of another session ({len(chain)} back)", "hidden": True})
        else:
            chain.append(meta)
        parent = meta.get("parent_run")
        path = (path.parent / parent) if parent else None
    return chain[::-1]


# ------------------------------------------------------------------ ownership and sharing
#
# The rule (README, "What is private and what is shared"):
# - A run made in a dashboard session records {"kind": "session", "sha256": sha256(owner secret)} in run.json.
#   The owner secret is HMAC(server key, the session's URL token): the server key lives in <runs root>/.owner-key
#   (mode 0600) and the secret in the session's state, so neither the URL nor run.json reveals it. The dashboard
#   lets only one live browser session hold a token (dashboard/session.py): a copied URL opened while its owner's
#   page is open gets a new, empty session; opened after that page is gone (a reload), it is that session.
# - Only the owner lists, deletes and shares its runs. Runs from the command line ({"kind": "cli"}) and runs
#   that record no owner (made before owners were recorded, or an unreadable run.json) are read-only for every
#   session. A shared run is read-only for the sessions that opened its link.
# - Sharing writes share.json with sha256 of the share key, HMAC(owner secret, run id): the owner can show the
#   same link again, nobody else can make it; removing share.json ends every link at once.

OWNER_KEY_FILE = ".owner-key"
SHARE_FILE = "share.json"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


class ReadOnlyRun(RunError):
    """The session asking is not the run's owner: it may read the run (if it sees it), not change it."""


def owner_hash(secret: str) -> str:
    """What a run records of its owner: sha256 of the owner secret, in hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def owner_record(owner: str | None) -> dict:
    """run.json's "owner": the owning session's secret hash, or the command line when None."""
    if owner is None:
        return {"kind": "cli"}
    if not (isinstance(owner, str) and re.fullmatch(r"[0-9a-f]{64}", owner)):
        raise ValueError("owner must be the sha256 hex digest of a session's owner secret")
    return {"kind": "session", "sha256": owner}


def run_origin(meta: object) -> tuple[str, str | None]:
    """(origin, owner hash) of a run.json: ("session", sha256), ("cli", None) or ("unrecorded", None)."""
    owner = meta.get("owner") if isinstance(meta, dict) else None
    if isinstance(owner, dict):
        if owner.get("kind") == "session" and isinstance(owner.get("sha256"), str):
            return "session", owner["sha256"]
        if owner.get("kind") == "cli":
            return "cli", None
    return "unrecorded", None


@functools.cache
def _fallback_key() -> bytes:
    return secrets.token_bytes(32)


@functools.cache
def _server_key(path: str) -> bytes:
    key_file = Path(path)
    try:
        write_atomic(key_file, secrets.token_hex(32), what="the owner key", mode=0o600, exclusive=True)
    except FileExistsError:
        pass  # made earlier, or by another process just now: the file on disk is the key
    except StorageError:
        return _fallback_key()  # a runs folder that cannot be written holds no runs to own either
    try:
        key = key_file.read_text().strip()
    except OSError:
        return _fallback_key()
    return bytes.fromhex(key) if re.fullmatch(r"[0-9a-f]{64}", key) else _fallback_key()


def owner_secret(token: str, root: str | Path | None = None) -> str:
    """The owner secret of a dashboard session token: HMAC(the runs root's server key, token), in hex.
    When the key cannot be kept on disk, a key of this process is used (owners then last as long as it)."""
    key = _server_key(str(runs_root(root).resolve() / OWNER_KEY_FILE))
    return hmac.new(key, token.encode("utf-8"), hashlib.sha256).hexdigest()


def share_key(secret: str, run_id: str) -> str:
    """The key of a run's share link: only its owner can make it, and the owner always makes the same one."""
    digest = hmac.new(secret.encode("utf-8"), f"share:{run_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode("ascii")


def run_path(root: str | Path | None, run_id: object) -> Path | None:
    """root/run_id for a run id given from outside (a link), else None: a plain name, never a path."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        return None
    return runs_root(root) / run_id


def _owner_of(path: Path) -> tuple[str, str | None]:
    try:
        return run_origin(json.loads((path / "run.json").read_text()))
    except (OSError, ValueError):
        return "unrecorded", None


def require_owner(run_dir: str | Path, secret: str | None) -> None:
    """ReadOnlyRun unless `secret` is the owner secret the run records (the check before any change)."""
    path = Path(run_dir)
    origin, owner = _owner_of(path)
    if secret and origin == "session" and hmac.compare_digest(owner or "", owner_hash(secret)):
        return
    why = {"cli": "it was made from the command line",
           "unrecorded": "it records no owner"}.get(origin, "it belongs to another session")
    raise ReadOnlyRun(f"run {path.name} is read-only here: {why}")


def is_shared(run_dir: str | Path) -> bool:
    return (Path(run_dir) / SHARE_FILE).is_file()


def share_run(run_dir: str | Path, secret: str | None) -> str:
    """Share one of the caller's runs by link; returns the link's key (the same key every time)."""
    path = Path(run_dir)
    require_owner(path, secret)
    key = share_key(secret, path.name)
    record = {"key_sha256": hashlib.sha256(key.encode("ascii")).hexdigest(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not is_shared(path):  # a second share keeps the first date
        write_atomic(path / SHARE_FILE, json.dumps(record) + "\n", what="the share record", parents=False)
    return key


def unshare_run(run_dir: str | Path, secret: str | None) -> None:
    """End every link to one of the caller's runs."""
    path = Path(run_dir)
    require_owner(path, secret)
    try:
        (path / SHARE_FILE).unlink(missing_ok=True)
    except OSError as exc:
        raise storage_error(exc, "the share record") from exc


def check_share_key(run_dir: str | Path, key: object) -> bool:
    """Whether `key` opens this run: the run is a session's, shared now, and the key is its share key."""
    return _owner_of(Path(run_dir))[0] == "session" and _share_key_matches(Path(run_dir), key)


def _share_key_matches(path: Path, key: object) -> bool:
    """The key's hash is the one share.json holds (the run is shared now); the run's origin is not checked."""
    if not isinstance(key, str) or not key:
        return False
    try:
        record = json.loads((path / SHARE_FILE).read_text())
        stored = str(record["key_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return hmac.compare_digest(hashlib.sha256(key.encode("utf-8", "replace")).hexdigest(), stored)


def class_names(meta: dict) -> list[str]:
    """The class names of a run (its anchors', else its dataset's)."""
    return list((meta.get("anchors") or {}).get("class_names") or (meta.get("dataset") or {}).get("classes") or [])


def visible_runs(root: str | Path | None, secret: str | None, grants: Mapping[str, str] | None = None) -> list[RunInfo]:
    """The runs a dashboard session may see, newest first: its own (access "own"), those from the command line
    or with no owner recorded, and other sessions' runs whose share key it holds in `grants` (run id -> key)
    and that are still shared (access "read"). Other sessions' runs are left out, damaged ones included."""
    mine = owner_hash(secret) if secret else None
    grants = grants or {}
    out = []
    for info in list_runs(root):
        if info.origin == "session":
            if mine is not None and hmac.compare_digest(info.owner or "", mine):
                info.access, info.shared = "own", is_shared(info.path)
            elif info.run_id in grants and _share_key_matches(info.path, grants[info.run_id]):  # origin known
                info.shared = True
            else:
                continue
        out.append(info)
    return out


def delete_own_run(run_dir: str | Path, secret: str | None, root: str | Path | None = None) -> None:
    """delete_run for a dashboard session: only a run it owns (ReadOnlyRun otherwise)."""
    if not Path(run_dir).exists():
        raise FileNotFoundError(Path(run_dir).name)
    require_owner(run_dir, secret)
    delete_run(run_dir, root)


# ------------------------------------------------------------------ the original model's output cache


def cache_limit_bytes() -> int:
    """$STRUCTGUARD_CACHE_MB (default 256) in bytes; 0 turns the disk cache off."""
    raw = os.environ.get("STRUCTGUARD_CACHE_MB", "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_CACHE_MB
    except ValueError:
        mb = DEFAULT_CACHE_MB
    return max(0, int(mb * 2**20)) if mb == mb else DEFAULT_CACHE_MB * 2**20  # NaN: the default


def touch(path: Path) -> None:
    """Mark a cache file as just used (the cache is least-recently-used by modification time)."""
    try:
        os.utime(path)
    except OSError:
        pass


def prune_cache(directory: str | Path, limit: int | None = None, keep: Path | None = None) -> int:
    """Delete the least recently used files of a cache folder until it holds at most `limit` bytes
    (default $STRUCTGUARD_CACHE_MB); `keep` (the file just written) stays. Leftover temporary files older
    than an hour go first. Returns the number of files removed; never raises."""
    limit = cache_limit_bytes() if limit is None else limit
    directory = Path(directory)
    entries, removed, now = [], 0, time.time()
    try:
        paths = list(directory.iterdir())
    except OSError:
        return 0
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        if not p.is_file():
            continue
        if p.name.endswith(".part") and now - st.st_mtime > PARTIAL_MAX_AGE_S:
            p.unlink(missing_ok=True)
            removed += 1
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and p == keep:
            continue
        try:
            p.unlink()
        except OSError:
            continue
        total -= size
        removed += 1
    return removed


# ------------------------------------------------------------------------------ runs that were killed


def process_token(pid: int | None = None) -> dict:
    """This process (or `pid`) as host, pid and start time: a pid alone may be reused after a reboot."""
    pid = pid or os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)}


def _process_start(pid: int) -> str | None:
    try:  # field 22 of /proc/<pid>/stat: start time in clock ticks since boot (Linux)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def token_alive(token: object) -> bool:
    """False only when the process is known to be gone: on this host, and its pid is free or another
    process's. A token from another host, or none (a folder from before tokens), counts as alive."""
    if not isinstance(token, dict) or not isinstance(token.get("pid"), int):
        return True
    if token.get("host") != socket.gethostname():
        return True
    try:
        os.kill(token["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        pass
    return token.get("start") is None or _process_start(token["pid"]) == token.get("start")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def begin_run(root: Path, what: dict, owner: str | None = None) -> Path | None:
    """Mark a run as executing in this process (removed by end_run, whatever the outcome). A marker whose
    process is gone is a run that was interrupted: the process was killed, or the dashboard's server stopped.
    None when the mark cannot be written (the run itself then reports the storage problem)."""
    marker = root / RUNNING_DIR / f"{secrets.token_hex(8)}.json"
    record = dict(what, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), process=process_token(),
                  owner=owner_record(owner))
    for _ in range(3):  # another run's end_run may remove the empty folder between the mkdir and the write
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(marker, json.dumps(record), what="the run's marker")
            return marker
        except StorageError:
            continue
    return None


def end_run(marker: Path | None) -> None:
    """Remove the marker, and its folder once empty: a runs folder holds nothing of runs that ended."""
    if marker is not None:
        marker.unlink(missing_ok=True)
        try:
            marker.parent.rmdir()
        except OSError:  # other runs are executing
            pass


@dataclass
class Interrupted:
    """A run whose process stopped before it finished (its marker outlived it)."""

    path: Path
    record: dict

    def describe(self) -> str:
        r = self.record
        return (f"{r.get('method', 'a run')} on {r.get('k', '?')} image(s), seed {r.get('seed', '?')}, started "
                f"{r.get('started', '?')} was interrupted: its process stopped before it finished "
                "(killed, or the dashboard's server restarted). Nothing was saved; start it again.")


def interrupted_runs(root: str | Path | None = None, secret: str | None = None, cli: bool = False) -> list[Interrupted]:
    """The interrupted runs of one dashboard session (its secret) or, with cli=True, of the command line."""
    folder = runs_root(root) / RUNNING_DIR
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = _read_json(path)
        if not isinstance(record, dict) or token_alive(record.get("process")):
            continue
        kind, digest = run_origin(record)
        mine = kind == "cli" if cli else (kind == "session" and secret is not None and digest == owner_hash(secret))
        if mine:
            found.append(Interrupted(path, record))
    return found


def dismiss_interrupted(item: Interrupted) -> None:
    item.path.unlink(missing_ok=True)


def clean_partials(root: str | Path | None = None, older_than_s: float = PARTIAL_MAX_AGE_S) -> int:
    """Delete leftovers of killed runs (.<run_id>.partial older than older_than_s); returns how many."""
    root = runs_root(root)
    if not root.is_dir():
        return 0
    n = 0
    for p in root.glob(".*.partial"):
        try:
            age = time.time() - p.stat().st_mtime
        except OSError:  # removed meanwhile by another process cleaning the same root
            continue
        if p.is_dir() and (age > older_than_s or not token_alive(_read_json(p / WRITER_FILE))):
            discard(p)
            n += 1
    return n


def clean_partials_once(root: str | Path | None = None) -> int:
    """clean_partials at the start of a process (CLI command, dashboard): once per runs root and process;
    later calls return the first call's count and touch nothing (the dashboard re-runs app.py on every click)."""
    return _clean_once(str(runs_root(root).resolve()))


@functools.cache
def _clean_once(root: str) -> int:
    return clean_partials(root)

"""Where runs and datasets live: local paths or URIs (file://, s3://, gs://), read and written through pyarrow
filesystems (the layer Ray Train and Ray Data use for the same URIs).

    /data/x, runs/x        a local path (resolved to an absolute one; on a cluster it must be a shared mount)
    file:///data/x         the same as /data/x
    s3://bucket/prefix     S3 or an S3-compatible server (MinIO, Ceph, moto): credentials, region and endpoint
                           from the usual AWS variables, read by `s3_options`
    gs://bucket/prefix     Google Cloud Storage (application default credentials, GOOGLE_APPLICATION_CREDENTIALS)

A remote directory (a prepared dataset, a checkpoint) that code must open as a local directory is copied once
into a local cache (`local_copy`, under $SEQREC_CACHE_DIR, default ~/.cache/seqrec); both are immutable once
written, so the copy never goes stale. A directory written with a manifest (`write_manifest`: checkpoints) is
checked against it before the copy is kept, so a checkpoint whose upload was cut short is refused, not half read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_ENV = "SEQREC_CACHE_DIR"  # where remote datasets / checkpoints are copied (default ~/.cache/seqrec)
REMOTE_SCHEMES = ("s3", "gs", "gcs")
MANIFEST = "seqrec_manifest.json"  # {"files": {relative path: size}}: what a complete directory holds
# what workers need to reach the storage themselves (PreparedDataset.load, resume_from): passed in their env,
# since a Ray instance started before these were set (or a cluster's nodes) would not have them
ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCE_", "CLOUDSDK_")


def scheme(path: str | os.PathLike) -> str | None:
    text = str(path)
    return text.split("://", 1)[0].lower() if "://" in text else None


def is_remote(path: str | os.PathLike) -> bool:
    """A URI that is not a local file (file:// is local); an unknown scheme is an error."""
    s = scheme(path)
    if s is None or s == "file":
        return False
    if s not in REMOTE_SCHEMES:
        raise ValueError(f"unsupported storage URI {str(path)!r}: use a local path, file://, s3:// or gs://")
    if not str(path).split("://", 1)[1].strip("/"):
        raise ValueError(f"storage URI {str(path)!r} names no bucket: expected {s}://bucket[/prefix]")
    return True


def normalize(path: str | os.PathLike) -> str:
    """A local path or file:// URI -> an absolute local path; a remote URI -> itself without a trailing '/'."""
    text = str(path)
    if scheme(text) == "file":
        text = text[len("file://"):]
        if not text.startswith("/"):
            raise ValueError(f"file URI {str(path)!r} must be absolute: file:///path")
    if is_remote(text):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def _split_query(uri: str) -> tuple[str, str]:
    """("s3://b/p", "endpoint_override=h:9000") from "s3://b/p?endpoint_override=h:9000" (URI options)."""
    head, _, query = uri.partition("?")
    return head, query


def join(base: str, *parts: str) -> str:
    """`base`/parts..., for local paths and URIs alike (a URI's ?options stay at the end)."""
    if is_remote(base):
        head, query = _split_query(base)
        joined = "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)])
        return f"{joined}?{query}" if query else joined
    return str(Path(normalize(base), *parts))


def s3_options(env: dict[str, str] | None = None) -> dict[str, Any]:
    """pyarrow.fs.S3FileSystem arguments from the AWS variables. Spelled out rather than left to pyarrow:
    S3FileSystem() alone ignores AWS_ENDPOINT_URL (only FileSystem.from_uri reads it) and without a region it
    asks AWS for the bucket's, which an S3-compatible server on a private network cannot answer.

        AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL    endpoint_override, e.g. http://127.0.0.1:9000 (MinIO, moto)
        AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN   explicit credentials (otherwise the AWS
                                                  default chain: ~/.aws, instance profile, web identity)
        AWS_REGION / AWS_DEFAULT_REGION           region (us-east-1 when an endpoint is given without one)
    """
    env = os.environ if env is None else env
    opts: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_override"] = endpoint  # with its scheme: http:// for a local server
    if env.get("AWS_ACCESS_KEY_ID"):
        opts.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env.get("AWS_SECRET_ACCESS_KEY", ""))
        if env.get("AWS_SESSION_TOKEN"):
            opts["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or ("us-east-1" if endpoint else None)
    if region:
        opts["region"] = region
    return opts


def worker_env() -> dict[str, str]:
    """The variables of this process a worker needs to reach the same storage (and use the same cache)."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) or k == CACHE_ENV}


storage_env = worker_env


def filesystem(path: str | os.PathLike):
    """(pyarrow filesystem, path on it) for a local path or URI. The S3 filesystem pickles with its options
    (endpoint, credentials when explicit), so Ray Train's controller and workers reach the same server."""
    import pyarrow.fs as pafs

    path = normalize(path)
    s = scheme(path)
    if s == "s3":
        head, query = _split_query(path)
        opts = s3_options()
        if query:  # s3://bucket/p?endpoint_override=host:9000&region=...: options of this URI over the variables
            from urllib.parse import parse_qsl

            opts.update(parse_qsl(query))
        return pafs.S3FileSystem(**opts), head[len("s3://"):].rstrip("/")
    if s in ("gs", "gcs"):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def check_reachable(path: str | os.PathLike, what: str) -> None:
    """Fail early, with a plain message, when a remote storage's bucket does not exist or cannot be reached
    (otherwise Ray Train fails deep in its storage setup, after starting the run)."""
    import pyarrow.fs as pafs

    if not is_remote(path):
        return
    fs, p = filesystem(path)
    bucket = p.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        # a ValueError: a wrong endpoint or credentials is a configuration error (`seqrec` prints it as one line)
        raise ValueError(f"{what} {path}: cannot reach the storage ({e}); endpoint and credentials come "
                              f"from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... (see docs/cluster.md, Storage)") from None
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{what} {path}: bucket {bucket!r} does not exist (create it first)")


def check_bucket(path: str | os.PathLike) -> None:
    """check_reachable for a storage root (run.storage_path)."""
    check_reachable(path, "storage")


def ray_storage(path: str) -> tuple[str, Any]:
    """RunConfig's (storage_path, storage_filesystem) for a normalized storage path: a local path as it is
    (Ray's own local filesystem), a URI as our pyarrow filesystem + the path on it, so Ray Train writes through
    the endpoint and credentials s3_options read rather than resolving the URI itself."""
    if not is_remote(path):
        return path, None
    fs, p = filesystem(path)
    return p, fs


def exists(path: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str | os.PathLike) -> bytes:
    if not exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write a file whole: locally to a temp name then renamed, remotely as one object (a PUT is atomic: the
    object appears complete or not at all)."""
    path = normalize(path)
    if not is_remote(path):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs, p = filesystem(path)
    with fs.open_output_stream(p) as f:
        f.write(data)


def upload_dir(local_dir: str | os.PathLike, target: str) -> None:
    """Copy a local directory's files to `target` (a local path or URI), each file whole."""
    import pyarrow.fs as pafs

    fs, p = filesystem(target)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), p, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "seqrec")


def write_manifest(directory: str | os.PathLike, expect: list[str] = ()) -> None:
    """Record the files of `directory` (and `expect`: files other writers add to the same directory, e.g. the
    other ranks' states, size unknown) in MANIFEST, written last. A copy missing any of them is incomplete."""
    root = Path(directory)
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}
    files.update({name: None for name in expect if name not in files})
    (root / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def verify_manifest(directory: Path, source: str) -> None:
    """Raise when `directory` (a copy of `source`) lacks a file its manifest lists or holds it at another size."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        return  # written without one (a dataset, an older checkpoint): nothing to check against
    for name, size in json.loads(manifest.read_text())["files"].items():
        f = directory / name
        if not f.is_file() or (size is not None and f.stat().st_size != size):
            raise FileNotFoundError(f"{source} is incomplete: {name} is missing or truncated (an upload cut short?)")


def local_copy(path: str | os.PathLike, kind: str) -> Path:
    """A local directory holding `path`: the directory itself when local, else a copy of the remote directory
    in the cache (`kind`: datasets, checkpoints). The copy is keyed by the URI and the remote listing (names,
    sizes, modification times), so it is downloaded once and again only if the remote directory was rewritten;
    it goes into a temp folder, is checked against its manifest, then renamed (a crash or a concurrent copy
    never leaves a half one under the final name)."""
    import pyarrow.fs as pafs

    if not is_remote(path):  # a local directory is used where it is (file:// stripped, the path as given)
        text = str(path)
        return Path(text[len("file://"):] if scheme(text) == "file" else text)
    path = normalize(path)
    check_reachable(path, kind.rstrip("s"))
    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{path} is not a directory on its storage (a missing path?)")
    listing = sorted((i.path[len(p):], i.size, i.mtime_ns) for i in fs.get_file_info(pafs.FileSelector(p, recursive=True))
                     if i.type == pafs.FileType.File)
    key = hashlib.sha256(json.dumps([path, listing]).encode()).hexdigest()[:20]
    dest = cache_root() / kind / key
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        pafs.copy_files(p, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        verify_manifest(tmp, path)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished the same copy first: keep theirs
            if not dest.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("copied %s to %s", path, dest)
    return dest


def uri_of(fs, fs_path: str) -> str:
    """The URI of a path on a pyarrow filesystem (a Ray Checkpoint's filesystem + path): s3://..., gs://...,
    or the plain local path."""
    name = getattr(fs, "type_name", "local")
    if name == "s3":
        return f"s3://{fs_path}"
    if name == "gcs":
        return f"gs://{fs_path}"
    if name in ("local", "mock"):
        return fs_path
    return f"{name}://{fs_path}"

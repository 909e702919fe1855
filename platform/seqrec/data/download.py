"""`seqrec data download`: fetch one category of the Amazon Review Data (2018).

Two files per category, laid out as on the public server:

    {base_url}/categoryFilesSmall/{Category}_5.json.gz   5-core reviews
    {base_url}/metaFiles2/meta_{Category}.json.gz        item metadata

Each file is streamed to a temporary name in `out_dir` and renamed only when complete, so an interrupted or
failed download never leaves a partial file under the final name. Files that already exist are kept.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2"
_CATEGORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_&,.\-]*$")
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be downloaded (HTTP error, network error, truncated body)."""


def category_urls(category: str, base_url: str = DEFAULT_BASE_URL) -> list[tuple[str, str]]:
    """[(url, file name)] of the reviews and meta files of `category`."""
    if not _CATEGORY.match(category):
        raise ValueError(f"invalid category name {category!r} (expected e.g. 'Magazine_Subscriptions')")
    base = base_url.rstrip("/")
    return [
        (f"{base}/categoryFilesSmall/{category}_5.json.gz", f"{category}_5.json.gz"),
        (f"{base}/metaFiles2/meta_{category}.json.gz", f"meta_{category}.json.gz"),
    ]


def download_file(url: str, dest: str | os.PathLike, timeout: float = 60) -> Path:
    """Stream `url` to `dest` through a temp file in the same directory, renamed when complete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except urllib.error.HTTPError as exc:
                raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise DownloadError(f"download of {url} failed: {reason}") from exc
            with response:
                expected = response.headers.get("Content-Length")
                try:
                    shutil.copyfileobj(response, out, _CHUNK)
                except OSError as exc:
                    raise DownloadError(f"download of {url} failed while reading: {exc}") from exc
            out.flush()
            size = out.tell()
        if expected is not None and expected.isdigit() and int(expected) != size:
            raise DownloadError(f"download of {url} is truncated: got {size} of {expected} bytes")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log.info("downloaded %s -> %s (%d bytes)", url, dest, size)
    return dest


def download_category(
    category: str,
    out_dir: str | os.PathLike,
    base_url: str = DEFAULT_BASE_URL,
    timeout: float = 60,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Download the 5-core reviews and the metadata of one category into `out_dir`.

    Returns [reviews path, meta path]. Existing complete files are kept unless `overwrite`.
    Raises DownloadError (a RuntimeError) naming the URL and HTTP status when a file cannot be fetched.
    """
    out = Path(out_dir)
    paths = []
    for url, name in category_urls(category, base_url):
        dest = out / name
        if dest.exists() and not overwrite:
            log.info("%s already exists, not downloading %s", dest, url)
        else:
            download_file(url, dest, timeout=timeout)
        paths.append(dest)
    return paths

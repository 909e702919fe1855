"""`download_category` against a local HTTP server laid out like the public Amazon 2018 server."""
from __future__ import annotations

import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from seqrec.data.download import DownloadError, download_category

CATEGORY = "Magazine_Subscriptions"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path, shared_data):
    root = tmp_path / "www"
    (root / "categoryFilesSmall").mkdir(parents=True)
    (root / "metaFiles2").mkdir()
    raw = shared_data / "raw_sample"
    shutil.copyfile(raw / f"{CATEGORY}_5.json.gz", root / "categoryFilesSmall" / f"{CATEGORY}_5.json.gz")
    shutil.copyfile(raw / f"meta_{CATEGORY}.json.gz", root / "metaFiles2" / f"meta_{CATEGORY}.json.gz")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_download_category_matches_bytes(server, tmp_path, shared_data):
    out = tmp_path / "raw"
    paths = download_category(CATEGORY, out, base_url=server, timeout=10)
    assert [p.name for p in paths] == [f"{CATEGORY}_5.json.gz", f"meta_{CATEGORY}.json.gz"]
    for path in paths:
        assert path.read_bytes() == (shared_data / "raw_sample" / path.name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp files left

    # Existing files are kept (no second download needed); overwrite refetches identical bytes.
    again = download_category(CATEGORY, out, base_url=server, timeout=10, overwrite=True)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_download_missing_category_is_clear_and_leaves_nothing(server, tmp_path):
    out = tmp_path / "raw"
    with pytest.raises(DownloadError, match=r"No_Such_Category_5\.json\.gz.*HTTP 404"):
        download_category("No_Such_Category", out, base_url=server, timeout=10)
    assert not out.exists() or list(out.iterdir()) == []


def test_download_rejects_path_like_category(tmp_path):
    with pytest.raises(ValueError):
        download_category("../etc", tmp_path, base_url="http://127.0.0.1:9/")

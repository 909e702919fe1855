"""seqrec.storage against a real S3-compatible server (moto's server mode, in a subprocess on 127.0.0.1): URIs,
the download cache, uploads, and a training run whose dataset and checkpoints live in the bucket."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from seqrec import storage as st
from seqrec.ray_utils import free_ports

BUCKET = "seqrec-test"



@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server for this module, the AWS variables pointing at it and a bucket; stopped by its PID."""
    port = free_ports()[0]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (exit {proc.poll()})") from None
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv(st.CACHE_ENV, str(tmp_path_factory.mktemp("seqrec_cache")))
            pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)
            yield {"endpoint": endpoint, "bucket": BUCKET}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _make_dir(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_text('{"x": 1}')
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 40)
    return root


# ------------------------------------------------------------------------------------------ URIs
def test_normalize_join_and_scheme_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert st.normalize("runs/x") == str(tmp_path / "runs" / "x")
    assert st.normalize(f"file://{tmp_path}/d/") == str(tmp_path / "d")
    assert st.normalize("s3://bkt/runs/") == "s3://bkt/runs"
    assert not st.is_remote(f"file://{tmp_path}") and not st.is_remote("rel/path")
    assert st.is_remote("s3://bkt/p") and st.is_remote("gs://bkt/p")
    assert st.join("s3://bkt/runs", "exp", "/checkpoint_1") == "s3://bkt/runs/exp/checkpoint_1"
    assert (st.join("s3://bkt/r?endpoint_override=h:9000", "exp")
            == "s3://bkt/r/exp?endpoint_override=h:9000")  # URI options stay at the end
    assert st.join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")
    with pytest.raises(ValueError, match="unsupported storage URI"):
        st.normalize("ftp://host/x")
    with pytest.raises(ValueError, match="names no bucket"):
        st.normalize("s3://")
    with pytest.raises(ValueError, match="must be absolute"):
        st.normalize("file://relative/x")
    assert st.uri_of(pafs.LocalFileSystem(), "/a/b") == "/a/b"


# ------------------------------------------------------------------------------------------ against the server
def test_upload_dir_round_trip_file_and_s3(s3, tmp_path):
    src = _make_dir(tmp_path / "src")
    st.upload_dir(src, f"file://{tmp_path}/copy")
    assert _tree(tmp_path / "copy") == _tree(src)
    uri = f"s3://{BUCKET}/roundtrip/dir"
    st.upload_dir(src, uri)
    assert st.exists(st.join(uri, "sub", "b.bin"))
    assert json.loads(st.read_bytes(st.join(uri, "a.json"))) == {"x": 1}
    back = st.local_copy(uri, "datasets")
    assert _tree(back) == _tree(src)
    st.write_bytes(b"whole", st.join(uri, "w.txt"))
    assert st.read_bytes(st.join(uri, "w.txt")) == b"whole"


def test_local_copy_is_cached_refreshed_and_never_half(s3, tmp_path, monkeypatch):
    src = _make_dir(tmp_path / "src")
    uri = f"s3://{BUCKET}/cache/dir"
    st.upload_dir(src, uri)
    first = st.local_copy(uri, "datasets")
    stamp = (first / "a.json").stat().st_mtime_ns
    again = st.local_copy(uri, "datasets")
    assert again == first and (again / "a.json").stat().st_mtime_ns == stamp  # not downloaded twice
    # the remote directory rewritten: its listing changed, so the copy is fetched again
    (src / "a.json").write_text('{"x": 2, "longer": true}')
    st.upload_dir(src, uri)
    fresh = st.local_copy(uri, "datasets")
    assert fresh != first and json.loads((fresh / "a.json").read_text())["x"] == 2

    # a download cut short leaves neither the final directory nor its temp folder
    uri2 = f"s3://{BUCKET}/cache/dir2"
    st.upload_dir(src, uri2)
    real_copy = pafs.copy_files

    def copy_then_fail(source, destination, **kw):
        real_copy(source, destination, **kw)
        raise OSError("connection reset")

    monkeypatch.setattr(pafs, "copy_files", copy_then_fail)
    before = set((st.cache_root() / "datasets").iterdir())
    with pytest.raises(OSError, match="connection reset"):
        st.local_copy(uri2, "datasets")
    assert set((st.cache_root() / "datasets").iterdir()) == before
    monkeypatch.setattr(pafs, "copy_files", real_copy)
    assert _tree(st.local_copy(uri2, "datasets")) == _tree(src)

    with pytest.raises(FileNotFoundError, match="not a directory"):
        st.local_copy(f"s3://{BUCKET}/no/such/prefix", "datasets")


def test_manifest_refuses_a_partial_checkpoint(s3, tmp_path):
    """A checkpoint whose upload lost a file (or the file of another rank that the manifest expects) is refused
    by local_copy, and nothing is left in the cache; the complete one is accepted."""
    src = _make_dir(tmp_path / "ckpt")
    st.write_manifest(src, expect=["rank_state_1.pt"])
    (src / "rank_state_1.pt").write_bytes(b"rank 1")  # the other rank's part, merged in by Ray
    listed = json.loads((src / st.MANIFEST).read_text())["files"]
    assert listed == {"a.json": 8, "sub/b.bin": 10240, "rank_state_1.pt": None}
    uri = f"s3://{BUCKET}/partial/checkpoint_00000003"
    st.upload_dir(src, uri)
    assert _tree(st.local_copy(uri, "checkpoints")) == _tree(src)
    fs, p = st.filesystem(uri)
    fs.delete_file(f"{p}/sub/b.bin")  # an upload cut short
    before = set((st.cache_root() / "checkpoints").iterdir())
    with pytest.raises(FileNotFoundError, match="incomplete: sub/b.bin"):
        st.local_copy(uri, "checkpoints")
    assert set((st.cache_root() / "checkpoints").iterdir()) == before
    (src / "rank_state_1.pt").unlink()  # rank 1's part never arrived
    st.upload_dir(src, f"{uri}_rank0_only")
    with pytest.raises(FileNotFoundError, match="incomplete: rank_state_1.pt"):
        st.local_copy(f"{uri}_rank0_only", "checkpoints")

def test_missing_bucket_or_dataset_is_a_plain_error(s3):
    from seqrec.config import load_config
    from seqrec.data.dataset import PreparedDataset
    from seqrec.train.config import ExperimentConfig
    from seqrec.train.loop import run_experiment

    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket'"):
        st.check_bucket("s3://no-such-bucket/runs")
    st.check_bucket(f"s3://{BUCKET}/runs")
    # run_experiment refuses before Ray is even started
    cfg = load_config(ExperimentConfig, "tiny_demo", subdir="train",
                      overrides={"data.path": f"s3://{BUCKET}/no/dataset", "run.storage_path": "s3://no-such-bucket/r"})
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket'"):
        run_experiment(cfg)
    with pytest.raises(FileNotFoundError, match="not a directory on its storage"):
        PreparedDataset.load(f"s3://{BUCKET}/no/dataset")
    with pytest.raises(ValueError, match="unsupported storage URI"):
        PreparedDataset.load("hdfs://nn/x")


@pytest.mark.slow  # ~4 min on 2 shared cores: two trainings (its own CI step, .ci/run)
def test_train_evaluate_resume_on_s3(s3, ray_session, demo_dataset, tmp_path):
    """data.path and run.storage_path on S3: checkpoints and summary.json land in the bucket, evaluate from the
    checkpoint URI repeats the run's own test figures, resume_from the URI continues at the right step."""
    from seqrec.config import load_config
    from seqrec.eval.cli import run_evaluation
    from seqrec.train.config import ExperimentConfig
    from seqrec.train.loop import run_experiment

    data_uri = f"s3://{BUCKET}/data/demo"
    st.upload_dir(demo_dataset.path, data_uri)
    runs = f"s3://{BUCKET}/runs"

    def cfg(**overrides):
        base = {"data.path": data_uri, "run.storage_path": runs, "train.threads_per_worker": 1,
                "train.steps": 6, "train.eval_every": 3}
        return load_config(ExperimentConfig, "tiny_demo", subdir="train", overrides={**base, **overrides})

    summary = run_experiment(cfg(**{"run.name": "s3run"}))
    assert summary["final_step"] == 6
    assert summary["best_checkpoint"].startswith(f"{runs}/s3run/checkpoint_")
    fs, root = st.filesystem(f"{runs}/s3run")
    names = {info.path[len(root) + 1:] for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))}
    ckpts = sorted({n.split("/")[0] for n in names if n.startswith("checkpoint_0")})  # not checkpoint_manager_snapshot.json
    assert len(ckpts) == 2  # steps 3 and 6
    for c in ckpts:
        for f in ("model.safetensors", "config.json", "train_state.pt", "rank_state_0.pt", st.MANIFEST):
            assert f"{c}/{f}" in names, f"{c}/{f}"
    saved = json.loads(st.read_bytes(f"{runs}/s3run/summary.json"))
    assert saved["best_checkpoint"] == summary["best_checkpoint"] and saved["test"] == summary["test"]
    assert json.loads(st.read_bytes(st.join(summary["best_checkpoint"], "config.json")))["model_name"] == "sasrec"

    # seqrec evaluate's path: dataset and checkpoint by URI, the same test figures as the run's own
    _, results = run_evaluation(data_uri, [summary["best_checkpoint"]], split="test")
    (result,) = results.values()
    metrics = result["metrics"]
    assert {k: metrics[k] for k in summary["test"]} == pytest.approx(summary["test"], abs=1e-12)

    resumed = run_experiment(cfg(**{"run.name": "s3resumed", "train.steps": 9,
                                    "run.resume_from": summary["latest_checkpoint"], "run.test": False}))
    assert resumed["final_step"] == 9
    fs, root = st.filesystem(f"{runs}/s3resumed")
    steps = sorted(int(i.base_name.split("_")[-1]) for i in fs.get_file_info(pafs.FileSelector(root))
                   if i.base_name.startswith("checkpoint_0"))
    assert steps == [9]  # continued from step 6: no re-run of steps 1..6
    state = st.local_copy(resumed["latest_checkpoint"], "checkpoints") / "train_state.pt"
    import torch

    assert torch.load(state, weights_only=True)["state"]["step"] == 9
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        run_experiment(cfg(**{"run.name": "bad", "run.resume_from": f"{runs}/s3run/no_checkpoint"}))

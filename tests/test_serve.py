"""Ray Serve end to end on the demo catalog: served rankings equal offline score_all, search equals the BM25
index, bad input gets 4xx (never 5xx), catalog updates, a model swap under load without failures, and a
killed recommender replica being replaced while requests keep succeeding.

One Serve instance on the session Ray (loopback, a free port), shut down at the end of the module.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from seqrec.data.batching import make_batch
from seqrec.models.registry import build_model, model_config_dict, save_state_dict
from seqrec.retrieval.bm25 import BM25Index
from seqrec.serve.fuzz import malformed_requests
from seqrec.ray_utils import free_ports, process_group_alive

SASREC = {"max_len": 20, "dim": 16, "layers": 1, "heads": 2, "hidden": 32}


def write_checkpoint(path: Path, n_items: int, seed: int, dataset: str) -> Path:
    """A randomly initialised SASRec checkpoint in the training layout (safetensors + config.json)."""
    torch.manual_seed(seed)
    model = build_model("sasrec", SASREC, n_items)
    path.mkdir(parents=True)
    save_state_dict(model, path / "model.safetensors")
    meta = {"model_name": "sasrec", "model": model_config_dict(model), "n_items": n_items,
            "experiment": {"data": {"path": dataset}}}
    (path / "config.json").write_text(json.dumps(meta))
    return path



def small_settings(checkpoint: Path, **extra) -> dict:
    tiny = {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1}
    return {"model": {"checkpoint": str(checkpoint)}, "recommender": dict(tiny), "bm25": dict(tiny),
            "ingress": dict(tiny), "generator": dict(tiny), "catalog_sync_s": 0.2, **extra}


@pytest.fixture(scope="module")
def served(ray_session, demo_dataset, tmp_path_factory):
    from ray import serve

    from seqrec.serve.deploy import deploy_config, serve_config

    root = tmp_path_factory.mktemp("serve")
    ckpt_a = write_checkpoint(root / "a", demo_dataset.n_items, 0, str(demo_dataset.path))
    ckpt_b = write_checkpoint(root / "b", demo_dataset.n_items, 1, str(demo_dataset.path))
    port = free_ports()[0]
    config = serve_config(small_settings(ckpt_a), "127.0.0.1", port)
    deploy_config(config)
    state = {"url": f"http://127.0.0.1:{port}", "a": ckpt_a, "b": ckpt_b, "config": config}
    yield state
    serve.shutdown()


def post(url: str, path: str, body, **kw) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url + path, data=data, headers={"content-type": "application/json", **kw.pop("headers", {})},
                         timeout=30, **kw)


def offline_top_k(model, histories, k):
    """Reference ranking: the evaluator's batch and score_all, ordered by (-score, item index)."""
    with torch.no_grad():
        scores = model.score_all(make_batch(histories, max_len=model.max_len)).numpy()
    out = []
    for row in scores:
        order = np.lexsort((np.arange(len(row)), -row))[:k]
        out.append((order.tolist(), row[order]))
    return out


def test_served_rankings_equal_offline_score_all(served, demo_dataset):
    from seqrec.models.registry import load_model

    url = served["url"]
    rows = demo_dataset.eval_rows("test")
    histories = [h for h in rows.histories[:40]]
    with ThreadPoolExecutor(8) as pool:  # concurrent, so the replica really batches them
        responses = list(pool.map(lambda h: post(url, "/recommend", {"history": h.tolist(), "k": 15}), histories))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:2]
    model, _ = load_model(served["a"])
    for resp, (idx, scores) in zip(responses, offline_top_k(model, histories, 15)):
        body = resp.json()
        assert [it["item_idx"] for it in body["items"]] == idx
        np.testing.assert_allclose([it["score"] for it in body["items"]], scores, rtol=1e-5, atol=1e-6)
        assert body["model"]["name"] == "sasrec" and body["model"]["version"].startswith("sasrec@a#")

    # item ids (ASINs) are the same items as their indices; exclude_history drops them
    ids = demo_dataset.item_ids()
    h = histories[0]
    by_id = post(url, "/recommend", {"history": [ids[i] for i in h], "k": 15}).json()
    assert [it["item_idx"] for it in by_id["items"]] == offline_top_k(model, [h], 15)[0][0]
    assert all(it["item_id"] == ids[it["item_idx"]] for it in by_id["items"])
    excl = post(url, "/recommend", {"history": h.tolist(), "k": 15, "exclude_history": True}).json()
    assert not set(h.tolist()) & {it["item_idx"] for it in excl["items"]} and len(excl["items"]) == 15


def test_search_equals_bm25_index(served, demo_dataset):
    spec = requests.get(served["url"] + "/openapi.json", timeout=10).json()  # the docs at /docs read this
    assert {"/recommend", "/search", "/items", "/healthz", "/version"} <= set(spec["paths"])
    index = BM25Index(demo_dataset.item_texts())
    for query in ("Title: " + demo_dataset.items.column("title")[3].as_py(), "brand unknown category"):
        body = post(served["url"], "/search", {"query": query, "k": 10}).json()
        idx, scores = index.top_k(query, 10)
        keep = scores > 0
        assert [it["item_idx"] for it in body["items"]] == idx[keep].tolist()
        np.testing.assert_allclose([it["score"] for it in body["items"]], scores[keep])


def test_fuzz_malformed_requests_get_4xx(served, demo_dataset):
    url = served["url"]
    cases = malformed_requests(np.random.default_rng(0), 150, demo_dataset.n_items)
    statuses = []
    with ThreadPoolExecutor(8) as pool:
        for (path, raw), resp in zip(cases, pool.map(lambda c: post(url, c[0], c[1]), cases)):
            statuses.append(resp.status_code)
            assert 400 <= resp.status_code < 500, (path, raw[:200], resp.status_code, resp.text[:300])
            assert resp.json()["error"], resp.text  # a message, not just a code
    assert 413 in statuses and 422 in statuses
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    assert post(url, "/recommend", {"history": [1, 2], "k": 3}).status_code == 200

    # /recommend with application/json goes through app.RecommendFastPath; a "+json" content type is parsed by
    # the FastAPI route instead: both paths give the same statuses, and the same answer to a valid request
    via_route = {"content-type": "application/vnd.seqrec+json"}
    for (path, raw), status in zip(cases, statuses):
        if path == "/recommend":
            resp = post(url, path, raw, headers=via_route)
            assert resp.status_code == status and resp.json()["error"], (raw[:200], status, resp.text[:300])
    valid = {"history": [1, 2, 7], "k": 5, "exclude_history": True}
    assert post(url, "/recommend", valid, headers=via_route).json() == post(url, "/recommend", valid).json()


def test_catalog_update_reaches_search_and_recommend(served, demo_dataset):
    url = served["url"]
    ids = demo_dataset.item_ids()
    body = post(url, "/items", {"items": [{"item_id": ids[5], "title": "Zyxwv Quasar Telescope",
                                            "categories": ["Optics"], "brand": "Zyx"}]})
    assert body.status_code == 200, body.text
    assert body.json()["updated"][0]["item_idx"] == 5 and not body.json()["added"]
    time.sleep(body.json()["visible_within_s"] + 0.3)
    hits = post(url, "/search", {"query": "zyxwv quasar", "k": 3}).json()["items"]
    assert hits[0]["item_idx"] == 5 and hits[0]["title"] == "Zyxwv Quasar Telescope"
    rec = post(url, "/recommend", {"history": [5], "k": 100}).json()["items"]
    assert any(it["item_idx"] == 5 and it["title"] == "Zyxwv Quasar Telescope" for it in rec)
    # an ID-only model cannot rank a text-only new item: clear 422, nothing added
    new = post(url, "/items", {"items": [{"item_id": "BRAND-NEW", "title": "New thing"}]})
    assert new.status_code == 422 and "cannot rank items" in new.json()["error"]
    version = requests.get(url + "/version", timeout=10).json()
    assert version["catalog_version"] == 1 and version["model"]["new_items"] is False


def test_model_swap_under_load_drops_nothing(served):
    """A user_config-only redeploy: the running replica loads the new checkpoint while serving."""
    from seqrec.serve.deploy import deploy_config, with_model

    url = served["url"]
    before = requests.get(url + "/version", timeout=10).json()["model"]
    failures, versions, stop = [], set(), threading.Event()

    def load():
        while not stop.is_set():
            r = post(url, "/recommend", {"history": [3, 1, 4], "k": 5})
            if r.status_code != 200:
                failures.append((r.status_code, r.text[:200]))
            else:
                versions.add(r.json()["model"]["version"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    served["config"] = with_model(served["config"], checkpoint=str(served["b"]))
    deploy_config(served["config"])
    deadline = time.time() + 30
    while time.time() < deadline and not any(v.startswith("sasrec@b#") for v in versions):
        time.sleep(0.2)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    after = requests.get(url + "/version", timeout=10).json()["model"]
    assert not failures, failures[:3]
    assert after["version"].startswith("sasrec@b#") and after["version"] != before["version"]
    assert after["pid"] == before["pid"] and after["swaps"] == before["swaps"] + 1  # reconfigured in place
    assert {before["version"], after["version"]} <= versions
    # broken checkpoints are refused before anything is deployed; the current model keeps serving
    bad = served["b"].parent / "broken"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_name": "sasrec", "model": SASREC, "n_items": after["n_items"]}))
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not readable"):
        with_model(served["config"], checkpoint=str(bad))
    (bad / "config.json").write_text(json.dumps({"model_name": "sasrec", "model": SASREC, "n_items": 3}))
    with pytest.raises(ValueError, match="scores 3 items"):
        with_model(served["config"], checkpoint=str(bad))
    assert requests.get(url + "/version", timeout=10).json()["model"]["version"] == after["version"]


def test_killed_replica_is_replaced(served):
    """Two recommender replicas; SIGKILL one under load: Serve starts a replacement, few or no requests fail."""
    import copy

    from seqrec.serve.deploy import deploy_config, deployment_override

    url = served["url"]
    config = copy.deepcopy(served["config"])
    deployment_override(config, "Recommender")["num_replicas"] = 2
    deploy_config(config)
    pids = set()
    deadline = time.time() + 30
    while len(pids) < 2 and time.time() < deadline:
        pids.add(requests.get(url + "/version", timeout=10).json()["model"]["pid"])
    assert len(pids) == 2
    victim = sorted(pids)[0]
    results = []

    def worker(n):
        for _ in range(n):
            results.append(post(url, "/recommend", {"history": [2, 7], "k": 5}).status_code)

    threads = [threading.Thread(target=worker, args=(75,)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    for t in threads:
        t.join()
    failed = sum(s != 200 for s in results)
    assert failed <= 0.01 * len(results), (failed, len(results))
    live, deadline = set(), time.time() + 60
    while time.time() < deadline and len(live - {victim}) < 2:
        live.add(requests.get(url + "/version", timeout=10).json()["model"]["pid"])
    assert len(live - {victim}) == 2, live
    print(f"replica replaced within {time.time() - killed_at:.1f}s; {failed}/{len(results)} requests failed")


def test_api_key_dependency(monkeypatch):
    from fastapi import HTTPException

    from seqrec.serve.app import require_api_key

    import asyncio

    monkeypatch.delenv("SEQREC_API_KEY", raising=False)
    asyncio.run(require_api_key(None))  # no key configured: open
    monkeypatch.setenv("SEQREC_API_KEY", "s3cret")
    asyncio.run(require_api_key("s3cret"))
    for wrong in (None, "nope"):
        with pytest.raises(HTTPException) as e:
            asyncio.run(require_api_key(wrong))
        assert e.value.status_code == 401


def test_body_limit_reads_chunked_bodies_up_to_the_limit():
    """BodyLimit on a body without Content-Length (chunked): 413 once it passes the limit, otherwise the
    whole body is replayed to the app in one message."""
    import asyncio
    from types import SimpleNamespace

    from seqrec.serve.app import BodyLimit

    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})

    def run(chunks):
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        sent = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "headers": [], "app": SimpleNamespace(state=SimpleNamespace(max_body_bytes=10))}
        asyncio.run(BodyLimit(app)(scope, receive, send))
        return sent[0]["status"]

    assert run([b"1234", b"5678"]) == 200 and seen[-1] == {"type": "http.request", "body": b"12345678", "more_body": False}
    assert run([b"123456", b"78901"]) == 413 and len(seen) == 1


def test_score_in_ingress_same_rankings_and_swap(served, demo_dataset):
    """score_in_ingress: the ingress replica ranks with the Recommender's code (one Serve hop fewer); rankings
    still equal offline score_all, the model is the Ingress's user_config and a swap reconfigures it in place."""
    from seqrec.models.registry import load_model
    from seqrec.serve.deploy import deploy_config, serve_config, served_model, with_model

    url = served["url"]
    config = serve_config(small_settings(served["a"], score_in_ingress=True), "127.0.0.1", int(url.rsplit(":", 1)[1]))
    assert served_model(config)[0] == "Ingress"
    deploy_config(config)
    info = requests.get(url + "/version", timeout=10).json()
    assert info["model"]["version"].startswith("sasrec@a#")
    histories = demo_dataset.eval_rows("test").histories[:16]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda h: post(url, "/recommend", {"history": h.tolist(), "k": 10}), histories))
    model, _ = load_model(served["a"])
    for resp, (idx, _) in zip(responses, offline_top_k(model, histories, 10)):
        assert resp.status_code == 200, resp.text
        assert [it["item_idx"] for it in resp.json()["items"]] == idx
    assert post(url, "/recommend", {"history": [1], "critique": "x"}).status_code == 422  # errors keep their status
    assert post(url, "/recommend", {"history": [10**6]}).status_code == 422
    swapped = with_model(config, checkpoint=str(served["b"]))
    deploy_config(swapped)
    deadline = time.time() + 30
    while time.time() < deadline:
        after = requests.get(url + "/version", timeout=10).json()["model"]
        if after["version"].startswith("sasrec@b#"):
            break
        time.sleep(0.2)
    assert after["version"].startswith("sasrec@b#") and after["pid"] == info["model"]["pid"]  # in place
    assert post(url, "/recommend", {"history": [1, 2], "k": 3}).json()["model"]["version"] == after["version"]


def test_flare_critique_and_text_only_new_items(served, demo_dataset):
    """Flare T+ID (text features): critiques change the ranking through score_all's critique keys, and an
    item added by text alone becomes recommendable without retraining. Runs last: it replaces the app."""
    from seqrec.models.flare import encode_critiques
    from seqrec.serve.deploy import deploy_config, serve_config

    url = served["url"]
    torch.manual_seed(0)
    params = {"max_len": 20, "dim": 16, "layers": 1, "heads": 2, "hidden": 32, "perceiver_dim": 32,
              "perceiver_heads": 2, "perceiver_layers": 1, "perceiver_latents": 2}
    model = build_model("flare", params, demo_dataset.n_items)
    ckpt = served["a"].parent / "flare"
    ckpt.mkdir()
    save_state_dict(model, ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps({"model_name": "flare", "model": model_config_dict(model),
                                                  "n_items": demo_dataset.n_items}))
    settings = small_settings(ckpt)
    settings["model"]["dataset"] = str(demo_dataset.path)
    settings["limits"] = {"max_k": 1000}
    deploy_config(serve_config(settings, "127.0.0.1", int(url.rsplit(":", 1)[1])))
    info = requests.get(url + "/version", timeout=10).json()["model"]
    assert info["name"] == "flare" and info["critique"] and info["new_items"]

    history = [3, 8, 1]
    plain = post(url, "/recommend", {"history": history, "k": 10})
    critiqued = post(url, "/recommend", {"history": history, "k": 10, "critique": "cheaper, and from another brand"})
    assert plain.status_code == 200 and critiqued.status_code == 200, critiqued.text
    # the served critique ranking is the offline score_all with the same critique keys
    from seqrec.models.registry import load_model
    from seqrec.models.flare import load_flare_features
    from seqrec.features.encoder import FrozenTextEncoder

    offline, _ = load_model(ckpt)
    load_flare_features(offline, demo_dataset, use_ray=False)
    enc = FrozenTextEncoder.load(offline.config.encoder, max_tokens=offline.config.max_text_tokens)
    batch = make_batch([np.array(history)], max_len=offline.max_len)
    batch["critique_tokens"], batch["critique_mask"] = encode_critiques(["cheaper, and from another brand"], enc)
    with torch.no_grad():
        row = offline.score_all(batch)[0].numpy()
    want = np.lexsort((np.arange(len(row)), -row))[:10].tolist()
    assert [it["item_idx"] for it in critiqued.json()["items"]] == want
    assert [it["item_idx"] for it in plain.json()["items"]] != want or plain.json()["items"] != critiqued.json()["items"]

    # a new item known only by its text: added, then rankable and usable in histories
    added = post(url, "/items", {"items": [{"item_id": "NEW-TEXT-ONLY", "title": "Solar Telescope Filter",
                                            "categories": ["Optics", "Filters"], "brand": "Acme"}]})
    assert added.status_code == 200, added.text
    new_idx = added.json()["added"][0]["item_idx"]
    assert new_idx == demo_dataset.n_items
    time.sleep(added.json()["visible_within_s"] + 0.5)
    full = post(url, "/recommend", {"history": ["NEW-TEXT-ONLY", 3], "k": demo_dataset.n_items + 1})
    assert full.status_code == 200, full.text
    assert new_idx in {it["item_idx"] for it in full.json()["items"]}
    assert post(url, "/search", {"query": "solar telescope filter", "k": 1}).json()["items"][0]["item_idx"] == new_idx


def test_calrec_generator_ranks_its_generations_with_qrr(served, demo_dataset):
    """A CALRec checkpoint is served by the Generator deployment: the model's own `generations` (seeded
    sampling) ranked by BM25Search with quasi-round-robin equal offline CALRec score_all; the answer carries
    the generated texts. Runs after the Flare test: it replaces the app again (Generator instead of Recommender)."""
    from seqrec.models.registry import load_model
    from seqrec.retrieval.qrr import qrr_batch
    from seqrec.serve.deploy import deploy_config, serve_config, with_model

    import shutil

    url = served["url"]
    # a copy of the catalog: the store starts over (earlier tests changed and added items in this one)
    catalog = Path(shutil.copytree(demo_dataset.path, served["a"].parent / "demo_copy"))
    params = {"lm": "tiny", "tiny_dim": 32, "tiny_layers": 1, "tiny_heads": 2, "max_seq_tokens": 160,
              "max_item_tokens": 32, "n_gen": 4, "max_new_tokens": 12, "gen_batch_users": 4}
    torch.manual_seed(0)
    model = build_model("calrec", params, demo_dataset.n_items)
    ckpt = served["a"].parent / "calrec"
    ckpt.mkdir()
    save_state_dict(model, ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps({"model_name": "calrec", "model": model_config_dict(model),
                                                  "n_items": demo_dataset.n_items, "dataset_path": str(catalog)}))
    config = serve_config(small_settings(ckpt), "127.0.0.1", int(url.rsplit(":", 1)[1]))  # dataset from config.json
    assert config["applications"][0]["deployments"][0]["name"] == "Generator"
    deploy_config(config)
    info = requests.get(url + "/version", timeout=10).json()["model"]
    assert info["name"] == "calrec" and info["generator"] and not info["critique"] and not info["new_items"]

    history = [3, 8, 1]
    resp = post(url, "/recommend", {"history": history, "k": 10})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    gens = body["generations"]
    assert len(gens) == 4 and all(isinstance(g["text"], str) and g["logprob"] <= 0 for g in gens)
    # the served items are QRR over exactly these generations (BM25 over the catalog texts)
    index = BM25Index(demo_dataset.item_texts())
    row = qrr_batch([[g["text"] for g in gens]], [[g["logprob"] for g in gens]], index)[0]
    want = np.lexsort((np.arange(len(row)), -row))[:10].tolist()
    assert [it["item_idx"] for it in body["items"]] == want
    np.testing.assert_allclose([it["score"] for it in body["items"]], row[want])
    # ... and the generations are the model's own (a fresh replica samples like a fresh offline model)
    offline, _ = load_model(ckpt, dataset=demo_dataset, use_ray=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replica's thread count: same logits, same samples
    try:
        batch = make_batch([np.array(history)])
        texts, lps = offline.generations(batch)[0]
        offline_scores = offline.score_all(batch)[0].numpy()
    finally:
        torch.set_num_threads(threads)
    assert [g["text"] for g in gens] == texts
    np.testing.assert_allclose([g["logprob"] for g in gens], lps, rtol=1e-4, atol=1e-4)
    assert [it["item_idx"] for it in body["items"]] == np.lexsort((np.arange(len(offline_scores)), -offline_scores))[:10].tolist()
    # the same history again: cached samples, same answer; exclude_history; bad input stays 4xx
    assert post(url, "/recommend", {"history": history, "k": 10}).json()["items"] == body["items"]
    excl = post(url, "/recommend", {"history": history, "k": 10, "exclude_history": True}).json()["items"]
    assert len(excl) == 10 and not set(history) & {it["item_idx"] for it in excl}
    assert post(url, "/recommend", {"history": history, "critique": "cheaper"}).status_code == 422
    assert post(url, "/recommend", {"history": [demo_dataset.n_items]}).status_code == 422
    assert post(url, "/items", {"items": [{"item_id": "NEW-GEN", "title": "x"}]}).status_code == 422
    # a swap must stay within the generator kind
    with pytest.raises(ValueError, match="served by the Recommender"):
        with_model(config, checkpoint=str(served["a"]))


def test_top_k_rows_equals_stable_sort_with_ties_and_excluded_items():
    """Served top-k = a stable sort of the row (score desc, index asc), -inf (excluded history) dropped, also
    when ties straddle the k-th place (the batched topk's cut among them is arbitrary)."""
    from seqrec.serve.core import top_k_rows

    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.integers(0, 6, size=(40, 30)).astype(np.float32))  # many ties
    scores[3, :] = float("-inf")
    scores[4, 5:] = float("-inf")  # fewer finite items than k
    scores[5] = torch.arange(30, dtype=torch.float32)  # no ties
    for k in (1, 10, 30):
        for row, (idx, val) in zip(scores, top_k_rows(scores, k)):
            order = np.lexsort((np.arange(30), -row.double().numpy()))[:k]
            order = order[np.isfinite(row.numpy()[order])]
            assert idx.tolist() == order.tolist()
            assert np.array_equal(val, row.double().numpy()[order])
    assert [len(i) for i, _ in top_k_rows(scores[:0], 5)] == [] and len(top_k_rows(scores, 0)[0][0]) == 0


def test_model_source_resolution(demo_dataset, tmp_path):
    """Checkpoint paths, Tune best.json / training summary.json records by path or name, and clear errors."""
    from seqrec.serve.app import deployment_options
    from seqrec.serve.config import ModelSource, ReplicaOptions, resolve_source

    ckpt = write_checkpoint(tmp_path / "sweep" / "trial" / "ckpt", demo_dataset.n_items, 0, str(demo_dataset.path))
    direct = resolve_source(ModelSource(checkpoint=str(ckpt)))
    assert direct.checkpoint == str(ckpt.resolve()) and direct.dataset == str(Path(demo_dataset.path).resolve())
    # Tune's best.json: checkpoint (relative paths are relative to the record) and dataset
    (tmp_path / "sweep" / "best.json").write_text(json.dumps(
        {"checkpoint": "trial/ckpt", "dataset": str(demo_dataset.path), "metrics": {"ndcg@10/pes": 0.1}}))
    by_name = resolve_source(ModelSource(best_record="sweep", records_dir=str(tmp_path)))
    by_path = resolve_source(ModelSource(best_record=str(tmp_path / "sweep" / "best.json")))
    assert by_name.checkpoint == by_path.checkpoint == direct.checkpoint
    # a training run's summary.json
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"best_checkpoint": str(ckpt)}))
    assert resolve_source(ModelSource(best_record="run", records_dir=str(tmp_path))).checkpoint == direct.checkpoint
    with pytest.raises(FileNotFoundError, match="no best record"):
        resolve_source(ModelSource(best_record="missing", records_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="exactly one"):
        resolve_source(ModelSource(checkpoint=str(ckpt), best_record="sweep"))
    (tmp_path / "bad.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(ValueError, match="names no checkpoint"):
        resolve_source(ModelSource(best_record=str(tmp_path / "bad.json")))
    # replica options: autoscaling when min < max, a fixed count otherwise
    auto = deployment_options(ReplicaOptions(min_replicas=1, max_replicas=3, target_ongoing_requests=4))
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}
    assert deployment_options(ReplicaOptions(min_replicas=2, max_replicas=2))["num_replicas"] == 2


def test_serving_device_follows_the_replicas_gpus():
    """A replica scores on its GPU only when Ray gave it one (then torch sees CUDA); here, with none, the CPU."""
    import torch

    from seqrec.serve.core import serving_device

    assert serving_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_sigterm_during_startup_leaves_nothing_behind(demo_dataset, tmp_path):
    """A SIGTERM that lands after `seqrec serve run` has started its local Ray instance but before the service is
    up (a supervisor giving up on a slow start) must stop everything it started (raylet, GCS, Serve controller,
    replicas): the whole process group exits, with status 143, and nothing answers on the port."""
    import subprocess

    from seqrec.ray_utils import ray_executable

    ckpt = write_checkpoint(tmp_path / "ckpt", demo_dataset.n_items, 0, str(demo_dataset.path))
    port = free_ports()[0]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local instance of its own
    env.update(RAY_USAGE_STATS_ENABLED="0")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([ray_executable("seqrec"), "serve", "run", "--checkpoint", str(ckpt),
                                 "--dataset", str(demo_dataset.path), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "ray initialised at" not in log_path.read_text(errors="replace"):  # ray.init has started the raylet
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        out = log_path.read_text(errors="replace")
        assert "seqrec serving at" not in out, "the service came up before the SIGTERM: the test missed its window"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, log_path.read_text()[-3000:]
        deadline = time.monotonic() + 60
        while process_group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not process_group_alive(proc.pid), "a process the server started outlived its SIGTERM"
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # our own process group, by its leader's PID
        except ProcessLookupError:
            pass

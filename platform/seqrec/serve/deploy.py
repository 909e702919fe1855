"""Serve configs (the `serve deploy` format) and deploying them from Python.

Every deploy goes through a config, the way `serve deploy` does, never `serve.run(app)`: Serve gives a
config's application a code version derived from (import_path, args, runtime_env), so a redeploy that only
changes the Recommender's `user_config` (a model swap) or replica counts reconfigures the running replicas
in place. `serve.run(app)` from Python gets a fresh code version every time and rolls every deployment,
which with one replica per deployment stops the old replica while requests are still in flight.

`deploy_config` calls the Serve controller the way the dashboard's `PUT /api/serve/applications/` does
(`ServeControllerClient.deploy_apps`), so it needs no dashboard (tests, `ray.init` local instances).
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any

log = logging.getLogger(__name__)
APP_NAME = "seqrec"
MODEL_DEPLOYMENT = "Recommender"  # score_all models (SASRec, Bert4Rec, Flare)
GENERATOR_DEPLOYMENT = "Generator"  # generative models (CALRec)
INGRESS_DEPLOYMENT = "Ingress"  # score_all models with score_in_ingress
MODEL_DEPLOYMENTS = (MODEL_DEPLOYMENT, GENERATOR_DEPLOYMENT, INGRESS_DEPLOYMENT)


def model_deployment(checkpoint: str, score_in_ingress: bool = False) -> str:
    """The deployment whose user_config names the model: Generator for CALRec, Ingress for score_all models
    ranked in the ingress, else Recommender."""
    from seqrec.serve.config import is_generative

    if is_generative(checkpoint):
        return GENERATOR_DEPLOYMENT
    return INGRESS_DEPLOYMENT if score_in_ingress else MODEL_DEPLOYMENT


def serve_config(settings: dict[str, Any], host: str = "127.0.0.1", port: int = 8000) -> dict[str, Any]:
    """A ServeDeploySchema dict for `settings` with absolute, validated model/catalog paths."""
    from seqrec.serve.config import resolve_source, settings_from_dict

    parsed = settings_from_dict(settings)
    source = resolve_source(parsed.model)
    args = copy.deepcopy(settings)
    args["model"] = {"checkpoint": source.checkpoint, "dataset": source.dataset}
    # per-request access log lines (proxy + every replica hop) cost more CPU than ranking on a small machine
    logging = {"enable_access_log": bool(settings.get("access_log", False))}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": int(port)},  # loopback unless asked otherwise
        "logging_config": logging,
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": "seqrec.serve.app:build_app", "args": args,
            "logging_config": logging,
            # the model is this deployment's user_config: changing only this block swaps it in place
            "deployments": [{"name": model_deployment(source.checkpoint, parsed.score_in_ingress),
                             "user_config": dict(args["model"])}],
        }],
    }


def _app(config: dict[str, Any]) -> dict[str, Any]:
    for app in config.get("applications", []):
        if app.get("name") == APP_NAME:
            return app
    raise ValueError(f"config has no application named {APP_NAME!r}")


def deployment_override(config: dict[str, Any], name: str) -> dict[str, Any]:
    app = _app(config)
    for d in app.setdefault("deployments", []):
        if d.get("name") == name:
            return d
    d = {"name": name}
    app["deployments"].append(d)
    return d


def served_model(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(deployment name, its user_config {"checkpoint", "dataset"}) of the model a config serves."""
    app = _app(config)
    for d in app.get("deployments", []):
        if d.get("name") in MODEL_DEPLOYMENTS and (d.get("user_config") or {}).get("checkpoint"):
            return d["name"], dict(d["user_config"])
    current = dict(app["args"]["model"])
    return model_deployment(current["checkpoint"], bool(app["args"].get("score_in_ingress"))), current


def with_model(config: dict[str, Any], checkpoint: str | None = None, best_record: str | None = None,
               records_dir: str = "runs/tune", dataset: str | None = None) -> dict[str, Any]:
    """A copy of `config` whose Recommender serves another checkpoint of the same catalog (validated)."""
    from seqrec.serve.config import ModelSource, resolve_source

    config = copy.deepcopy(config)
    kind, current = served_model(config)
    rec = deployment_override(config, kind)
    source = resolve_source(ModelSource(checkpoint=checkpoint, best_record=best_record, records_dir=records_dir,
                                        dataset=dataset or current.get("dataset")))
    if source.dataset != current.get("dataset"):
        raise ValueError(f"a swap keeps the catalog: {source.dataset} is not the served {current.get('dataset')}")
    wanted = model_deployment(source.checkpoint, kind == INGRESS_DEPLOYMENT)
    if wanted != kind:
        raise ValueError(f"{source.checkpoint} is served by the {wanted} deployment, the running model by {kind}: "
                         "deploy a new config (`seqrec serve config`) instead of a swap")
    rec["user_config"] = {"checkpoint": source.checkpoint, "dataset": source.dataset}
    return config


def deploy_config(config: dict[str, Any], timeout_s: float = 300.0, unhealthy_grace_s: float = 60.0) -> None:
    """Apply a Serve config on the connected Ray cluster and wait until the app is RUNNING."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema)
    time.sleep(0.5)  # let the controller move the app out of its previous RUNNING state
    deadline = time.monotonic() + timeout_s
    unhealthy_since = None
    while True:
        from ray import serve

        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == ApplicationStatus.RUNNING and all(
                d.status == "HEALTHY" for d in status.deployments.values()):
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"deploying {APP_NAME} failed: {status.message}")
        if status is not None and status.status == ApplicationStatus.UNHEALTHY:
            # transient while Serve replaces a replica that died (e.g. right after a kill); fail if it stays
            unhealthy_since = unhealthy_since or time.monotonic()
            if time.monotonic() - unhealthy_since > unhealthy_grace_s:
                raise RuntimeError(f"deploying {APP_NAME} failed: {status.message}")
        else:
            unhealthy_since = None
        if time.monotonic() > deadline:
            raise TimeoutError(f"{APP_NAME} not running after {timeout_s:.0f}s: {status}")
        time.sleep(0.2)

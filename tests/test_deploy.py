"""deploy/: the Kubernetes manifests, checked offline, and a real Prometheus scraping a real server.

* every kustomize overlay renders (``kubectl kustomize``) and each object validates against the
  Kubernetes 1.32 OpenAPI schemas (``kubernetes-validate``, strict: unknown fields fail); KubeRay's
  RayService has no schema there, so its pod templates are validated as core ``PodTemplate`` objects;
* the manifests wire the server as it is: the container's args parse with ``serve``'s own parser,
  the probes hit routes the app has, the scrape annotations name the container's port;
* ``checkov`` (its own virtual environment, see .ci/run) finds nothing: every check passes or is
  skipped with a written reason on the resource (checkov gives no severities offline, so this is
  stricter than "no high-severity finding");
* Debian's ``prometheus`` scrapes ``serve`` on loopback every second; a query for
  ``llamacpp:tokens_predicted_total`` returns exactly the completion tokens the requests were told
  about, and every query of the Grafana dashboard evaluates.

Tools missing on a developer's machine skip; under CI=true they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import need_module  # noqa: E402

yaml = need_module("yaml")
httpx = need_module("httpx")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
OVERLAYS = ("pi", "amd64", "ray")
K8S_VERSION = "1.32"
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _need_tool(name: str, env: str | None = None) -> str:
    path = os.environ.get(env) if env else None
    path = path or shutil.which(name)
    if not path:
        msg = f"{name} not found (on PATH{' or $' + env if env else ''}); .ci/run installs it"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _render(overlay: str) -> list:
    kubectl = _need_tool("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(KUSTOMIZE / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _ray_pod_templates(doc: dict) -> list:
    """(group name, pod template) of a RayService's head and worker groups."""
    rc = doc["spec"]["rayClusterConfig"]
    return [("head", rc["headGroupSpec"]["template"])] + [(g["groupName"], g["template"])
                                                          for g in rc["workerGroupSpecs"]]


@pytest.fixture(scope="module")
def rendered() -> dict:
    return {o: _render(o) for o in OVERLAYS}


def _by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


# --- schemas ------------------------------------------------------------------------------------

def test_manifests_validate_against_kubernetes_schemas(rendered):
    kv = need_module("kubernetes_validate")
    kinds = set()
    for overlay, docs in rendered.items():
        for doc in docs:
            kinds.add(doc["kind"])
            if doc["apiVersion"].startswith("ray.io/"):
                with pytest.raises(kv.SchemaNotFoundError):
                    kv.validate(doc, K8S_VERSION, strict=True)
                for name, tpl in _ray_pod_templates(doc):
                    kv.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                 "metadata": {"name": f"{doc['metadata']['name']}-{name}"}, "template": tpl},
                                K8S_VERSION, strict=True)
                continue
            kv.validate(doc, K8S_VERSION, strict=True)
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Service", "StatefulSet", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "NetworkPolicy", "RayService"} <= kinds
    # the validator is live: a misspelled field and a wrong type are caught
    sts = json.loads(json.dumps(_by_kind(rendered["pi"], "StatefulSet")[0]))
    sts["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, K8S_VERSION, strict=True)
    sts = json.loads(json.dumps(_by_kind(rendered["pi"], "StatefulSet")[0]))
    sts["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, K8S_VERSION, strict=True)


def _expand(args, env: dict) -> list:
    """Kubernetes' $(VAR) expansion in command args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def test_manifests_wire_the_server(rendered):
    from tinyinfer.server import build_parser
    from tinyinfer.server.app import create_app
    from tinyinfer.server.config import ServerConfig

    app = create_app(ServerConfig(model_path="unused.gguf"))
    routes = {getattr(r, "path", None) for r in app.routes}
    for overlay in ("pi", "amd64"):
        docs = rendered[overlay]
        cm = _by_kind(docs, "ConfigMap")[0]
        sts = _by_kind(docs, "StatefulSet")[0]
        pod = sts["spec"]["template"]
        (server,) = pod["spec"]["containers"]
        (init,) = pod["spec"]["initContainers"]
        # the ConfigMap the pod reads is the generated one (its name carries kustomize's hash)
        assert server["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
        env = dict(cm["data"])
        assert server["command"] == ["python", "-m", "tinyinfer", "serve"]
        a = build_parser().parse_args(_expand(server["args"], env))
        assert a.model == "/models/" + env["MODEL_FILE"] and a.host == "0.0.0.0"
        assert a.threads == int(env["THREADS"]) and a.parallel == int(env["PARALLEL"])
        # the init step fetches the model the server is told to load
        from tinyinfer.fetch import SOURCES
        assert init["command"][-1] == "fetch" and _expand(init["args"], env) == [env["MODEL_NAME"]]
        assert SOURCES[env["MODEL_NAME"]].name == env["MODEL_FILE"]
        assert {"name": "TINYINFER_CACHE", "value": "/models"} in init["env"]
        # probes: readiness on /health (503 while loading), liveness and startup on a route that
        # answers while loading; both exist in the app
        port = server["ports"][0]
        assert server["readinessProbe"]["httpGet"]["path"] == "/health"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert server[probe]["httpGet"]["path"] in routes
            assert server[probe]["httpGet"]["port"] == port["name"]
        ann = pod["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == port["containerPort"]
        assert ann["prometheus.io/path"] in routes
        # a Pi-sized pod, scheduled on the architecture the overlay names
        res = server["resources"]
        assert res["limits"]["cpu"] == res["requests"]["cpu"] == env["THREADS"]
        arch = pod["spec"]["nodeSelector"]["kubernetes.io/arch"]
        assert arch == ("arm64" if overlay == "pi" else "amd64")
        # the HPA scales this StatefulSet on the queue-depth metric the adapter rule serves
        hpa = _by_kind(docs, "HorizontalPodAutoscaler")[0]
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                 "name": sts["metadata"]["name"]}
        rules = yaml.safe_load((DEPLOY / "prometheus" / "adapter-rules.yaml").read_text())["rules"]["custom"]
        served = {r["name"]["as"]: r["seriesQuery"].split("{")[0] for r in rules}
        assert served[hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]] == "llamacpp:requests_deferred"
    ray = _by_kind(rendered["ray"], "RayService")[0]
    serve_cfg = yaml.safe_load(ray["spec"]["serveConfigV2"])
    (appcfg,) = serve_cfg["applications"]
    module, _, attr = appcfg["import_path"].partition(":")
    import importlib
    builder = getattr(importlib.import_module(module), attr)
    from tinyinfer.ray_serve import RayServeOptions, app as ray_app
    assert builder is ray_app
    opts = RayServeOptions.from_args(appcfg["args"])        # the args the builder gets are all known
    assert opts.replicas * opts.threads <= sum(int(g["rayStartParams"]["num-cpus"]) * g["replicas"]
                                               for g in ray["spec"]["rayClusterConfig"]["workerGroupSpecs"])


def test_checkov_finds_nothing_unexplained(rendered, tmp_path):
    checkov = _need_tool("checkov", "TINYINFER_CHECKOV")
    for overlay, docs in rendered.items():
        ray = _by_kind(docs, "RayService")
        # checkov knows no RayService: its pod templates are scanned as the Pods KubeRay makes of them
        pods = [{"apiVersion": "v1", "kind": "Pod",
                 "metadata": dict(tpl.get("metadata", {}), name=f"ray-{name}", namespace="tinyinfer"),
                 "spec": tpl["spec"]} for d in ray for name, tpl in _ray_pod_templates(d)]
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(docs + pods))
    shutil.copy(DEPLOY / "Containerfile", tmp_path / "Dockerfile")
    out = subprocess.run([checkov, "-d", str(tmp_path), "--framework", "kubernetes", "dockerfile",
                          "--skip-download", "-o", "json"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false"))
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, out.stdout[:2000] + out.stderr[-2000:]
    failed = [(c["check_id"], c["resource"], c["file_path"]) for r in reports for c in r["results"]["failed_checks"]]
    assert failed == []
    assert by_type["kubernetes"]["summary"]["passed"] > 100 and by_type["dockerfile"]["summary"]["passed"] > 10
    skipped = [c for r in reports for c in r["results"]["skipped_checks"]]
    for c in skipped:
        reason = (c.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 20, f"{c['check_id']} on {c['resource']} is skipped without a reason"
    # the explained ones (deploy/README.md): image digests pinned at release; KubeRay's own probes and
    # Ray's writable root
    assert {c["check_id"] for c in skipped} == {"CKV_K8S_43", "CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_22"}


# --- Prometheus, for real -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def prometheus_and_server(smollm2_path, tmp_path_factory):
    from test_server import KEY, _free_port, _start_server, _stop
    prom = _need_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    srv = _start_server(smollm2_path, tmp)
    port = _free_port()
    cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
           "scrape_configs": [{"job_name": "tinyinfer", "authorization": {"credentials": KEY},
                               "static_configs": [{"targets": [f"127.0.0.1:{srv.port}"]}]}]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen([prom, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < 60, "prometheus not ready after 60 s"
            time.sleep(0.2)
        yield url, srv
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        _stop(srv.proc)


def _query(url: str, expr: str) -> list:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_prometheus_scrapes_the_server(prometheus_and_server):
    url, srv = prometheus_and_server
    sent = 0
    for i, max_tokens in enumerate((5, 9, 3)):
        r = srv.post("/v1/completions", {"prompt": f"Count to ten: {i}", "max_tokens": max_tokens, "temperature": 0})
        assert r.status_code == 200, r.text
        sent += r.json()["usage"]["completion_tokens"]
    assert 0 < sent <= 17
    t0 = time.monotonic()
    while True:
        res = _query(url, "llamacpp:tokens_predicted_total")
        value = float(res[0]["value"][1]) if res else None
        if value == sent:
            break
        assert time.monotonic() - t0 < 60, f"prometheus has {value} after 60 s, the server was sent {sent}"
        time.sleep(0.5)
    assert res[0]["metric"]["job"] == "tinyinfer" and res[0]["metric"]["instance"] == f"127.0.0.1:{srv.port}"
    up = _query(url, 'up{job="tinyinfer"}')
    assert [float(x["value"][1]) for x in up] == [1.0]


def test_grafana_dashboard_queries_evaluate(prometheus_and_server):
    url, srv = prometheus_and_server
    dash = json.loads((DEPLOY / "grafana" / "tinyinfer-dashboard.json").read_text())
    exported = {line.split("{")[0].split(" ")[0] for line in srv.get("/metrics").text.splitlines()
                if line and not line.startswith("#")}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    for expr in exprs:
        names = set(re.findall(r"\b((?:llamacpp:|tinyinfer_|process_)[a-z_:]+)", expr))
        assert names, expr
        for name in names:     # a histogram's _bucket series are exported as such
            assert name in exported, f"{name} (dashboard) is not exported by /metrics"
        _query(url, expr.replace("$__rate_interval", "1m").replace("$__range", "5m"))
    # the generation panel sees the tokens the previous test generated
    total = _query(url, "sum(llamacpp:tokens_predicted_total)")
    assert float(total[0]["value"][1]) > 0

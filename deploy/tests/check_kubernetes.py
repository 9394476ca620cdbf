"""Checks deploy/kubernetes/.

    python3 check_kubernetes.py BINARY

- every Kubernetes manifest against the Kubernetes schemas (kubernetes-validate,
  strict: unknown fields fail) of an older and the newest version it ships;
- the KEDA ScaledObject against schemas/scaledobject.json (KEDA's CRD is not
  among the Kubernetes schemas);
- each kustomization lists exactly the manifests beside it;
- the pieces fit together: Service, StatefulSet and probes, the workers'
  broker endpoint, grace periods, the ConfigMap's job file (`jobz check`),
  the container arguments (`jobz SUBCOMMAND --help`), the ScaledObject's
  target and metric.
"""

import json
import sys
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from checks import Checks, check_flags, run

KUBERNETES = Path(__file__).resolve().parents[1] / "kubernetes"
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
# The worker's own kill grace after --grace (worker/src/limits.rs).
KILL_GRACE_SECONDS = 10


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def seconds(duration):
    units = {"s": 1, "m": 60, "h": 3600}
    return int(duration[:-1]) * units[duration[-1]]


def flag_value(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def pod_spec(resource):
    spec = resource["spec"]
    if resource["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    return spec["template"]["spec"]


def main():
    binary = sys.argv[1]
    checks = Checks()
    manifests = {}  # file name -> documents
    for kustomization in sorted(KUBERNETES.rglob("kustomization.yaml")):
        folder = kustomization.parent
        listed = load_all(kustomization)[0].get("resources", [])
        files = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
        local = sorted(r for r in listed if not r.startswith(".."))
        checks.check(
            f"{kustomization.relative_to(KUBERNETES.parent)} lists every manifest beside it",
            local == files and all((folder / r).exists() for r in listed),
            f"lists {listed}, folder has {files}",
        )
        for name in files:
            manifests[str((folder / name).relative_to(KUBERNETES))] = load_all(folder / name)

    resources = {}  # (kind, name) -> resource
    for name, documents in sorted(manifests.items()):
        for resource in documents:
            kind, meta = resource.get("kind"), resource.get("metadata", {})
            resources[(kind, meta.get("name"))] = resource
            label = f"{name}: {kind} {meta.get('name')}"
            checks.check(f"{label} is namespace-agnostic", "namespace" not in meta, "sets metadata.namespace")
            if resource.get("apiVersion", "").startswith("keda.sh/"):
                continue
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(resource, version, strict=True)
                    error = ""
                except Exception as e:  # ValidationError, SchemaNotFoundError, ...
                    error = str(e).splitlines()[0] if str(e) else type(e).__name__
                    path = getattr(e, "path", None)
                    if path:
                        error += f" (at {'.'.join(str(p) for p in path)})"
                checks.check(f"{label} valid for Kubernetes {version} (strict)", not error, error)

    schema = json.loads((KUBERNETES / "schemas" / "scaledobject.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    scaled = [r for r in resources.values() if r.get("kind") == "ScaledObject"]
    checks.check("a KEDA ScaledObject exists", len(scaled) == 1, f"found {len(scaled)}")
    for resource in scaled:
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(resource), key=str)
        checks.check(
            f"ScaledObject {resource['metadata']['name']} matches schemas/scaledobject.json",
            not errors,
            "; ".join(f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors),
        )

    broker_service = resources.get(("Service", "jobz-broker"))
    broker = resources.get(("StatefulSet", "jobz-broker"))
    workers = resources.get(("Deployment", "jobz-worker"))
    batch = resources.get(("CronJob", "jobz-worker-batch"))
    config = resources.get(("ConfigMap", "jobz-config"))
    for label, thing in [
        ("Service jobz-broker", broker_service),
        ("StatefulSet jobz-broker", broker),
        ("Deployment jobz-worker", workers),
        ("CronJob jobz-worker-batch", batch),
        ("ConfigMap jobz-config", config),
    ]:
        checks.check(f"{label} exists", thing is not None, "missing")
    if None in (broker_service, broker, workers, batch, config):
        checks.finish()

    # The job file in the ConfigMap is one jobz accepts.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(config["data"]["jobz.yaml"])
        f.flush()
        code, out = run([binary, "check", "--config", f.name])
    checks.check("ConfigMap jobz-config: jobz check accepts jobz.yaml", code == 0, out)

    # Broker: one replica, its Service, probes, volume, arguments, sandbox.
    spec = broker["spec"]
    pod = pod_spec(broker)
    container = pod["containers"][0]
    args = container["args"]
    checks.check("broker: one replica", spec.get("replicas") == 1, f"replicas {spec.get('replicas')}")
    checks.check("broker: serviceName is its Service", spec["serviceName"] == "jobz-broker", spec["serviceName"])
    labels = spec["template"]["metadata"]["labels"]
    selector = broker_service["spec"]["selector"]
    checks.check(
        "broker: the Service selects its pods",
        all(labels.get(k) == v for k, v in selector.items()) and spec["selector"]["matchLabels"].items() <= labels.items(),
        f"selector {selector}, pod labels {labels}",
    )
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service_ports = {p["name"]: p for p in broker_service["spec"]["ports"]}
    checks.check(
        "broker: Service ports http 6769 and zmq 6770 reach the container",
        ports == {"http": 6769, "zmq": 6770}
        and {n: (p["port"], p["targetPort"]) for n, p in service_ports.items()}
        == {"http": (6769, "http"), "zmq": (6770, "zmq")},
        f"container {ports}, service {service_ports}",
    )
    checks.check(
        "broker: args",
        args[0] == "broker"
        and flag_value(args, "--http") == "0.0.0.0:6769"
        and flag_value(args, "--bind") == "tcp://0.0.0.0:6770"
        and flag_value(args, "--data") == "/var/lib/jobz"
        and flag_value(args, "--config") == "/etc/jobz/jobz.yaml",
        f"got {args}",
    )
    check_flags(checks, "broker: flags exist in the binary", binary, "broker", args[1:])
    for probe in ("readinessProbe", "livenessProbe"):
        get = container.get(probe, {}).get("httpGet", {})
        checks.check(f"broker: {probe} on /healthz", get.get("path") == "/healthz" and get.get("port") in ("http", 6769), f"got {get}")
    claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    checks.check("broker: /var/lib/jobz on a claimed volume", mounts.get("data") == "/var/lib/jobz" and "data" in claims, f"mounts {mounts}, claims {claims}")
    checks.check("broker: resources", "requests" in container.get("resources", {}), "no requests")
    annotations = spec["template"]["metadata"].get("annotations", {})
    checks.check(
        "broker: Prometheus scrape annotations on /metrics",
        annotations.get("prometheus.io/scrape") == "true"
        and annotations.get("prometheus.io/port") == str(ports.get("http"))
        and annotations.get("prometheus.io/path") == "/metrics",
        f"got {annotations}",
    )

    endpoint = f"tcp://{broker_service['metadata']['name']}:{service_ports['zmq']['port']}"
    for label, resource in [("workers", workers), ("worker CronJob", batch), ("broker", broker)]:
        pod = pod_spec(resource)
        container = pod["containers"][0]
        context = container.get("securityContext", {})
        checks.check(
            f"{label}: non-root, read-only root, no privilege escalation, all capabilities dropped",
            pod.get("securityContext", {}).get("runAsNonRoot") is True
            and context.get("readOnlyRootFilesystem") is True
            and context.get("allowPrivilegeEscalation") is False
            and context.get("capabilities", {}).get("drop") == ["ALL"],
            f"pod {pod.get('securityContext')}, container {context}",
        )
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        checks.check(
            f"{label}: the job file comes from ConfigMap jobz-config",
            volumes.get("config", {}).get("configMap", {}).get("name") == "jobz-config"
            and {m["name"]: m["mountPath"] for m in container["volumeMounts"]}.get("config") == "/etc/jobz",
            f"volumes {volumes}",
        )
        if resource is broker:
            continue
        args = container["args"]
        checks.check(f"{label}: connects to the broker Service ({endpoint})", args[0] == "worker" and flag_value(args, "--broker") == endpoint, f"got {args}")
        check_flags(checks, f"{label}: flags exist in the binary", binary, "worker", args[1:])
        grace = seconds(flag_value(args, "--grace") or "30s")
        period = pod.get("terminationGracePeriodSeconds", 30)
        checks.check(
            f"{label}: terminationGracePeriodSeconds ({period}) above --grace + kill grace ({grace + KILL_GRACE_SECONDS})",
            period > grace + KILL_GRACE_SECONDS,
            "the kubelet would kill jobs before the worker hands them back",
        )
    checks.check("worker CronJob: --exit-when-idle", flag_value(pod_spec(batch)["containers"][0]["args"], "--exit-when-idle") is not None, "missing")

    for resource in scaled:
        target = resource["spec"]["scaleTargetRef"]
        checks.check(
            "ScaledObject scales Deployment jobz-worker",
            target.get("kind", "Deployment") == "Deployment" and target["name"] == workers["metadata"]["name"],
            f"got {target}",
        )
        queries = [t["metadata"].get("query", "") for t in resource["spec"]["triggers"] if t["type"] == "prometheus"]
        checks.check("ScaledObject: a prometheus trigger on jobz_queue_depth", any("jobz_queue_depth" in q for q in queries), f"got {queries}")
        concurrency = flag_value(workers["spec"]["template"]["spec"]["containers"][0]["args"], "--concurrency")
        thresholds = [t["metadata"].get("threshold") for t in resource["spec"]["triggers"]]
        checks.check("ScaledObject: threshold is a worker's --concurrency", thresholds == [concurrency], f"{thresholds} vs {concurrency}")

    checks.finish()


if __name__ == "__main__":
    main()

"""deploy/kubetail-agent.yaml and Dockerfile.distroless agree with the agent they ship.

tox -e image checks the manifests against the Kubernetes schemas and lints the Dockerfile; this
checks what no schema knows: the DaemonSet runs the image's command, its ConfigMap is a config
this agent accepts, and its health probe, word for word, gets SERVING from an agent started
from that config with the projected /etc/kubetail layout (mTLS, auth-mode identity).
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import subprocess
import sys

import yaml

from conftest import REPO, AgentProcess, Pki, issue
from kubetail_agent import __version__

MANIFEST = REPO / "deploy" / "kubetail-agent.yaml"
DOCKERFILE = REPO / "Dockerfile.distroless"
ETC = "/etc/kubetail"


@functools.cache
def manifests() -> dict[str, dict]:
    docs = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return by_kind


def agent_container() -> dict:
    (container,) = manifests()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return container


@functools.cache
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def dockerfile_exec_form(instruction: str) -> list[str]:
    """The JSON array of the final stage's ENTRYPOINT or CMD."""
    final_stage = dockerfile().rsplit("\nFROM ", 1)[1]
    (line,) = re.findall(rf"^{instruction} (\[.*\])$", final_stage, re.M)
    return json.loads(line)


def test_daemonset_runs_the_image_as_built() -> None:
    container = agent_container()
    assert container["args"] == dockerfile_exec_form("CMD") == ["serve", "--config", f"{ETC}/config.yaml"]
    entrypoint = dockerfile_exec_form("ENTRYPOINT")
    assert entrypoint[0] == "/usr/bin/python3"  # distroless has no shell and no /usr/bin/env
    launcher = entrypoint[-1]
    # The probe binary the DaemonSet execs is the image's link to the agent's launcher.
    probe = container["readinessProbe"]["exec"]["command"]
    assert container["livenessProbe"]["exec"]["command"] == probe
    assert probe[0] == "/bin/grpc_health_probe"
    assert f"ln -s {launcher} /rootfs/bin/grpc_health_probe" in dockerfile()
    assert container["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"}]
    assert "EXPOSE 50051" in dockerfile()
    # One version everywhere: the module's, the image label's default, the manifest's image tag.
    assert f"ARG VERSION={__version__}\n" in dockerfile()
    assert container["image"].endswith(f":{__version__}")


def test_daemonset_reads_host_logs_read_only_with_one_capability() -> None:
    pod = manifests()["DaemonSet"]["spec"]["template"]["spec"]
    container = agent_container()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/var/log", "/var/lib/docker/containers"):
        assert mounts[path]["readOnly"] is True
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    assert mounts[ETC]["readOnly"] is True and "projected" in volumes[mounts[ETC]["name"]]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["DAC_READ_SEARCH"]}
    # An added capability survives exec only for uid 0 (no ambient capabilities in Kubernetes).
    assert security["runAsUser"] == 0
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod["serviceAccountName"] == manifests()["ServiceAccount"]["metadata"]["name"]
    assert manifests()["ClusterRole"]["rules"] == [
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}]


def projected_files() -> dict[str, tuple[str, str]]:
    """path under /etc/kubetail -> (ConfigMap or Secret name, key)."""
    pod = manifests()["DaemonSet"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "projected" in v]
    files = {}
    for source in volume["projected"]["sources"]:
        (kind, ref), = source.items()
        for item in ref["items"]:
            files[item["path"]] = (ref["name"], item["key"])
    return files


def test_config_and_probe_of_the_daemonset_work_against_the_agent(tmp_path: pathlib.Path, pki: Pki) -> None:
    """The ConfigMap's config.yaml, laid out as the projected volume does (with the Secret's
    tls.crt/tls.key/ca.crt), starts an agent without a warning, and the DaemonSet's probe
    command gets SERVING from it."""
    config_map = manifests()["ConfigMap"]
    files = projected_files()
    assert files["config.yaml"] == (config_map["metadata"]["name"], "config.yaml")
    etc = tmp_path / "etc-kubetail"
    etc.mkdir()
    config_text = config_map["data"]["config.yaml"]
    # Every file the config names must come from the projected volume.
    for referenced in re.findall(rf"{ETC}/([\w.-]+)", config_text):
        assert referenced in files, f"{referenced} is not projected into {ETC}"
    assert re.search(r"^addr: :50051$", config_text, re.M)
    (etc / "config.yaml").write_text(config_text.replace(ETC, str(etc)).replace("addr: :50051", "addr: :0"))
    # The Secret's certificate: one certificate the server presents and the probe presents back.
    agent_cert = issue(pki.ca, "kubetail-cluster-agent", server=True, client_too=True)
    (etc / "tls.crt").write_bytes(agent_cert.cert_pem)
    (etc / "tls.key").write_bytes(agent_cert.key_pem)
    (etc / "ca.crt").write_bytes(pki.ca.cert_pem)
    kubeconfig = tmp_path / "kubeconfig"  # identity mode's credentials; never asked for a health check
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))

    args = [arg.replace(ETC, str(etc)) for arg in agent_container()["args"]]
    agent = AgentProcess(args, env={"NODE_NAME": "node-1", "KUBECONFIG": str(kubeconfig)})
    try:
        port = agent.wait_serving()
        warnings = [e for e in agent.events() if e.get("level") in ("warn", "warning", "error")]
        assert warnings == [], warnings
        probe = agent_container()["readinessProbe"]["exec"]["command"]
        flags = [arg.replace(ETC, str(etc)).replace("-addr=:50051", f"-addr=:{port}") for arg in probe[1:]]
        result = subprocess.run([sys.executable, "-m", "kubetail_agent", "probe", *flags],
                                capture_output=True, text=True, timeout=30, cwd=REPO)
        assert result.returncode == 0, result
        assert "SERVING" in result.stdout + result.stderr
        assert agent.stop() == 0
    finally:
        agent.kill()

"""The deployment files, checked without running them: Kubernetes schemas (kubernetes-validate --strict on
what `kubectl kustomize` renders), the Compose spec, and agreement between compose, the manifests and
the CLI on flags, env names, ports and probe paths. tests/deploy/test_deploy_stack.py runs the compose
stack."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from router.config import RouterSettings
from shard.settings import ShardSettings
from sluice.cli import build_parser
from sluice.options import env_names, options

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "gpu"]
EXAMPLES = sorted((K8S / "examples").glob("*.yaml"))
# Set by the image (deploy/Dockerfile) or read by libraries, not by our CLI.
OTHER_ENV = {"HF_HOME", "PYTHONUNBUFFERED", "LOG_LEVEL"}


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"{name} is not installed (scripts/test.sh installs it)"
    return path


def render(kustomization: Path) -> list[dict]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(kustomization)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def all_manifests() -> list[dict]:
    docs = [d for k in KUSTOMIZATIONS for d in render(k)]
    return docs + [d for f in EXAMPLES for d in yaml.safe_load_all(f.read_text()) if d]


def env_names_read() -> set[str]:
    """Every environment variable our code reads: the settings tables (flag defaults), and the health
    probe's, the tensor-parallel ranks' and the conversion cache's (SLUICE_CACHE) own reads."""
    names = env_names(RouterSettings, ShardSettings)
    for f in ("sluice/cli.py", "sluice/health.py", "shard/launch.py", "sluice/modelfiles.py"):
        src = (ROOT / f).read_text()
        names |= set(re.findall(r'(?:environ\.get|_env_int)\(\s*"(\w+)"', src))
        names |= set(re.findall(r'environ\["(\w+)"\]', src))
    return names


def routes() -> set[str]:
    from router.app import ENDPOINTS

    return {e.path for e in ENDPOINTS}


def parses(argv: list[str]) -> object:
    """The CLI accepts argv (argparse exits on an unknown flag)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"sluice rejects {argv}")


def check_shard_bind(argv: list[str], address: str) -> None:
    """A shard bound beyond loopback needs --allow-remote once the CLI has that flag (the reliability work)."""
    args = parses(argv)
    if hasattr(args, "allow_remote") and not address.startswith(("127.", "localhost", "[::1]", "unix:")):
        assert args.allow_remote, f"{argv} binds {address} without --allow-remote"


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_manifests_validate_strict(kustomization, tmp_path):
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(render(kustomization)))
    out = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", str(rendered), *map(str, EXAMPLES)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_file_matches_the_compose_spec():
    out = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                          str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_agrees_with_the_cli():
    services = compose()["services"]
    known_env = env_names_read() | OTHER_ENV
    for name, svc in services.items():
        assert set(svc["environment"]) <= known_env, f"{name}: env the CLI never reads"
        assert parses(svc["command"]).command == name
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "sluice", "health"] and parses(test[2:])
    check_shard_bind(services["shard"]["command"], services["shard"]["environment"]["SHARD_ADDRESS"])
    shard_port = services["shard"]["environment"]["SHARD_ADDRESS"].rpartition(":")[2]
    assert services["shard"]["expose"] == [shard_port]
    assert "ports" not in services["shard"], "the shard must not be published"
    router = parses(services["router"]["command"])
    assert router.shard_address == [f"dns:///shard:{shard_port}"]
    port = services["router"]["environment"]["PORT"]
    assert services["router"]["ports"][0].endswith(f":{port}")
    assert services["router"]["healthcheck"]["test"][-1] == f"http://127.0.0.1:{port}/health"
    assert services["router"]["depends_on"]["shard"]["condition"] == "service_healthy"


def containers(docs: list[dict]) -> list[tuple[dict, dict]]:
    return [(d, c) for d in docs if d["kind"] in ("Deployment", "StatefulSet")
            for c in d["spec"]["template"]["spec"]["containers"]]


def test_manifests_agree_with_the_cli():
    docs = all_manifests()
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    known_env, paths = env_names_read() | OTHER_ENV, routes()
    for workload, c in containers(docs):
        where = f"{workload['metadata']['name']}/{c['name']}"
        args = parses(c["args"])
        env = {e["name"] for e in c.get("env", [])}
        for source in c.get("envFrom", []):
            env |= set(config_maps[source["configMapRef"]["name"]])
        assert env <= known_env, f"{where}: env the CLI never reads: {env - known_env}"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = c.get(probe)
            if spec and "httpGet" in spec:
                assert spec["httpGet"]["path"] in paths, f"{where} {probe}"
                assert spec["httpGet"]["port"] in ports
            elif spec:
                command = spec["exec"]["command"]
                sluice = command if command[0] == "sluice" else command[-1].split("|| ")[-1].split()
                assert parses(sluice[1:]).command == "health", f"{where} {probe}"
        if args.command == "router":
            assert int(config_maps["sluice-router"]["PORT"]) == ports["http"]
            for address in args.shard_address:  # dns:///SERVICE:PORT names a headless shard Service
                service, port = address.removeprefix("dns:///").split(":")
                assert services[service]["spec"]["clusterIP"] == "None"
                assert int(port) in [p["port"] for p in services[service]["spec"]["ports"]]
        if args.command == "shard":
            address = config_maps.get("sluice-shard", {}).get("SHARD_ADDRESS") or next(
                e["value"] for e in c["env"] if e["name"] == "SHARD_ADDRESS")
            assert int(address.rpartition(":")[2]) == ports["grpc"]
            check_shard_bind(c["args"], address)
    for service in services.values():  # every Service targets a named port some container has
        names = {p["name"] for _, c in containers(docs) for p in c["ports"]}
        assert all(p.get("targetPort", p["name"]) in names for p in service["spec"]["ports"])


def test_tensor_parallel_example_sets_what_the_shard_reads():
    [tp] = [d for f in EXAMPLES for d in yaml.safe_load_all(f.read_text()) if d and d["kind"] == "StatefulSet"]
    env = {e["name"]: e for e in tp["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= set(env) <= env_names_read()
    assert int(env["WORLD_SIZE"]["value"]) == tp["spec"]["replicas"]
    assert env["MASTER_ADDR"]["value"] == f"{tp['metadata']['name']}-0.{tp['spec']['serviceName']}"
    assert tp["spec"]["podManagementPolicy"] == "Parallel"


def test_grafana_dashboard_queries_metrics_the_router_exports():
    from router.metrics import Metrics

    exported = {m.name for m in Metrics().registry.collect()}
    dashboard = (ROOT / "deploy" / "grafana-dashboard.json").read_text()
    used = set(re.findall(r"\b((?:tgi|sluice)_[a-z_]+)", dashboard))
    assert used
    base = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    assert base <= exported, base - exported


def test_compose_defaults_are_the_settings_defaults():
    """`X: ${X:-default}` in docker-compose.yml says what the CLI would use anyway, so unset means the same
    in compose as on the command line."""
    defaults = {opt.env: f.default for cls in (RouterSettings, ShardSettings) for f, opt in options(cls) if opt.env}
    for svc in compose()["services"].values():
        for name, value in svc["environment"].items():
            m = re.fullmatch(r"\$\{(\w+):-(.*)\}", str(value))
            if m and m.group(1) == name and m.group(2) and name in defaults:
                assert type(defaults[name])(m.group(2)) == defaults[name], f"compose {name}={m.group(2)}"

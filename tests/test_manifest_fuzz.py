"""The verifier never crashes, refuses any mutation of a valid bundle and 100 % of a forgery corpus.

(a) any input (random bytes, random JSON, random fields inside a validly signed bundle or bare envelope)
    gives either Verified or VerifyError, never another exception;
(b) every single change to a valid bundle (any byte, any field, key order, duplicate keys) is refused;
(c) a generated corpus of tampered files, forged envelopes and policy violations is refused, each with
    one line (no newline, under 200 characters) naming the expected reason.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from protocol.errors import VerifyError
from protocol.signing.bundle import KeyBinding, payload_of, sign_bundle
from protocol.signing.dsse import canonical_json, sign_envelope
from protocol.signing.keys import Identity
from protocol.signing.manifest import (
    SIGNATURE_FILE,
    AdapterMeta,
    Verified,
    sign_directory,
    verify_directory,
    verify_envelope,
)
from protocol.signing.trust import TrustPolicy

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_leaves,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


@dataclass
class Base:
    directory: Path
    envelope: bytes  # model.sig: the bundle
    statement: dict
    alice: Identity
    mallory: Identity
    other_envelope: bytes  # alice's signature over a different statement


def make_adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    save_file(
        {"layer.lora_A.weight": np.arange(16, dtype=np.float32).reshape(2, 8)},
        path / "adapter_model.safetensors",
    )
    (path / "adapter_config.json").write_text(
        '{"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M", "r": 2}'
    )
    (path / "README.md").write_text("# fuzz adapter\n")
    (path / "eval").mkdir()
    (path / "eval" / "curve.json").write_text("[0.1, 0.3, 0.5]")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    root = tmp_path_factory.mktemp("fuzz")
    alice, mallory = Identity.generate(), Identity.generate()
    directory = make_adapter(root / "adapter")
    meta = AdapterMeta(
        name="demo",
        version=3,
        license="Apache-2.0",
        eval={"accuracy_adapter": 0.5},
        contributors=[alice.public_hex],
        datasets=[{"cid": "Qm", "name": "gsm8k", "license": "MIT"}],
    )
    sign_directory(directory, meta, alice)
    other = make_adapter(root / "other")
    sign_directory(other, AdapterMeta(name="demo", version=4), alice)
    envelope = (directory / SIGNATURE_FILE).read_bytes()
    statement = json.loads(payload_of(json.loads(envelope)))
    return Base(directory, envelope, statement, alice, mallory, (other / SIGNATURE_FILE).read_bytes())


def pinned(base: Base, **kwargs: Any) -> TrustPolicy:
    return TrustPolicy(pins={"demo": base.alice.public_hex}, **kwargs)


def outcome(data: bytes, policy: TrustPolicy | None = None) -> Verified | str:
    """Verified, or the one-line refusal; any other exception fails the test (a crash)."""
    try:
        return verify_envelope(data, policy or TrustPolicy())
    except VerifyError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 200, message
        return message


def refused(data: bytes, policy: TrustPolicy | None = None) -> str:
    result = outcome(data, policy)
    assert isinstance(result, str), f"accepted a mutated envelope: {data[:120]!r}"
    return result


def paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, (*prefix, index))


def replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    out = copy.deepcopy(value)
    target = out
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return out


def signed_payload(statement: Any, identity: Identity) -> bytes:
    return canonical_json(sign_bundle(canonical_json(statement), identity))


DSSE = ("dsseEnvelope",)
PAYLOAD = (*DSSE, "payload")
SIG = (*DSSE, "signatures", 0, "sig")
HINT = ("verificationMaterial", "publicKey", "hint")


def test_valid_envelope_is_accepted(base: Base) -> None:
    assert isinstance(outcome(base.envelope), Verified)
    assert isinstance(verify_directory(base.directory, pinned(base), record=False), Verified)


# --- (a) nothing crashes the verifier -----------------------------------------------------------------------


@FAST
@given(st.binary(max_size=3000))
def test_random_bytes_never_crash(data: bytes) -> None:
    refused(data)


@FAST
@given(json_values)
def test_random_json_never_crashes(value: Any) -> None:
    outcome(json.dumps(value).encode())
    outcome(canonical_json(value))


@FAST
@given(st.text(alphabet='{}[]":,0123456789.eE+-truefalsnNI\\u \t', max_size=200))
def test_random_json_text_never_crashes(text: str) -> None:
    outcome(text.encode())


@FAST
@given(payload=json_values, payload_type=st.sampled_from(["application/vnd.in-toto+json", "text/plain", ""]))
def test_random_statement_in_a_validly_signed_envelope_never_crashes(
    base: Base, payload: Any, payload_type: str
) -> None:
    outcome(canonical_json(sign_envelope(canonical_json(payload), base.alice, payload_type)))
    outcome(canonical_json(sign_bundle(canonical_json(payload), base.alice)))


@FAST
@given(data=st.data(), value=json_values)
def test_random_field_in_a_validly_signed_statement_never_crashes(
    base: Base, data: st.DataObject, value: Any
) -> None:
    path = data.draw(st.sampled_from(list(paths(base.statement))))
    outcome(signed_payload(replaced(base.statement, path, value), base.alice))


# --- (b) every mutation of a valid envelope is refused ------------------------------------------------------


def test_every_byte_of_the_envelope_matters(base: Base) -> None:
    data = base.envelope
    for position in range(len(data)):
        for mask in (0x01, 0x20):
            refused(data[:position] + bytes([data[position] ^ mask]) + data[position + 1 :])


def test_every_byte_of_the_payload_and_signature_matters(base: Base) -> None:
    envelope = json.loads(base.envelope)
    payload = payload_of(envelope)
    for position in range(len(payload)):
        flipped = payload[:position] + bytes([payload[position] ^ 0x04]) + payload[position + 1 :]
        refused(canonical_json(replaced(envelope, PAYLOAD, base64.b64encode(flipped).decode())))
    sig = base64.b64decode(envelope["dsseEnvelope"]["signatures"][0]["sig"])
    for bit in range(len(sig) * 8):
        flipped = bytearray(sig)
        flipped[bit // 8] ^= 1 << (bit % 8)
        refused(canonical_json(replaced(envelope, SIG, base64.b64encode(flipped).decode())))


@FAST
@given(data=st.data(), value=json_values)
def test_any_changed_envelope_field_is_refused(base: Base, data: st.DataObject, value: Any) -> None:
    envelope = json.loads(base.envelope)
    path = data.draw(st.sampled_from(list(paths(envelope))))
    changed = replaced(envelope, path, value)
    if canonical_json(changed) != base.envelope:
        refused(canonical_json(changed))


@FAST
@given(data=st.data(), value=json_values)
def test_any_changed_statement_field_without_resigning_is_refused(
    base: Base, data: st.DataObject, value: Any
) -> None:
    envelope = json.loads(base.envelope)
    path = data.draw(st.sampled_from(list(paths(base.statement))))
    statement = replaced(base.statement, path, value)
    payload = canonical_json(statement)
    if payload != canonical_json(base.statement):
        refused(canonical_json(replaced(envelope, PAYLOAD, base64.b64encode(payload).decode())))


@FAST
@given(
    st.permutations(["dsseEnvelope", "mediaType", "verificationMaterial"]),
    st.permutations(["_type", "predicate", "predicateType", "subject"]),
)
def test_reordered_keys_are_refused(
    base: Base, envelope_order: list[str], statement_order: list[str]
) -> None:
    envelope = json.loads(base.envelope)
    text = json.dumps(
        {k: envelope[k] for k in envelope_order}, separators=(",", ":"), ensure_ascii=False
    ).encode()
    if text != base.envelope:
        refused(text)
    reordered = {k: base.statement[k] for k in statement_order}
    payload = json.dumps(reordered, separators=(",", ":"), ensure_ascii=False).encode()
    if payload != canonical_json(base.statement):  # validly signed by alice, but not canonical
        refused(canonical_json(sign_bundle(payload, base.alice)))


def test_duplicate_keys_whitespace_and_alternative_base64_are_refused(base: Base) -> None:
    envelope = json.loads(base.envelope)
    dsse = envelope["dsseEnvelope"]
    material = envelope["verificationMaterial"]
    values = {**envelope, **material, **material["publicKey"], **dsse, **dsse["signatures"][0]}
    text = base.envelope.decode()
    for key in ("dsseEnvelope", "mediaType", "verificationMaterial", "publicKey", "hint", "tlogEntries",
                "payload", "payloadType", "signatures", "keyid", "sig"):
        value = json.dumps(values[key])
        marker = f'"{key}":'
        at = text.index(marker)
        refused((text[:at] + f"{marker}{value}," + text[at:]).encode())
    for position in [i for i, c in enumerate(text) if c in "{}[],:"]:
        refused((text[:position] + " " + text[position:]).encode())
    refused(text.encode() + b"\n")
    raw = payload_of(envelope)
    for alternative in (
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        base64.b64encode(raw).decode() + "==",
    ):
        if alternative != dsse["payload"]:
            refused(canonical_json(replaced(envelope, PAYLOAD, alternative)))


# --- (c) a corpus of tampered, forged and disallowed adapters -----------------------------------------------


Case = tuple[str, str, Callable[[Path, Base], TrustPolicy | None], tuple[str, ...]]
TAMPERED = ("was modified after signing", "not a valid safetensors file")
ENVELOPE = ("model.sig", "signature check failed")
NO_KEY = "names no P-256 key"  # the key is found before anything else in the statement is read
FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "eval/curve.json"]


def _edit_file(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path, Base], None]:
    def run(directory: Path, base: Base) -> None:
        path = directory / name
        path.write_bytes(edit(path.read_bytes()))

    return run


def _flip(position: int, mask: int) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        at = {0: 0, 1: len(data) // 2, 2: len(data) - 1}[position]
        return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]

    return edit


def _write_sig(make: Callable[[Base], bytes]) -> Callable[[Path, Base], None]:
    def run(directory: Path, base: Base) -> None:
        (directory / SIGNATURE_FILE).write_bytes(make(base))

    return run


def _statement(
    change: Callable[[dict], None], signer: str = "alice", encode: Callable[[Any], bytes] = canonical_json
) -> Callable[[Path, Base], None]:
    def run(directory: Path, base: Base) -> None:
        statement = copy.deepcopy(base.statement)
        change(statement)
        identity = base.alice if signer == "alice" else base.mallory
        if signer != "alice":  # a forger vouches for her own P-256 key: what the pin then refuses
            statement["predicate"]["commons"]["signer"] = KeyBinding.of(identity).to_dict()
        (directory / SIGNATURE_FILE).write_bytes(canonical_json(sign_bundle(encode(statement), identity)))

    return run


def _unsigned_statement_change(change: Callable[[dict], None]) -> Callable[[Base], bytes]:
    def make(base: Base) -> bytes:
        statement = copy.deepcopy(base.statement)
        change(statement)
        envelope = json.loads(base.envelope)
        envelope["dsseEnvelope"]["payload"] = base64.b64encode(canonical_json(statement)).decode()
        return canonical_json(envelope)

    return make


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def change(statement: dict) -> None:
        target = statement
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return change


def _delete(path: tuple) -> Callable[[dict], None]:
    def change(statement: dict) -> None:
        target = statement
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]

    return change


def _rename_resource(name: str) -> Callable[[dict], None]:
    def change(statement: dict) -> None:
        statement["predicate"]["resources"][0]["name"] = name
        statement["predicate"]["commons"]["files"][0]["name"] = name

    return change


def _duplicate_resource(statement: dict) -> None:
    for key in ("resources", "files"):
        items = (
            statement["predicate"][key] if key == "resources" else statement["predicate"]["commons"]["files"]
        )
        items.insert(1, dict(items[0]))


def _policy(**kwargs: Any) -> Callable[[Path, Base], TrustPolicy]:
    return lambda directory, base: TrustPolicy(**{"pins": {"demo": base.alice.public_hex}, **kwargs})


def _disk(action: Callable[[Path], object]) -> Callable[[Path, Base], None]:
    def run(directory: Path, base: Base) -> None:
        action(directory)

    return run


def _zip_pickle(directory: Path) -> None:
    with zipfile.ZipFile(directory / "weights.zip", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": 1}))


def file_cases() -> list[Case]:
    cases: list[Case] = []
    for name in FILES:
        for position in range(3):
            for mask in (0x01, 0x80, 0xFF):
                cases.append(
                    (
                        "file",
                        f"flip {name}@{position}^{mask:#x}",
                        _edit_file(name, _flip(position, mask)),
                        TAMPERED,
                    )
                )
        cases.append(("file", f"truncate {name}", _edit_file(name, lambda d: d[:-1]), TAMPERED))
        cases.append(("file", f"append to {name}", _edit_file(name, lambda d: d + b"\0"), TAMPERED))
        cases.append(("file", f"empty {name}", _edit_file(name, lambda d: b""), TAMPERED))
        cases.append(("file", f"delete {name}", _disk(lambda d, n=name: (d / n).unlink()), ("but missing",)))
        cases.append(
            (
                "file",
                f"rename {name}",
                _disk(lambda d, n=name: (d / n).rename(d / (n + ".old"))),
                ("but missing",),
            )
        )
    for extra in [
        "extra.txt",
        "eval/extra.json",
        "new/dir/file",
        "adapter_model.safetensors.txt",
        "README.md~",
        "Model.sig",
    ]:

        def add(directory: Path, extra: str = extra) -> None:
            (directory / extra).parent.mkdir(parents=True, exist_ok=True)
            (directory / extra).write_text("surprise")

        cases.append(("file", f"extra {extra}", _disk(add), ("is not covered by model.sig",)))
    cases.append(
        (
            "file",
            "swap README/curve",
            _disk(lambda d: (d / "README.md").write_bytes((d / "eval/curve.json").read_bytes())),
            TAMPERED,
        )
    )
    cases.append(
        (
            "file",
            "copy config over README",
            _disk(lambda d: shutil.copy(d / "adapter_config.json", d / "README.md")),
            TAMPERED,
        )
    )
    return cases


def _high_s(der: bytes) -> bytes:
    """The same ECDSA signature as (r, n - s): valid for plain ECDSA, refused here (one form each)."""
    r, s = decode_dss_signature(der)
    return encode_dss_signature(r, P256_ORDER - s)


def envelope_cases(envelope_size: int) -> list[Case]:
    cases: list[Case] = []
    for step in range(80):
        position = step * envelope_size // 80
        cases.append(
            (
                "envelope",
                f"flip model.sig@{position}",
                _write_sig(
                    lambda b, p=position: b.envelope[:p] + bytes([b.envelope[p] ^ 0x01]) + b.envelope[p + 1 :]
                ),
                ENVELOPE,
            )
        )
    for cut in (0, 1, 10, 50, 100, 200, 400, envelope_size // 2, envelope_size - 2, envelope_size - 1):
        cases.append(
            (
                "envelope",
                f"truncate model.sig to {cut}",
                _write_sig(lambda b, c=cut: b.envelope[:c]),
                ENVELOPE,
            )
        )
    for junk in (b"{}", b"[]", b"null", b"1", b'"x"', b"\xff\xfe", b"NaN", b'{"payload":1e999}'):
        cases.append(("envelope", f"model.sig = {junk!r}", _write_sig(lambda b, j=junk: j), ENVELOPE))
    for seed in range(10):
        cases.append(
            (
                "envelope",
                f"random model.sig {seed}",
                _write_sig(lambda b, s=seed: np.random.default_rng(s).bytes(600)),
                ENVELOPE,
            )
        )

    def envelope(b: Base) -> dict:
        return json.loads(b.envelope)

    def sig_envelope(b: Base) -> dict:
        return envelope(b)["dsseEnvelope"]

    def sig(b: Base) -> dict:
        return sig_envelope(b)["signatures"][0]

    def other(b: Base) -> dict:
        return json.loads(b.other_envelope)["dsseEnvelope"]

    forged: dict[str, Callable[[Base], bytes]] = {
        "keyid swapped to mallory": lambda b: canonical_json(
            replaced(envelope(b), (*DSSE, "signatures", 0, "keyid"), b.mallory.public_hex)
        ),
        "hint of mallory's key": lambda b: canonical_json(
            replaced(envelope(b), HINT, hashlib.sha256(b.mallory.p256.public_pem()).hexdigest())
        ),
        "uppercase hint": lambda b: canonical_json(
            replaced(envelope(b), HINT, envelope(b)["verificationMaterial"]["publicKey"]["hint"].upper())
        ),
        "a tlog entry": lambda b: canonical_json(
            replaced(envelope(b), ("verificationMaterial", "tlogEntries"), [{}])
        ),
        "older bundle media type": lambda b: canonical_json(
            replaced(envelope(b), ("mediaType",), "application/vnd.dev.sigstore.bundle+json;version=0.2")
        ),
        "bare inner envelope": lambda b: canonical_json(sig_envelope(b)),
        "high-S twin of the signature": lambda b: canonical_json(
            replaced(envelope(b), SIG, base64.b64encode(_high_s(base64.b64decode(sig(b)["sig"]))).decode())
        ),
        "signature from another manifest": lambda b: canonical_json(
            replaced(envelope(b), (*DSSE, "signatures"), other(b)["signatures"])
        ),
        "payload from another manifest": lambda b: canonical_json(
            replaced(envelope(b), PAYLOAD, other(b)["payload"])
        ),
        "second signature": lambda b: canonical_json(
            replaced(envelope(b), (*DSSE, "signatures"), [sig(b), sig(b)])
        ),
        "no signature": lambda b: canonical_json(replaced(envelope(b), (*DSSE, "signatures"), [])),
        "payloadType text/plain": lambda b: canonical_json(
            replaced(envelope(b), (*DSSE, "payloadType"), "text/plain")
        ),
        "payloadType missing": lambda b: canonical_json(
            replaced(envelope(b), DSSE, {k: v for k, v in sig_envelope(b).items() if k != "payloadType"})
        ),
        "extra bundle field": lambda b: canonical_json(envelope(b) | {"zzz": 1}),
        "extra envelope field": lambda b: canonical_json(
            replaced(envelope(b), DSSE, sig_envelope(b) | {"zzz": 1})
        ),
        "MIME-wrapped payload": lambda b: canonical_json(
            replaced(envelope(b), PAYLOAD, base64.encodebytes(payload_of(envelope(b))).decode())
        ),
        "pretty envelope": lambda b: json.dumps(envelope(b), indent=1).encode(),
        "duplicate payload key": lambda b: b.envelope.replace(b'{"payload":', b'{"payload":"","payload":', 1),
        "duplicate sig key": lambda b: b.envelope.replace(b'{"keyid":', b'{"sig":"","keyid":', 1),
    }
    for label, make in forged.items():
        cases.append(("envelope", label, _write_sig(make), ENVELOPE))
    for path, value in [
        (("predicate", "commons", "version"), 99),
        (("predicate", "commons", "license"), "proprietary"),
        (("predicate", "commons", "name"), "other"),
        (("predicate", "commons", "expires"), "2099-01-01T00:00:00Z"),
        (("predicate", "commons", "contributors"), []),
        (("predicate", "commons", "base_model"), "evil/model"),
        (("predicate", "resources", 0, "digest"), "0" * 64),
        (("predicate", "commons", "files", 0, "size"), 1),
        (("predicate", "commons", "files", 0, "cid"), "Qm" + "1" * 44),
        (("subject", 0, "name"), "other"),
        (("predicate", "commons", "eval", "accuracy_adapter"), 0.99),
        (("predicate", "commons", "previous"), "Qm"),
    ]:
        cases.append(
            (
                "envelope",
                f"unsigned change {'/'.join(map(str, path))}",
                _write_sig(_unsigned_statement_change(_set(path, value))),
                ("signature check failed",),
            )
        )
    cases.append(
        (
            "envelope",
            "mallory re-signs the same statement",
            _statement(lambda s: None, "mallory"),
            ("is pinned to signer",),
        )
    )
    cases.append(
        (
            "envelope",
            "mallory signs a new version",
            _statement(_set(("predicate", "commons", "version"), 4), "mallory"),
            ("is pinned to signer",),
        )
    )
    cases.append(
        (
            "envelope",
            "payload indented",
            _statement(lambda s: None, encode=lambda s: json.dumps(s, indent=1, sort_keys=True).encode()),
            ("not in canonical form",),
        )
    )
    cases.append(
        (
            "envelope",
            "payload ascii escapes",
            _statement(
                _set(("predicate", "commons", "campaign"), "ü"),
                encode=lambda s: json.dumps(s, sort_keys=True, separators=(",", ":")).encode(),
            ),
            ("not in canonical form",),
        )
    )
    cases.append(
        (
            "envelope",
            "payload unsorted",
            _statement(
                lambda s: None,
                encode=lambda s: json.dumps(dict(reversed(list(s.items()))), separators=(",", ":")).encode(),
            ),
            ("not in canonical form",),
        )
    )
    return cases


def policy_cases() -> list[Case]:
    cases: list[Case] = [
        (
            "policy",
            "revoked signer",
            lambda d, b: TrustPolicy(revoked=frozenset({b.alice.public_hex})),
            ("is revoked",),
        ),
        (
            "policy",
            "revoked though trusted",
            lambda d, b: TrustPolicy(
                trusted=frozenset({b.alice.public_hex}), revoked=frozenset({b.alice.public_hex})
            ),
            ("is revoked",),
        ),
        (
            "policy",
            "not in trusted keys",
            lambda d, b: TrustPolicy(trusted=frozenset({b.mallory.public_hex})),
            ("not in your trusted keys",),
        ),
        (
            "policy",
            "empty trusted keys",
            lambda d, b: TrustPolicy(trusted=frozenset()),
            ("not in your trusted keys",),
        ),
        (
            "policy",
            "name pinned to mallory",
            lambda d, b: TrustPolicy(pins={"demo": b.mallory.public_hex}),
            ("is pinned to signer",),
        ),
        (
            "policy",
            "older than seen",
            _policy(versions={"demo": {5: "ab" * 32}}),
            ("is older than v5 already seen",),
        ),
        (
            "policy",
            "same version other digest",
            _policy(versions={"demo": {3: "ab" * 32}}),
            ("differs from the v3 already seen",),
        ),
        ("policy", "oversized by manifest", _policy(max_file_size=64), ("over the 64 bytes limit",)),
    ]
    for when in ("2020-01-01T00:00:00Z", "2026-01-01T00:00:00+00:00", "1970-01-01T00:00:01Z"):
        cases.append(
            (
                "policy",
                f"expired {when}",
                _statement(_set(("predicate", "commons", "expires"), when)),
                ("expired at",),
            )
        )
    for label, action in {
        "file symlink": lambda d: (d / "link").symlink_to(d / "README.md"),
        "dir symlink": lambda d: (d / "linkdir").symlink_to(d / "eval"),
        "hidden symlink": lambda d: (d / ".link").symlink_to("/etc/passwd"),
        "signed file replaced by symlink": lambda d: (
            (d / "README.md").rename(d / ".readme"),
            (d / "README.md").symlink_to(d / ".readme"),
        ),
        "dangling symlink": lambda d: (d / "eval" / "gone").symlink_to(d / "nowhere"),
    }.items():
        cases.append(("policy", label, _disk(action), ("is a symlink",)))
    for suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".BIN", ".pickle", ".joblib"):
        cases.append(
            (
                "policy",
                f"pickle {suffix}",
                _disk(lambda d, s=suffix: (d / f"weights{s}").write_bytes(pickle.dumps(1))),
                ("pickle-capable format",),
            )
        )
    for protocol in (2, 3, 4, 5):
        cases.append(
            (
                "policy",
                f"pickle protocol {protocol} as .dat",
                _disk(lambda d, p=protocol: (d / "w.dat").write_bytes(pickle.dumps([1], protocol=p))),
                ("is a pickle",),
            )
        )
    cases.append(("policy", "torch zip", _disk(_zip_pickle), ("zip holding a pickle",)))
    cases.append(
        (
            "policy",
            "fake safetensors",
            _disk(lambda d: (d / "x.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"[1,2]" + b"\0" * 16)),
            ("not a valid safetensors file",),
        )
    )
    cases.append(("policy", "fifo", _disk(lambda d: os.mkfifo(d / "pipe")), ("is not a regular file",)))
    for name, reason in [
        ("../evil", "path traversal"),
        ("a/../../evil", "path traversal"),
        ("..", "path traversal"),
        ("/etc/passwd", "absolute path"),
        ("C:/x", "absolute path"),
        ("a\\b", "backslash"),
        ("..\\..\\evil", "backslash"),
        ("a//b", "empty path component"),
        ("a/", "empty path component"),
        ("./a", "empty path component"),
        ("a\x00b", "control character"),
        (".git/config", "hidden path"),
        ("ab:c", "colon"),
        ("", "empty or too long"),
        ("model.sig", "cannot list itself"),
    ]:
        cases.append(("policy", f"forged name {name!r}", _statement(_rename_resource(name)), (reason,)))
    cases.append(
        ("policy", "duplicate resource", _statement(_duplicate_resource), ("duplicate resource name",))
    )
    wrong_types = {
        "name": 1,
        "version": "3",
        "kind": None,
        "base_model": [],
        "base_revision": 0,
        "lora_config": [],
        "campaign": {},
        "rounds": 1.5,
        "contributors": "x",
        "datasets": [1],
        "eval": [],
        "license": False,
        "previous": 1,
        "created": 0,
        "expires": 5,
        "ledger": {},
    }
    for field, value in wrong_types.items():
        cases.append(
            (
                "policy",
                f"wrong type {field}",
                _statement(_set(("predicate", "commons", field), value)),
                ("must be",),
            )
        )
    for field in [*wrong_types, "files", "signer"]:
        cases.append(
            (
                "policy",
                f"missing commons.{field}",
                _statement(_delete(("predicate", "commons", field))),
                ("missing the field", NO_KEY),
            )
        )
    for path in [
        ("_type",),
        ("subject",),
        ("predicateType",),
        ("predicate",),
        ("predicate", "resources"),
        ("predicate", "serialization"),
        ("subject", 0, "digest"),
    ]:
        cases.append(
            (
                "policy",
                f"missing {'/'.join(map(str, path))}",
                _statement(_delete(path)),
                ("missing the field", NO_KEY),
            )
        )
    for path in [(), ("predicate",), ("predicate", "commons"), ("subject", 0)]:
        cases.append(
            ("policy", f"unknown field in {path}", _statement(_set((*path, "zz"), 1)), ("unknown field",))
        )
    for path, value, reason in [
        (("predicate", "commons", "version"), 0, "version must be a positive integer"),
        (("predicate", "commons", "version"), True, "version must be an integer"),
        (("predicate", "commons", "kind"), "model", "kind must be"),
        (("predicate", "commons", "name"), "../x", "name must be"),
        (("predicate", "commons", "created"), "yesterday", "created must be an ISO 8601"),
        (("predicate", "commons", "expires"), "2030-01-01T00:00:00", "expires must be an ISO 8601"),
        (
            ("predicate", "commons", "files", 0, "cid"),
            "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
            "must be a CIDv0",
        ),
        (("predicate", "commons", "files", 0, "size"), -1, "must be a non-negative integer"),
        (("predicate", "commons", "files", 0, "name"), "other.md", "same names as resources"),
        (("predicate", "commons", "files"), [], "must match resources"),
        (("predicate", "resources", 0, "algorithm"), "md5", "algorithm must be sha256"),
        (("predicate", "resources", 0, "digest"), "AB" * 32, "must be 64 lowercase hex"),
        (("predicate", "serialization", "allow_symlinks"), True, "serialization must be"),
        (("predicate", "serialization", "method"), "shards", "serialization must be"),
        (("subject", 0, "digest", "sha256"), "0" * 64, "subject digest does not match"),
        (("subject", 0, "name"), "other", "subject name differs"),
        (("subject",), [], "exactly one subject"),
        (("_type",), "https://in-toto.io/Statement/v0.1", "_type must be"),
        (("predicateType",), "https://model_signing/Digests/v0.1", "predicateType must be"),
    ]:
        cases.append(
            (
                "policy",
                f"bad value {'/'.join(map(str, path))}={value!r}",
                _statement(_set(path, value)),
                (reason,),
            )
        )
    cases.append(
        (
            "policy",
            "resources unsorted",
            _statement(lambda s: s["predicate"]["resources"].reverse()),
            ("must be sorted by name",),
        )
    )

    def no_files(statement: dict) -> None:
        statement["predicate"]["resources"] = []
        statement["predicate"]["commons"]["files"] = []
        statement["subject"][0]["digest"]["sha256"] = hashlib.sha256(b"").hexdigest()

    cases.append(("policy", "manifest lists no files", _statement(no_files), ("lists no files",)))
    cases.append(
        (
            "policy",
            "commons is a list",
            _statement(_set(("predicate", "commons"), [1])),
            ("commons must be a JSON object", NO_KEY),
        )
    )
    return cases


def test_corpus_of_tampered_and_forged_adapters_is_fully_refused(base: Base, tmp_path: Path) -> None:
    cases = file_cases() + envelope_cases(len(base.envelope)) + policy_cases()
    assert len(cases) >= 200
    refusals: dict[str, int] = {}
    failures = []
    for index, (category, label, mutate, expected) in enumerate(cases):
        directory = tmp_path / f"case{index}"
        shutil.copytree(base.directory, directory, symlinks=True)
        policy = mutate(directory, base) or pinned(base)
        try:
            verify_directory(directory, policy, record=False)
            failures.append(f"{label}: ACCEPTED")
        except VerifyError as exc:
            message = str(exc)
            if "\n" in message or len(message) >= 200 or not any(f in message for f in expected):
                failures.append(f"{label}: {message!r} (expected {expected})")
            else:
                refusals[category] = refusals.get(category, 0) + 1
        shutil.rmtree(directory)
    total = len(cases)
    print(
        f"\ncorpus: {total} cases, {total - len(failures)} refused with the expected one-line reason "
        f"({100 * (total - len(failures)) / total:.1f} %); by category: {refusals}"
    )
    assert not failures, "\n".join(failures)


def test_root_digest_follows_model_signing(base: Base) -> None:
    resources = base.statement["predicate"]["resources"]
    expected = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources)).hexdigest()
    assert base.statement["subject"][0]["digest"]["sha256"] == expected

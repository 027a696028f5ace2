"""model.sig as a Sigstore bundle: two signatures (P-256 over the statement, ed25519 over the P-256 key),
one accepted form each, and the bare ed25519 envelopes written before bundles still verify."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from protocol.errors import VerifyError
from protocol.signing.bundle import BINDING_DOMAIN, KeyBinding, payload_of, pem_hint, sign_bundle
from protocol.signing.dsse import canonical_json, sign_envelope
from protocol.signing.keys import Identity, verify_p256
from protocol.signing.manifest import (
    SIGNATURE_FILE,
    AdapterMeta,
    sign_directory,
    verify_directory,
    verify_envelope,
)
from protocol.signing.trust import TrustPolicy

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
GOLDEN_SEED = bytes(range(32))
# `commons sign` before bundles (ed25519 DSSE), over golden_folder() by Identity.from_seed(GOLDEN_SEED)
GOLDEN_LEGACY_SIG = (
    b'{"payload":"eyJfdHlwZSI6Imh0dHBzOi8vaW4tdG90by5pby9TdGF0ZW1lbnQvdjEiLCJwcmVkaWNhdGUiOnsiY29tbW9u'
    b'cyI6eyJiYXNlX21vZGVsIjoiIiwiYmFzZV9yZXZpc2lvbiI6IiIsImNhbXBhaWduIjoiIiwiY29udHJpYnV0b3JzIjpbXSwi'
    b'Y3JlYXRlZCI6IjIwMjUtMDEtMDFUMDA6MDA6MDBaIiwiZGF0YXNldHMiOltdLCJldmFsIjp7fSwiZXhwaXJlcyI6bnVsbCwi'
    b'ZmlsZXMiOlt7ImNpZCI6IlFtU3duN1V0Z1c0OUYxdDVLNFZzanE2bjNLUnZrMzhBMTZQS3BDUTMyekhCajUiLCJuYW1lIjoi'
    b'UkVBRE1FLm1kIiwic2l6ZSI6NDF9LHsiY2lkIjoiUW1SVmVzcHpkcE0zV2JMSGdKamtRRUF6Q29FOW44dWtxeUNoWTdHQzNR'
    b'MlpIQSIsIm5hbWUiOiJhZGFwdGVyX2NvbmZpZy5qc29uIiwic2l6ZSI6MzB9LHsiY2lkIjoiUW1VSDdIN0RLdXVXR1VqcHd5'
    b'aURZZWJCanpidVRtaTNoRzhqcDdZS0J5RHl2VCIsIm5hbWUiOiJldmFsL2N1cnZlLmpzb24iLCJzaXplIjoxMn1dLCJraW5k'
    b'IjoiYWRhcHRlciIsImxlZGdlciI6W10sImxpY2Vuc2UiOiJNSVQiLCJsb3JhX2NvbmZpZyI6e30sIm5hbWUiOiJnb2xkZW4i'
    b'LCJwcmV2aW91cyI6bnVsbCwicm91bmRzIjowLCJ2ZXJzaW9uIjoxfSwicmVzb3VyY2VzIjpbeyJhbGdvcml0aG0iOiJzaGEy'
    b'NTYiLCJkaWdlc3QiOiJhNzNmYWNmMGM4MjhhZWJmZTEyYjcxNzZlNGMyNTM2MDg0MjE3ZTM3ZjFmY2Y3ZTlmNzA3ODllZmJi'
    b'NDQwMTVlIiwibmFtZSI6IlJFQURNRS5tZCJ9LHsiYWxnb3JpdGhtIjoic2hhMjU2IiwiZGlnZXN0IjoiNmU1MTgzZWFiNmEy'
    b'OWUxYTM4MDIyNjE5MjY5MTlhMDBjNDEyYzViOWFkOGU0ZmNkOWMyZmZlYmE3NjA5YmZiZiIsIm5hbWUiOiJhZGFwdGVyX2Nv'
    b'bmZpZy5qc29uIn0seyJhbGdvcml0aG0iOiJzaGEyNTYiLCJkaWdlc3QiOiI4YzZhMGE2MDBkY2NiNTBmNmMyODg1OGZlNjg4'
    b'MGZhZmVhMGYyM2Y3YjI3MWI2NDBlNjE0MWQwZDdhZmMwOTg5IiwibmFtZSI6ImV2YWwvY3VydmUuanNvbiJ9XSwic2VyaWFs'
    b'aXphdGlvbiI6eyJhbGxvd19zeW1saW5rcyI6ZmFsc2UsImhhc2hfdHlwZSI6InNoYTI1NiIsImlnbm9yZV9wYXRocyI6WyIu'
    b'Z2l0YXR0cmlidXRlcyIsIm1vZGVsLnNpZyJdLCJtZXRob2QiOiJmaWxlcyJ9fSwicHJlZGljYXRlVHlwZSI6Imh0dHBzOi8v'
    b'bW9kZWxfc2lnbmluZy9zaWduYXR1cmUvdjEuMCIsInN1YmplY3QiOlt7ImRpZ2VzdCI6eyJzaGEyNTYiOiI4NmViOGE0ODEx'
    b'OTFmOTcxMGIzZDNlYzU1YzNmZmVmMTlkYWZkZDFkYTcxM2I3MDJjMDZhM2E3MDgzMDBjZjgzIn0sIm5hbWUiOiJnb2xkZW4i'
    b'fV19","payloadType":"application/vnd.in-toto+json","signatures":[{"keyid":"03a107bff3ce10be1d70d'
    b'd18e74bc09967e4d6309ba50d5f1ddc8664125531b8","sig":"e5hBSuIOnlVSNLP5TNAWCppuyPSdO5/Ps9xyxW3KxYKh'
    b'E0VY8mvnJ85+4OlgKC8StbsSUaEFUVvtvKCIb7h1Ag=="}]}'
)


def golden_folder(path: Path) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}\n')
    (path / "README.md").write_text("# a golden adapter signed before bundles\n")
    (path / "eval").mkdir()
    (path / "eval" / "curve.json").write_text("[0.25, 0.5]\n")
    (path / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (path / SIGNATURE_FILE).write_bytes(GOLDEN_LEGACY_SIG)
    return path


def make_adapter(path: Path) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text('{"r": 2}')
    (path / "README.md").write_text("# bundle test\n")
    return path


def rejected(data: bytes, fragment: str, policy: TrustPolicy | None = None) -> None:
    with pytest.raises(VerifyError) as info:
        verify_envelope(data, policy or TrustPolicy())
    message = str(info.value)
    assert fragment in message and "\n" not in message and len(message) < 200, message


@pytest.fixture
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture
def bundle(tmp_path: Path, alice: Identity) -> dict:
    return sign_directory(make_adapter(tmp_path / "adapter"), AdapterMeta(name="demo"), alice)


# --- what is written ----------------------------------------------------------------------------------------


def test_the_bundle_is_what_model_signing_writes_for_a_key_in_canonical_json(
    tmp_path: Path, bundle: dict, alice: Identity
) -> None:
    raw = (tmp_path / "adapter" / SIGNATURE_FILE).read_bytes()
    assert raw == canonical_json(bundle)
    assert list(bundle) == ["dsseEnvelope", "mediaType", "verificationMaterial"]
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    hint = pem_hint(alice.p256.public_der)
    assert bundle["verificationMaterial"] == {"publicKey": {"hint": hint}, "tlogEntries": []}
    signature = bundle["dsseEnvelope"]["signatures"][0]
    assert signature["keyid"] == ""
    payload = payload_of(bundle)
    pae = b"DSSEv1 28 application/vnd.in-toto+json %d %s" % (len(payload), payload)
    assert verify_p256(alice.p256.public_der, pae, base64.b64decode(signature["sig"]))


def test_the_statement_carries_the_identity_s_word_for_its_p256_key(bundle: dict, alice: Identity) -> None:
    signer = json.loads(payload_of(bundle))["predicate"]["commons"]["signer"]
    binding = KeyBinding.parse(signer)
    assert binding.ed25519 == alice.public_hex and binding.p256 == alice.p256.public_der
    assert alice.sign(BINDING_DOMAIN + binding.p256) == binding.sig
    assert verify_envelope(canonical_json(bundle), TrustPolicy()).signer == alice.public_hex


def test_signatures_are_low_s_so_nobody_makes_a_second_valid_bundle(bundle: dict) -> None:
    der = base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"])
    r, s = decode_dss_signature(der)
    assert s <= P256_ORDER // 2
    twin = encode_dss_signature(r, P256_ORDER - s)
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(twin).decode()
    rejected(canonical_json(bundle), "signature check failed")


# --- forgeries ----------------------------------------------------------------------------------------------


def test_mallory_cannot_claim_alice_s_p256_key(bundle: dict, alice: Identity) -> None:
    mallory = Identity.generate()
    statement = json.loads(payload_of(bundle))
    der = alice.p256.public_der
    claim = KeyBinding(mallory.public_hex, der, mallory.sign(BINDING_DOMAIN + der))
    statement["predicate"]["commons"]["signer"] = claim.to_dict()
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(canonical_json(statement)).decode()
    rejected(canonical_json(bundle), f"signature check failed for key {mallory.public_hex[:16]}")


def test_mallory_cannot_vouch_for_her_key_in_alice_s_name(bundle: dict, alice: Identity) -> None:
    mallory = Identity.generate()
    statement = json.loads(payload_of(bundle))
    der = mallory.p256.public_der
    forged = KeyBinding(alice.public_hex, der, mallory.sign(BINDING_DOMAIN + der))
    statement["predicate"]["commons"]["signer"] = forged.to_dict()
    data = canonical_json(sign_bundle(canonical_json(statement), mallory))
    rejected(data, "it did not vouch for this P-256 key")


def test_a_binding_signed_without_the_domain_prefix_is_refused(bundle: dict, alice: Identity) -> None:
    statement = json.loads(payload_of(bundle))
    der = alice.p256.public_der
    statement["predicate"]["commons"]["signer"]["sig"] = base64.b64encode(alice.sign(der)).decode()
    rejected(canonical_json(sign_bundle(canonical_json(statement), alice)), "did not vouch")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("ed25519", "AB" * 32, "lowercase hex"),
        ("p256", base64.b64encode(b"\x30\x00").decode(), "is not a P-256 public key"),
        ("sig", "not base64!", "is not valid base64"),
        ("extra", 1, "unknown field 'extra'"),
    ],
)
def test_a_malformed_binding_is_refused(
    bundle: dict, alice: Identity, field: str, value: object, fragment: str
) -> None:
    statement = json.loads(payload_of(bundle))
    statement["predicate"]["commons"]["signer"][field] = value
    rejected(canonical_json(sign_bundle(canonical_json(statement), alice)), fragment)


def test_a_bundle_without_a_binding_and_an_envelope_with_one_are_refused(
    bundle: dict, alice: Identity
) -> None:
    statement = json.loads(payload_of(bundle))
    with_binding = canonical_json(statement)
    del statement["predicate"]["commons"]["signer"]
    rejected(canonical_json(sign_bundle(canonical_json(statement), alice)), "names no P-256 key")
    rejected(canonical_json(sign_envelope(with_binding, alice)), "unknown field 'signer'")


def test_the_bundle_s_fixed_parts_are_checked(bundle: dict) -> None:
    for path, value, fragment in [
        (("mediaType",), "application/vnd.dev.sigstore.bundle+json;version=0.3", "mediaType must be"),
        (("verificationMaterial", "publicKey", "hint"), "0" * 64, "hint does not name"),
        (("verificationMaterial", "publicKey", "hint"), None, "must be 64 lowercase hex"),
        (("verificationMaterial", "tlogEntries"), [{"logIndex": "1"}], "transparency log entries"),
        (("dsseEnvelope", "signatures", 0, "keyid"), "x", "keyid must be empty"),
    ]:
        changed = json.loads(canonical_json(bundle))
        target = changed
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        rejected(canonical_json(changed), fragment)


# --- before bundles -----------------------------------------------------------------------------------------


def test_a_folder_signed_before_bundles_still_verifies(tmp_path: Path) -> None:
    folder = golden_folder(tmp_path / "legacy")
    verified = verify_directory(folder, TrustPolicy(), record=False)
    assert verified.signer == Identity.from_seed(GOLDEN_SEED).public_hex
    assert (verified.meta.name, verified.meta.version, verified.meta.license) == ("golden", 1, "MIT")
    assert [f["name"] for f in verified.files] == ["README.md", "adapter_config.json", "eval/curve.json"]
    assert verified.ignored == (".gitattributes",)


def test_a_folder_signed_before_bundles_still_refuses_tampering(tmp_path: Path) -> None:
    folder = golden_folder(tmp_path / "legacy")
    (folder / "eval" / "curve.json").write_text("[0.99, 0.99]\n")
    with pytest.raises(VerifyError, match="'eval/curve.json' was modified after signing"):
        verify_directory(folder, TrustPolicy(), record=False)
    envelope = json.loads(GOLDEN_LEGACY_SIG)
    envelope["signatures"][0]["keyid"] = Identity.generate().public_hex
    rejected(canonical_json(envelope), "signature check failed")


def test_re_signing_an_old_folder_writes_a_bundle_for_the_same_signer(tmp_path: Path) -> None:
    folder = golden_folder(tmp_path / "legacy")
    me = Identity.from_seed(GOLDEN_SEED)
    policy = TrustPolicy()
    verify_directory(folder, policy)  # pins "golden" to the seed's key
    sign_directory(folder, AdapterMeta(name="golden", version=2, license="MIT"), me)
    assert "mediaType" in json.loads((folder / SIGNATURE_FILE).read_bytes())
    assert verify_directory(folder, policy).signer == me.public_hex

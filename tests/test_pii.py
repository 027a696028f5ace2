"""PII scrubbing: recall on a held-out corpus and a planted one, clean chat text left alone, the report."""

from __future__ import annotations

import json
import random
import string
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from stdnum import luhn

from protocol.data.pii import describe, find_pii, scrub

CORPUS = Path(__file__).parent / "data" / "pii_corpus.jsonl"

RNG = random.Random(20261124)
ALNUM = string.ascii_letters + string.digits


def _rand(alphabet: str, n: int) -> str:
    return "".join(RNG.choice(alphabet) for _ in range(n))


def _card(prefix: str, length: int) -> str:
    body = prefix + _rand(string.digits, length - len(prefix) - 1)
    for check in string.digits:
        if luhn.is_valid(body + check):
            return body + check
    raise AssertionError("unreachable")


def _grouped(digits: str, sep: str) -> str:
    if len(digits) == 15:
        return sep.join((digits[:4], digits[4:10], digits[10:]))
    return sep.join(digits[i:i + 4] for i in range(0, len(digits), 4))


def _ipv6() -> str:
    groups = [f"{RNG.randrange(0x10000):x}" for _ in range(8)]
    style = RNG.randrange(3)
    if style == 0:
        return ":".join(groups)
    if style == 1:
        return ":".join(groups[:3]) + "::" + ":".join(groups[6:])
    return "fe80::" + ":".join(groups[4:])


GENERATORS = {
    "email": lambda: RNG.choice(["jane.doe", "m.rossi", "dev+ops", "k_tanaka", "alex99", "Li.Wei"]) + "@"
    + RNG.choice(["example.com", "mail.example.org", "uni-bonn.de", "corp.co.uk", "xn--bcher-kva.example"]),
    "phone": lambda: RNG.choice([
        f"+1 ({RNG.randint(201, 989)}) {RNG.randint(200, 999)}-{RNG.randint(1000, 9999)}",
        f"{RNG.randint(201, 989)}-{RNG.randint(200, 999)}-{RNG.randint(1000, 9999)}",
        f"+44 20 {RNG.randint(7000, 7999)} {RNG.randint(1000, 9999)}",
        f"+33 1 {RNG.randint(10, 99)} {RNG.randint(10, 99)} {RNG.randint(10, 99)} {RNG.randint(10, 99)}",
        f"({RNG.randint(201, 989)}) {RNG.randint(200, 999)}.{RNG.randint(1000, 9999)}",
        f"+49{RNG.randint(1500000000, 1799999999)}",
        f"{RNG.randint(201, 989)}.{RNG.randint(200, 999)}.{RNG.randint(1000, 9999)}",
        f"+91 {RNG.randint(70000, 99999)} {RNG.randint(10000, 99999)}",
    ]),
    "aws_key": lambda: "AKIA" + _rand(string.ascii_uppercase + string.digits, 16),
    "github_token": lambda: "ghp_" + _rand(ALNUM, 36),
    "openai_key": lambda: RNG.choice(["sk-", "sk-proj-"]) + _rand(ALNUM + "_-", 48),
    "secret": lambda: _rand(ALNUM + "_-", RNG.randint(24, 40)),
    "ipv4": lambda: ".".join(str(RNG.randint(1, 254)) for _ in range(4)),
    "ipv6": _ipv6,
    "credit_card": lambda: _grouped(
        _card(*RNG.choice([("4", 16), ("51", 16), ("55", 16), ("37", 15), ("6011", 16)])),
        RNG.choice([" ", "-", ""]),
    ),
}

TEMPLATES = {
    "email": ["Please send the invoice to {} before Friday.", "You can reach the maintainer at {}.",
              "My work address is {} if that helps.", "From: Jane <{}>\nSubject: re: the bug"],
    "phone": ["Call me at {} after 5pm.", "The front desk number is {}.", "Text me on {} when you land.",
              "Contact: {} (office hours 9-17)"],
    "aws_key": ["I set AWS_ACCESS_KEY_ID to {} but boto3 still fails.", "export KEY={} && aws s3 ls"],
    "github_token": ["git clone https://{}@github.com/org/repo.git fails with 403",
                     "My CI uses the token {} and it expired."],
    "openai_key": ["openai.api_key = \"{}\" then I call the chat endpoint.", "Using {} in my .env file."],
    "secret": ["config: api_key={} region=eu-west-1", "headers = {{'Authorization': 'Bearer {}'}}",
               "token: {}", "DB_PASSWORD={} in docker-compose.yml", "\"client_secret\": \"{}\","],
    "ipv4": ["The server at {} refuses ssh connections.", "ping {} shows 40% packet loss.",
             "Failed password for root from {} port 22 ssh2", "curl http://{}:8080/health"],
    "ipv6": ["My VPS has the address {} and nginx listens on it.", "curl -g http://[{}]:8080/ times out"],
    "credit_card": ["I paid with card {} and got charged twice.", "card number: {} exp 09/28"],
}

CLEAN = [
    "The derivative of x^2 + 3x is 2x + 3, so the slope at x = 4 is 11.",
    "Python 3.11.4 added faster startup; upgrade with pip install -U pip==24.0.",
    "Our meeting is on 2024-03-15 at 14:30, room 204, and lasts 45 minutes.",
    "The commit 3f9a2c1b7e4d5f60718293a4b5c6d7e8f9012345 fixed the regression in torch 2.4.1.",
    "Set the learning rate to 3e-4, the batch size to 32 and train for 1000 steps.",
    "In C++ you write std::vector<int> v; and access elements with v.at(i).",
    "The population of Tokyo is about 37,400,068 people as of 2023.",
    "Use a UUID like 123e4567-e89b-12d3-a456-426614174000 for the request id.",
    "The answer is 42. Then multiply 1234 by 5678 to get 7006652.",
    "ISBN 978-3-16-148410-0 is the book you want; it costs $29.99.",
    "Pi is approximately 3.14159265358979 and e is 2.71828182845904.",
    "Order #100245 shipped on 12/05/2023 with tracking 1Z999AA10123456784.",
    "Latitude 48.8566, longitude 2.3522 is the centre of Paris.",
    "The function returns a dict mapping token ids to logits of shape (batch, seq, vocab).",
    "Kubernetes 1.29 requires containerd 1.7; check with kubectl version --client.",
    "Run ls -la /var/log && tail -n 100 syslog to inspect the last lines.",
    "Set password_min_length=12 and enable two-factor authentication in settings.",
    "The model reached 71.3% accuracy after 3 rounds, up from 48.0% at round 0.",
    "A 1920x1080 display at 60 Hz needs about 3.73 Gbit/s uncompressed.",
    "Version v2.10.3.1 of the firmware fixes the boot loop on model A-1200.",
    "The sha256 of the file is e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855.",
    "Flight LH 400 departs at 13:05 from gate B44; boarding begins 12:25.",
    "We measured 0.25 s p99 latency at 1,000 requests per second over 10 minutes.",
    "The token limit is 4096 and the temperature should stay between 0.2 and 0.8.",
    "Use the key argument of sorted(), e.g. sorted(items, key=len), to sort by length.",
    "My laptop runs Windows version 10.0.19045.2965 and the screen is 16:9 at 12:30:45 local time.",
    "Order number 5520012345 was refunded; the invoice total was 1,299.00 EUR.",
    "The MAC address format is aa:bb:cc:dd:ee:ff and a port range is 8000-8100.",
    "Call sklearn's fit() then predict(); sk-learn is a common misspelling of scikit-learn.",
    "Between 1990 and 2020 the value rose from 3.5 to 7.25 per cent, a 107 percent increase.",
    "Set token_limit = 2048 and password_policy: strict in the config file.",
    "Chapter 12.3.4 covers the proof; see also equation (4.2) and table 7.",
    "The team won in 1990 2002 2014 and the scores were 12 34 56 78 90 in the last five games.",
]


def _planted_corpus() -> list[tuple[str, str, str]]:
    items = []
    for kind, make in GENERATORS.items():
        for i in range(25):
            value = make()
            items.append((kind, value, TEMPLATES[kind][i % len(TEMPLATES[kind])].format(value)))
    return items


def test_recall_on_planted_corpus_is_at_least_95_percent() -> None:
    corpus = _planted_corpus()
    assert len(corpus) >= 200
    missed = []
    for kind, value, text in corpus:
        result = scrub(text)
        if value in result.text or sum(result.counts.values()) == 0:
            missed.append((kind, text))
    recall = 1 - len(missed) / len(corpus)
    print(f"PII recall {recall:.3f} over {len(corpus)} planted items; missed: {missed}")
    assert recall >= 0.95, missed
    # every kind is caught on its own, not only in aggregate
    per_kind = {k: sum(1 for m in missed if m[0] == k) for k in GENERATORS}
    assert all(n <= 2 for n in per_kind.values()), per_kind


def test_mixed_paragraph_is_scrubbed_with_per_kind_counts() -> None:
    text = ("Hi, I'm Jane (jane.doe@example.com, +1 (415) 555-0132). Our box is 10.0.12.7 / "
            "2001:db8:85a3::8a2e:370:7334. Key AKIAIOSFODNN7EXAMPLE, gh token "
            "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789, card 4111 1111 1111 1111.")
    result = scrub(text)
    assert result.text == ("Hi, I'm Jane ([EMAIL], [PHONE]). Our box is [IP_ADDRESS] / [IP_ADDRESS]. Key "
                           "[AWS_KEY], gh token [GITHUB_TOKEN], card [CREDIT_CARD].")
    assert dict(result.counts) == {"email": 1, "phone": 1, "ipv4": 1, "ipv6": 1, "aws_key": 1,
                                   "github_token": 1, "credit_card": 1}


def test_clean_text_has_few_false_positives() -> None:
    flagged = [(t, find_pii(t)) for t in CLEAN if find_pii(t)]
    print(f"false positives: {len(flagged)}/{len(CLEAN)} clean sentences: {flagged}")
    assert len(flagged) <= 1, flagged


def test_luhn_invalid_numbers_are_not_cards() -> None:
    assert find_pii("reference 4111 1111 1111 1112 please") == []
    assert scrub("card 4111-1111-1111-1111").counts["credit_card"] == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("password: hunter22", "password: [SECRET]"),
    ("api_key = 'x9Kf2LpQ8rT4vW7zB1nM'", "api_key = '[SECRET]'"),
    ("Authorization: Bearer abcDEF123456ghiJKL789", "Authorization: Bearer [SECRET]"),
    ("token: none", "token: none"),
])
def test_assigned_secrets_are_scrubbed_but_keyword_kept(text: str, expected: str) -> None:
    assert scrub(text).text == expected


def test_url_credentials_and_spaced_phone_numbers() -> None:
    assert scrub("mongodb://admin:S3cr3tP4ss@db.example.com:27017/app").text == (
        "mongodb://[SECRET]@db.example.com:27017/app")
    assert scrub("call 07700 900123 tomorrow").text == "call [PHONE] tomorrow"


def test_private_key_block_removed_whole() -> None:
    text = ("here:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
            "-----END OPENSSH PRIVATE KEY-----\nok")
    assert scrub(text).text == "here:\n[PRIVATE_KEY]\nok"


# --- the held-out corpus: written apart from the detectors, in other formats and other sentences -------
# tests/data/pii_corpus.jsonl: one JSON object a line, either a planted value {kind, country, text, start,
# end, value} or a look-alike {kind: "none", lookalike, text}. "split" says when it was written:
#   a  before the detectors (352 lines); its first run missed 6 of 222, and four rules were fixed
#   b  after they were frozen (154 lines); first run 89.5% recall, 2.9% false positives, then fixed
#   c  last (80 lines), measured once and never tuned against: 100% recall, 2.9% false positives

def _corpus() -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r["kind"] != "none"], [r for r in rows if r["kind"] == "none"]


def _removed(row: dict) -> bool:
    """Every letter and digit of the planted value lies inside some finding."""
    covered = {i for f in find_pii(row["text"]) for i in range(f.start, f.end)}
    return all(i in covered for i in range(row["start"], row["end"]) if row["text"][i].isalnum())


def test_corpus_is_large_and_varied_enough_to_mean_something() -> None:
    positives, negatives = _corpus()
    assert len(positives) >= 200 and len(negatives) >= 100
    assert len({r["kind"] for r in positives}) >= 10
    assert len({r["country"] for r in positives}) >= 8
    assert all(r["text"][r["start"]:r["end"]] == r["value"] for r in positives)


def test_recall_is_at_least_95_percent_and_false_positives_at_most_3_percent_on_the_corpus() -> None:
    positives, negatives = _corpus()
    missed = [r for r in positives if not _removed(r)]
    flagged = [(r["text"], find_pii(r["text"])) for r in negatives if find_pii(r["text"])]
    planted = Counter(r["kind"] for r in positives)
    lost = Counter(r["kind"] for r in missed)
    per_kind = {kind: (n - lost[kind]) / n for kind, n in sorted(planted.items())}
    recall = 1 - len(missed) / len(positives)
    false_positives = len(flagged) / len(negatives)
    print(f"recall {recall:.1%} {per_kind}; false positives {false_positives:.1%} {flagged}")
    assert recall >= 0.95, [(r["kind"], r["value"]) for r in missed]
    assert false_positives <= 0.03, flagged
    assert min(per_kind.values()) >= 0.8, per_kind  # no kind hides in the mean


@pytest.mark.parametrize(("text", "expected"), [
    ("IBAN: DE89 3704 0044 0532 0130 00, danke", "IBAN: [IBAN], danke"),
    ("My SSN is 536-90-4399.", "My SSN is [SSN]."),
    ("NHS number 943 476 5919", "NHS number [NHS_NUMBER]"),
    ("Mijn BSN is 111222333.", "Mijn BSN is [BSN]."),
    ("passport no. 123456789 expires 2031", "passport no. [PASSPORT] expires 2031"),
    ("Please ask Dr. Anna Schmidt to review it.", "Please ask [NAME] to review it."),
    ("I live at 742 Evergreen Terrace, Springfield.", "I live at [ADDRESS], Springfield."),
    ("Rufen Sie mich unter 030 12345678 an.", "Rufen Sie mich unter [PHONE] an."),
    ("Appelez-moi au 01 42 68 53 00.", "Appelez-moi au [PHONE]."),
    ("お問い合わせは03-1234-5678まで。", "お問い合わせは[PHONE]まで。"),
    ("email me at jdoe at example dot com", "email me at [EMAIL]"),
])
def test_each_kind_is_replaced_by_its_placeholder(text: str, expected: str) -> None:
    assert scrub(text).text == expected


def test_look_alikes_survive_untouched() -> None:
    for text in ("Dr. Pepper and Mr. Robot", "ISBN 978-3-16-148410-0", "build 20240315.1 at 14:30:05",
                 "scores 12 34 56 78 90", "sum of 1..100 is 5050"):
        assert find_pii(text) == [], text


def test_report_names_the_kinds_found_in_words() -> None:
    assert describe(Counter(email=2, iban=1)) == "2 emails, 1 IBAN"
    assert describe(Counter(ipv4=1, ipv6=1, phone=1)) == "2 IP addresses, 1 phone number"
    assert describe(Counter()) == "nothing found"


def test_data_review_prints_what_kinds_were_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from commons.cli.data import data_group

    monkeypatch.setenv("COMMONS_HOME", str(tmp_path / "home"))
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Pay DE89 3704 0044 0532 0130 00; mail a@example.org or b@example.org"},
        {"role": "assistant", "content": "Done."}]}) + "\n", encoding="utf-8")
    result = CliRunner().invoke(data_group, ["review", str(chats)])
    assert result.exit_code == 0, result.output
    assert "PII removed: 2 emails, 1 IBAN" in result.output


def test_importing_the_scrubber_loads_no_detector_library_and_no_torch(tmp_path: Path) -> None:
    heavy = ("torch", "phonenumbers", "stdnum", "detect_secrets", "pyap")
    code = f"import sys, protocol.data.pii; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("text", ["1-" * 20000, "Aa-" * 20000, "Aaaa-" * 10000 + "str", "1 " * 20000,
                                  "Aaaa dot " * 5000, "a.a" * 10000 + "@", "AB1" * 20000])
def test_pathological_text_is_scanned_in_linear_time(text: str) -> None:
    start = time.perf_counter()
    find_pii(text)
    assert time.perf_counter() - start < 5  # each took over 40 s before the quantifiers were bounded

"""Index pages read as sentences: counts agree with their nouns ("1 adapter", "2 adapters")."""

from __future__ import annotations

import json
from pathlib import Path

from test_index_api import Env

from index.pages import plural


def test_counts_agree_with_their_nouns() -> None:
    assert [plural(n, "adapter") for n in (0, 1, 2)] == ["0 adapters", "1 adapter", "2 adapters"]
    assert plural(1, "federated round", with_count=False) == "federated round"


def test_the_home_page_of_an_index_with_one_adapter_says_1_adapter(tmp_path: Path) -> None:
    env = Env(tmp_path)
    envelope, cid = env.make("capitals", rounds=1)
    assert env.announce(json.loads(envelope), cid).status_code == 201
    home = env.client.get("/").text
    assert ("1 adapter · 0 datasets · " in home and "· 1 federated round</p>" in home
            and "1 adapters" not in home)
    assert "1 adapters" not in env.client.get("/stats").text

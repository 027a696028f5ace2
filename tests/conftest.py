"""Every test gets its own $COMMONS_HOME; converted base models are shared across the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Converting SmolLM2's GGUF costs ~30 s once; keep the result across runs (ignored by git).
MODEL_CACHE = Path(os.environ.get("COMMONS_TEST_CACHE", REPO / ".cache" / "models"))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("commons-home")
    monkeypatch.setenv("COMMONS_HOME", str(home))
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("COMMONS_CACHE", str(MODEL_CACHE))
    return home


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's matrices are too small to split: on a shared machine a second thread only waits."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

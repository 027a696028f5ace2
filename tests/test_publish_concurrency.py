"""Several `commons publish` processes at once, into one fresh home: each gets its own version,
no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from index.sample import write_adapter_files
from protocol.signing.manifest import AdapterMeta

COMMONS = str(Path(sys.executable).parent / "commons")


def test_concurrent_publishes_of_one_name_each_get_a_version(tmp_path: Path, isolated_home: Path) -> None:
    folders = []
    for i in range(4):
        folder = tmp_path / f"adapter-{i}"
        write_adapter_files(folder,
                            AdapterMeta(name="race", base_model="HuggingFaceTB/SmolLM2-135M-Instruct"))
        (folder / "README.md").write_text(f"run {i}\n")  # different content: four different versions
        folders.append(folder)
    procs = [subprocess.Popen([COMMONS, "publish", str(f), "--name", "race", "--license", "MIT", "--json"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for f in folders]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    for code, out, err in results:
        assert code == 0 and "Traceback" not in err, err[-3000:]
    versions = sorted(json.loads(out)["version"] for _, out, _ in results)
    assert versions == [1, 2, 3, 4]
    from index.db import IndexDB

    assert [v["version"] for v in IndexDB().versions("race")] == [4, 3, 2, 1]


def test_processes_opening_a_new_index_database_at_once_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    code = f"from index.db import IndexDB; IndexDB({url!r}).stats(); print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]  # type: ignore[union-attr]

"""CAR files: `ipfs dag export` bytes, verified import, and the `commons car` / `commons cid` commands."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from commons.cli.car import car_group
from commons.cli.cid import cid_command
from protocol.content import car, unixfs
from protocol.content.blockstore import BlockStore
from protocol.content.multiformats import CID, varint_encode
from protocol.errors import CommonsError, VerifyError

K = unixfs.CHUNK_SIZE
PLANETS_V0 = "QmWSgS32xQEcXMeqd3YPJLrNBLSdsfYCep2U7CFkyrjXwY"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COMMONS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _planets(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "mars.txt").write_bytes(b"Hello Mars!\n")
    (root / "venus.txt").write_bytes(b"Hello Venus!\n")
    return root


def test_header_is_the_dag_cbor_kubo_writes() -> None:
    cid = CID.decode(PLANETS_V0)
    expected = (
        bytes.fromhex("a2") + bytes.fromhex("65") + b"roots" + bytes.fromhex("81 d82a 5823 00")
        + cid.to_bytes()
        + bytes.fromhex("67") + b"version" + bytes.fromhex("01")
    )
    assert car.encode_header([PLANETS_V0]) == expected
    out = io.BytesIO()
    car.write_car(out, [PLANETS_V0], [])
    assert out.getvalue() == varint_encode(len(expected)) + expected
    v1 = str(cid.to_v1())
    assert b"\xd8\x2a\x58\x25\x00\x01\x70\x12\x20" in car.encode_header([v1])


def test_export_layout_is_dfs_sections(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "blocks")
    root = store.add_path(_planets(tmp_path / "planets"))
    out = io.BytesIO()
    car.write_car(out, [root], store.dag(root))
    header = car.encode_header([root])
    expected = varint_encode(len(header)) + header
    for cid, block in store.dag(root):
        raw = CID.decode(cid).to_bytes()
        expected += varint_encode(len(raw) + len(block)) + raw + block
    assert out.getvalue() == expected
    mars, venus = ("QmPrrHqJzto9m7SyiRzarwkqPcCSsKR2EB1AyqJfe8L8tN",
                   "QmU5kp3BH3B8tnWUU2Pikdb2maksBNkb92FHRr56hyghh4")
    assert [cid for cid, _ in store.dag(root)] == [PLANETS_V0, mars, venus]


def test_round_trip_into_a_fresh_store(tmp_path: Path) -> None:
    src = _planets(tmp_path / "planets")
    (src / "big.bin").write_bytes(os.urandom(3 * K))
    first = BlockStore(tmp_path / "a")
    root = first.add_path(src, 1)
    buf = io.BytesIO()
    car.write_car(buf, [root], first.dag(root))
    buf.seek(0)
    roots, blocks = car.read_car(buf)
    second = BlockStore(tmp_path / "b")
    for cid, data in blocks:
        second.put(cid, data)
    assert roots == [root] and second.missing(root) == []
    second.export(root, tmp_path / "out")
    assert (tmp_path / "out" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()


def test_tampered_block_is_refused(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "blocks")
    root = store.add_path(_planets(tmp_path / "planets"))
    buf = io.BytesIO()
    car.write_car(buf, [root], store.dag(root))
    raw = bytearray(buf.getvalue())
    raw[raw.index(b"Hello Mars")] = ord("J")
    _, blocks = car.read_car(io.BytesIO(bytes(raw)))
    with pytest.raises(VerifyError, match="does not match its CID"):
        list(blocks)


def test_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "blocks")
    root = store.add_path(_planets(tmp_path / "planets"))
    buf = io.BytesIO()
    car.write_car(buf, [root], store.dag(root))
    _, blocks = car.read_car(io.BytesIO(buf.getvalue()[:-5]))
    with pytest.raises(CommonsError, match="truncated"):
        list(blocks)
    with pytest.raises(CommonsError, match="empty CAR"):
        car.read_car(io.BytesIO(b""))
    with pytest.raises(CommonsError):
        car.read_car(io.BytesIO(b"\x05hello"))


def test_carv2_payload_is_read(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "blocks")
    root = store.add_path(_planets(tmp_path / "planets"))
    inner = io.BytesIO()
    car.write_car(inner, [root], store.dag(root))
    payload = inner.getvalue()
    pragma = bytes.fromhex("0aa16776657273696f6e02")
    offset = len(pragma) + 40
    fixed = bytes(16) + offset.to_bytes(8, "little") + len(payload).to_bytes(8, "little") + bytes(8)
    roots, blocks = car.read_car(io.BytesIO(pragma + fixed + payload + b"index bytes ignored"))
    assert roots == [root] and len(list(blocks)) == 3


# --- CLI --------------------------------------------------------------------------------------------


def test_cid_command_prints_kubos_cid(tmp_path: Path) -> None:
    runner = CliRunner()
    planets = _planets(tmp_path / "planets")
    assert runner.invoke(cid_command, [str(planets)]).output.strip() == PLANETS_V0
    result = runner.invoke(cid_command, [str(planets / "mars.txt"), "--cid-version", "1", "--json"])
    assert json.loads(result.output)["cid"] == "bafkreibmlvvgdyihetgocpof6xk64kjjzdeq2e4c7hqs3krdheosk4tgj4"
    assert "--cid-version" in runner.invoke(cid_command, ["--help"]).output


def test_cid_command_missing_file_is_one_line_naming_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(cid_command, [str(tmp_path / "nope.bin")], standalone_mode=False)
    assert isinstance(result.exception, CommonsError)
    message = str(result.exception)
    assert "nope.bin" in message and "\n" not in message


def test_car_commands_round_trip_through_commons_home(tmp_path: Path, home: Path) -> None:
    runner = CliRunner()
    root = BlockStore().add_path(_planets(tmp_path / "planets"))
    out = tmp_path / "planets.car"
    result = runner.invoke(car_group, ["export", root, str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["blocks"] == 3
    for path in (home / "blocks").rglob("*"):
        if path.is_file():
            path.unlink()
    result = runner.invoke(car_group, ["import", str(out), "--json"])
    assert json.loads(result.output) == {"roots": [root], "blocks": 3, "complete": {root: True}}
    assert runner.invoke(car_group, ["import", str(out)]).output.strip() == root


def test_car_export_of_absent_dag_names_the_fix(tmp_path: Path, home: Path) -> None:
    result = CliRunner().invoke(car_group, ["export", PLANETS_V0, str(tmp_path / "x.car")],
                                standalone_mode=False)
    assert isinstance(result.exception, CommonsError)
    assert "commons pull" in str(result.exception)
    assert not (tmp_path / "x.car").exists()
    result = CliRunner().invoke(car_group, ["import", str(tmp_path / "none.car")], standalone_mode=False)
    assert isinstance(result.exception, CommonsError) and "none.car" in str(result.exception)

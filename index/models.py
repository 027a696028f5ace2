"""Shapes of the JSON API (they are what /docs shows); the pages render the same data."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class FileEntry(BaseModel):
    path: str
    size: int
    sha256: str = ""
    cid: str = ""


class EntrySummary(BaseModel):
    cid: str
    name: str
    version: int
    kind: str
    base_model: str
    license: str
    task: str
    campaign: str
    description: str
    signer: str = Field(description="hex ed25519 key whose signature over the manifest verified")
    trusted: bool = Field(description="the signer is in this index's trusted keys")
    size: int = Field(description="total bytes of the signed files")
    rounds: int
    tokens: int = Field(description="training tokens summed over the contribution ledger")
    created: str
    pull: str = Field(description="the command that fetches and verifies it")


class EntryDetail(EntrySummary):
    meta: dict[str, Any] = Field(description="the signed AdapterMeta")
    files: list[FileEntry]
    versions: list[dict[str, Any]] = []
    cost_usd: float = Field(description="what the ledger's tokens would cost on a commercial fine-tuning API")
    license_warnings: list[str] = []


class Resolved(BaseModel):
    cid: str
    name: str
    version: int
    kind: str
    base_model: str
    license: str
    signer: str
    size: int
    created: str
    files: list[FileEntry]
    meta: dict[str, Any]


class LeaderboardRow(BaseModel):
    node: str
    rounds: int
    tokens: int
    adapters: int


class Stats(BaseModel):
    adapters: int
    adapter_versions: int
    datasets: int
    campaigns: int
    rounds: int
    tokens: int
    contributors: int
    live_nodes: int
    cost_usd: float


class Announce(BaseModel):
    envelope: str | dict[str, Any] = Field(
        description="the DSSE envelope (model.sig): base64 of its bytes, its JSON text, or the JSON object")
    cid: str = Field(description="root CID of the signed directory", max_length=200)


class Presence(BaseModel):
    node: str = Field(description="hex ed25519 public key of the node", max_length=64)
    timestamp: int = Field(description="unix seconds; must be within 5 minutes of the index's clock")
    signature: str = Field(description="hex ed25519 signature over b'commons-presence:<node>:<timestamp>'",
                           max_length=128)


class Announced(BaseModel):
    cid: str
    name: str
    version: int
    signer: str
    url: str | None = Field(None, description="the entry's page (None while pending)")
    status: str = Field("listed",
                        description="listed (201), or pending (202): the index does not hold the DAG yet")
    detail: str = ""

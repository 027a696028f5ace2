"""Licence compatibility between an adapter and the datasets it was trained on (warnings, not law)."""

from __future__ import annotations


def _is_nc(spdx: str) -> bool:
    return "-NC" in spdx.upper() or spdx.upper().startswith("LICENSEREF-NONCOMMERCIAL")


def _is_nd(spdx: str) -> bool:
    return "-ND" in spdx.upper()


def _share_alike(spdx: str) -> str | None:
    """The family a copyleft licence obliges derivatives to stay in, or None."""
    s = spdx.upper()
    if "-SA" in s:
        return "CC-BY-SA" if "-NC" not in s else "CC-BY-NC-SA"
    for family in ("AGPL", "LGPL", "GPL", "ODBL", "CDLA-SHARING"):
        if s.startswith(family):
            return family
    return None


def conflicts(adapter_license: str, datasets: list[dict]) -> list[str]:
    """One sentence per dataset whose licence the adapter's licence may violate."""
    out = []
    adapter = adapter_license or "no licence"
    for ds in datasets or []:
        name, lic = str(ds.get("name") or ds.get("cid") or "a dataset"), str(ds.get("license") or "")
        if not lic:
            out.append(f"dataset {name} declares no licence; ask its publisher before reusing this adapter")
        elif _is_nd(lic):
            out.append(f"dataset {name} is {lic} (no derivatives); an adapter trained on it may not be shared")
        elif _is_nc(lic) and not _is_nc(adapter_license):
            out.append(f"dataset {name} is {lic} (non-commercial) but the adapter is {adapter}, which allows "
                       "commercial use")
        elif (family := _share_alike(lic)) and not adapter_license.upper().startswith(family):
            out.append(f"dataset {name} is {lic} (share-alike) but the adapter is {adapter}; derivatives must "
                       f"stay under {family}")
    return out

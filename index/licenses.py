"""Licence compatibility between an adapter and the datasets it was trained on (warnings, not law).

Licences may be SPDX expressions (`protocol.data.spdx`): a dataset under `A AND B` carries both A's and B's
terms, one under `A OR B` only those of the choice that is kindest to the adapter; an adapter under
`A OR B` gives its users the choice, so each of its choices must respect the data.
"""

from __future__ import annotations

from protocol.data.spdx import alternatives


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


def _all(choices: list[frozenset[str]], test) -> bool:
    """Every choice carries a licence that passes `test` (so the terms it marks cannot be avoided)."""
    return all(any(test(lic) for lic in choice) for choice in choices)


def _families(choices: list[frozenset[str]]) -> set[str]:
    """The share-alike families a derivative must stay in, when every choice imposes one."""
    per_choice = [{f for lic in choice if (f := _share_alike(lic))} for choice in choices]
    return set().union(*per_choice) if all(per_choice) else set()


def conflicts(adapter_license: str, datasets: list[dict]) -> list[str]:
    """One sentence per dataset whose licence the adapter's licence may violate."""
    out = []
    adapter = adapter_license or "no licence"
    offers = alternatives(adapter_license) if adapter_license.strip() else [frozenset()]
    for ds in datasets or []:
        name, lic = str(ds.get("name") or ds.get("cid") or "a dataset"), str(ds.get("license") or "")
        choices = alternatives(lic) if lic.strip() else []
        families = _families(choices)
        if not lic:
            out.append(f"dataset {name} declares no licence; ask its publisher before reusing this adapter")
        elif _all(choices, _is_nd):
            out.append(f"dataset {name} is {lic} (no derivatives); "
                       "an adapter trained on it may not be shared")
        elif _all(choices, _is_nc) and not _all(offers, _is_nc):
            out.append(f"dataset {name} is {lic} (non-commercial) but the adapter is {adapter}, which allows "
                       "commercial use")
        elif families and not _all(offers, lambda x, fs=tuple(families): x.upper().startswith(fs)):
            out.append(f"dataset {name} is {lic} (share-alike) but the adapter is {adapter}; derivatives "
                       f"must stay under {' or '.join(sorted(families))}")
    return out

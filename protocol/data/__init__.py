"""The data commons: chat `messages` JSONL with a licence and a source per record.

    records.py   read JSONL with line-numbered one-line errors (training and eval data)
    dataset.py   validate, import ShareGPT, scrub PII, dedupe (`prepare`), and licence checks
    spdx.py      SPDX licence expressions read as the alternatives a user may pick from
    pii/         personal data and secrets found and replaced before anything is published

Main path: `commons data add FILE` → `dataset.prepare` (records → checks → `pii.scrub`) → published
like an adapter (signed, content-addressed).
"""

"""The public index: a registry of signed adapters and datasets (db), served as pages, JSON and blocks (app).

Modules: `schema` (tables), `db` (IndexDB: register/search/resolve), `app` (create_app), `api` (JSON),
`pages` (Jinja2 pages), `present` / `licenses` (pure helpers), `ratelimit` (write limits), `sample`
(real signed sample entries for tests and benchmarks).
"""

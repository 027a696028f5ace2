"""The public index: a registry of signed adapters and datasets (db), served as pages, JSON and blocks (app).

Modules: `schema` (tables), `db` (IndexDB: register/search/resolve), `admit` (an announcement is listed
once its DAG is held and checks out), `app` (create_app), `api` (JSON, with `models` its shapes), `pages`
(Jinja2 pages), `present` (what the pages and the API both show), `licenses` (licence conflicts),
`ratelimit` (write limits), `gossip` (the index as a libp2p peer), `sample` (real signed sample entries
for tests and benchmarks).
"""

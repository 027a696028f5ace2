"""The public index: a registry of signed adapters and datasets, served as pages, JSON and blocks.

    schema.py    the tables;  db.py  `IndexDB`: register, search, resolve (the one source of versions)
    admit.py     an announcement is listed once its DAG is held and checks out
    app.py       `create_app(db, store)`: mounts the API, the pages and the trustless gateway (/ipfs/CID)
    api.py       JSON under /api (its shapes in models.py)
    pages.py     the HTML pages, one route each in `make_router`, over templates/NAME.html (Jinja2)
    present.py   what the pages and the API both show (summaries, details)
    licenses.py  licence conflicts;  ratelimit.py  write limits
    gossip.py    the index as a libp2p peer: ingests signed announcements
    routing.py   /routing/v1 (Delegated Routing V1): who provides a CID, from what gossip verified
    sample.py    real signed sample entries for tests and benchmarks

A new page is one route in `pages.make_router` plus its template in templates/; what it shows that the
API shows too goes in present.py. Main path of an adapter: gossip or POST /api/announce → admit → db.
"""

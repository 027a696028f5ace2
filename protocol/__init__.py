"""The shared library every role imports: wire contracts, content addressing, signing, the data commons.

Importing it never imports torch. Its parts:

    content/    Kubo-identical content addressing: CIDs (`multiformats`), dag-pb and UnixFS DAGs
                (`dagpb`, `unixfs`), CAR files (`car`), the block store (`blockstore`), verified fetching
                from any block source (`fetch`, `gateway`), Kubo RPC and pinning services (`kubo`, `pinning`).
    signing/    who signed what: the ed25519 identity (`keys`), DSSE envelopes (`dsse`), the signed
                adapter manifest (`manifest`), whose signatures we accept (`trust`).
    data/       the data commons: chat JSONL records (`records`), datasets and their checks (`dataset`),
                SPDX licences (`spdx`), PII scrubbing (`pii/`).
    p2p/        libp2p: block exchange, signed gossipsub announcements, name resolution.
    instruction.py  the coordinator's training instruction and a node's query answer, typed
                (`TrainInstruction`, `NodeInfo`, `Capability`: built at one end, read at the other).
    update.py   a volunteer's training update on the wire (encode on the node, decode on the coordinator).
    packed.py   many named arrays as one buffer across Flower, both directions.
    publishing.py  the one publish path: next version from the index, sign, store, register (`publish`).
    errors.py   `CommonsError`: the one line a user sees. `home.py`: where state lives ($COMMONS_HOME).

The main path of an adapter: trained → `signing.manifest.sign_directory` → `content.unixfs.import_directory`
into a `content.blockstore.BlockStore` → announced over `p2p` → `content.fetch.fetch_dag` on the puller →
`signing.manifest.verify_directory`. Model loading and LoRA live in the `modeling` package, not here.
"""

"""The volunteer: `commons node start` joins a campaign, trains its shard of the adapter, sends it back.

Main path of one instruction:

    SuperNode (--isolation process) → runner.py → client_app.py → worker.py → limits.py → data.py → train.py
    (Flower's process protocol)   (warm, installed   (Flower ↔     (one round:  (the         (its      (load,
                                    code only)        typed)        plan, train) volunteer's  records)  wrap,
                                                                                 bounds)                loop)

    runner.py      the long-lived ClientApp runner: runs only the installed node.client_app, keeps the base
                   model warm across rounds and campaigns, refuses a coordinator's own code
    client_app.py  Flower's ClientApp: a message in, `protocol.instruction` types out to the worker
    worker.py      Flower-free: the query answer and one training round (memory plan, warm model, upload)
    limits.py      what this volunteer agrees to do (`[node_limits]` in config.toml), checked first
    data.py        the round's records: the local file, or this node's slice of the campaign's datasets
    train.py       the LoRA training loop (micro-batches, accumulation, checkpointing)
    resume.py      the mid-round checkpoint a restarted volunteer resumes from
    hardware.py    what this machine can lend (accelerator, memory, cores), for the shard plan
    idle.py        `--idle-only`: train only while nobody else uses the machine
    settings.py    `NodeSettings`: home, data file and what the volunteer lends
    flower_keys.py the SuperNode key a closed campaign admits

Models and LoRA come from `modeling/`; the wire types from `protocol/`. node/ never imports coordinator/.
"""

"""medfound.fed: federated training with Flower — centers train together, images stay put.

The pieces, in the order a round uses them (see DESIGN.md for where fed sits):

    settings.py    the fed.* config keys, validated before anything starts
    protocol.py    what each message carries, both ways, and the version check
    params.py      network weights ⇄ Flower ArrayRecords (float32 or float16), payload bytes
    client_app.py  the ClientApp at each center: train with medfound.train.fit, evaluate
                   (LUNA16 CPM), audit every message both ways, keep failures' details local
    chain.py       hash-chained, signed JSON-lines logs and their check (which record broke)
    audit.py       a center's audit log, the coordinator's receipts, their table, their
                   check and their reconciliation (`medfound center audit`, `fed reconcile`)
    screening.py   the coordinator's checks on each update before aggregation
    strategies.py  configs/fed/<name>.yaml → Flower's Message-API strategy, and its state
    secagg.py      fed.privacy.secagg: Flower's SecAgg+ in the round loop, both ends
    server_app.py  the ServerApp: the round loop, checkpoint/resume, cross-site, package
    reporting.py   the round records, metrics.json, the privacy report, MLflow metrics
    simulation.py  simulation mode: one virtual SuperNode per center, Flower's engine on Ray
    deployment.py  deployment mode: SuperLink / SuperNode commands (TLS, node auth) and the
                   Flower App `flwr run` submits; the apps Flower loads by name
    worker.py      a center's long-lived worker beside its SuperNode, and the light ClientApp
                   that relays each message to it (no torch import per message)

The recipe is recipes/federate.py (`medfound run federate ...`). The ServerApp and ClientApp
are plain Flower apps: simulation gives each virtual center its folders through `Site`s,
a SuperNode gives them through its node config (deployment mode).
Importing this package imports nothing heavy; the modules above import Flower and torch.
"""

"""Sessions (layer 5 of 8, see README, Architecture): the work a cluster does for a prompt, over the wire.

    slices.py    node id, a worker's slice cache on disk, a root's slices hashed once per plan shape
    worker.py    a worker's side: Session -> Need -> weights -> mesh -> Ready -> Steps -> Stop
    root.py      a root's side: Hello, plan, weight push, mesh, build; ClusterEngine drives the Steps
    service.py   a root daemon's prompts: model, tokens, engine (kept warm), generation, answers
    progress.py  the set-up's progress as events (weight push, engine build), for whoever shows them
"""

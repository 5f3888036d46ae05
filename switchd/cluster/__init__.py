"""Several GPU hosts behind one front door.

Each host runs its own switchd, the authority for its GPUs; the gateway
(gateway.py) routes requests to them by what their snapshots say (routing.py).
Where the snapshots come from is a directory (directory.py): Ray actors, one per
host (ray_directory.py, agent.py), or a fixed list of addresses. Nothing here
imports `ray` until a Ray directory is made: single-host switchd never loads it.
"""

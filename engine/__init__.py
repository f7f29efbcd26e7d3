"""pstar's heterogeneous chunk-based training engine.

`model, optimizer = initialize_engine(model_func=..., local_rank=0, config={...})`; see engine/api.py.
"""

from engine.api import initialize_engine

__all__ = ["initialize_engine"]

"""pstar's heterogeneous chunk-based training engine.

`model, optimizer = initialize_engine(model_func=..., local_rank=0, config={...})`; see engine/api.py.
The config is PatrickStar's dict (or a typed `EngineConfig`), checked by engine/config.py. The names
below are the engine's public surface; everything else is internal to its modules.
"""

from engine.api import initialize_engine
from engine.config import (ConfigProblems, EngineConfig, EngineConfigError, engine_config_problems,
                           resolve_engine_config)
from engine.errors import EngineError, ModelTooLargeError

__all__ = [
    "ConfigProblems", "EngineConfig", "EngineConfigError", "EngineError", "ModelTooLargeError",
    "engine_config_problems", "initialize_engine", "resolve_engine_config",
]

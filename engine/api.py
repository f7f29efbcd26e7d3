"""The seed's entry point (being built)."""


def initialize_engine(model_func, local_rank=0, config=None):
    raise NotImplementedError("the engine is being built")

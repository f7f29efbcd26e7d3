"""Shared pytest set-up: GPU tests skip themselves where CUDA is absent; tests marked
`engine_on_cpu` (and not `gpu`) run the engine on the CPU wherever they run."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; no GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _engine_on_cpu_where_marked(request):
    node = request.node
    if node.get_closest_marker("engine_on_cpu") is None or node.get_closest_marker("gpu") is not None:
        yield
        return
    from tests.engine_models import engine_on_cpu

    with engine_on_cpu():
        yield

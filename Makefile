# Set-up is part of every target: the first run builds .venv, later runs reuse it.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.pstar-installed
# A pinned CPU build: a machine without torch never pulls a multi-GB CUDA build by accident.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-slow test-gpu test-install setup clean

setup: $(STAMP)

# --system-site-packages keeps a GPU machine's own CUDA torch visible inside the venv.
# Machines without a package registry already have setuptools, so the build runs in place there.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install "$(TORCH_SPEC)"
	if $(VPY) -c "import setuptools" 2>/dev/null; then \
	    $(VPY) -m pip install --no-build-isolation -e '.[test,hf]'; \
	else \
	    $(VPY) -m pip install -e '.[test,hf]'; \
	fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pstar train configs/tiny.yaml

test: $(STAMP)
	$(VPY) -m pytest -q

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(VPY) -m pytest -q -m gpu

# pstar installed as a user would, in a venv without the system's packages: train, checkpoint, resume
test-install:
	bash scripts/check_clean_install.sh

clean:
	rm -rf $(VENV) build *.egg-info outputs runs .pytest_cache

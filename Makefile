# The README's two commands: `make demo` (main job) and `make test` (the test suite).
# Both set the machine up first, so each works by itself on a fresh Debian machine.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEMO := /tmp/poolfs-demo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-packages demo demo-umount test lint

system-packages:
	@if ! command -v fusermount3 >/dev/null || ! ldconfig -p | grep -q 'libfuse3\.so\.3' \
		|| ! command -v systemd-analyze >/dev/null || ! command -v curl >/dev/null; then \
		echo "installing fuse3, libfuse3, systemd (systemd-analyze) and curl (apt)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 libfuse3-3 systemd curl; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

setup: system-packages $(VENV)/.installed

# The main job, as on an execution node: mountd (embedded file:// store) mounts a data pool
# for an execution; the pool is made, filled and shared with `poolfs pool`, and the mount is
# requested with a grant over mountd's HTTP API (a Unix socket).
DEMO_SOCK := $(DEMO)/mountd.sock
DEMO_STORE := file://$(DEMO)/store
DEMO_APP := d1b2c3d4-e5f6-7890-1234-567890abcdef
API := curl -sS --fail-with-body --unix-socket $(DEMO_SOCK)

demo: setup
	@$(MAKE) --no-print-directory demo-umount >/dev/null 2>&1 || true
	@rm -rf $(DEMO) && mkdir -p $(DEMO)/sample/reports
	@printf 'Hello\n' > $(DEMO)/sample/hello.txt
	@printf 'World\n' > $(DEMO)/sample/world.txt
	@printf 'id,value\n1,42\n2,17\n' > $(DEMO)/sample/reports/numbers.csv
	@(umask 077; head -c 48 /dev/urandom | base64 > $(DEMO)/grant-secret)
	@printf '%s\n' 'socket_path = "$(DEMO_SOCK)"' 'mount_root = "$(DEMO)/mnt"' \
		'store_url = "$(DEMO_STORE)"' 'spill_dir = "$(DEMO)/spill"' \
		'grant_secret_file = "$(DEMO)/grant-secret"' 'allow_other = false' > $(DEMO)/mountd.toml
	@echo "== start mountd (settings: $(DEMO)/mountd.toml, log: $(DEMO)/mountd.log)"
	@setsid $(VENV)/bin/mountd serve --config $(DEMO)/mountd.toml \
		> $(DEMO)/mountd.log 2>&1 < /dev/null & echo $$! > $(DEMO)/mountd.pid
	@for i in $$(seq 100); do $(API) http://mountd/healthz >/dev/null 2>&1 && break; sleep 0.2; done; \
		$(API) http://mountd/healthz >/dev/null || { tail -20 $(DEMO)/mountd.log; exit 1; }
	@echo "== create a pool owned by tenant-a and upload the sample files"
	$(VENV)/bin/poolfs pool create --name demo-pool --owner tenant-a --store $(DEMO_STORE) \
		> $(DEMO)/pool-id
	$(VENV)/bin/poolfs pool upload $$(cat $(DEMO)/pool-id) $(DEMO)/sample --store $(DEMO_STORE)
	$(VENV)/bin/poolfs pool list --store $(DEMO_STORE)
	@echo "== tenant-a requests a VIEW grant for its application"
	$(API) -H 'X-Poolfs-Tenant: tenant-a' -H 'Content-Type: application/json' \
		-d '{"applicationId": "$(DEMO_APP)", "permission": "VIEW"}' \
		http://mountd/datapools/$$(cat $(DEMO)/pool-id)/grants > $(DEMO)/grant.json
	@echo "== mount execution 'demo' with the grant attached to its DataPool reference"
	@$(PY) -c 'import json; pool = open("$(DEMO)/pool-id").read().strip(); \
		token = json.load(open("$(DEMO)/grant.json"))["token"]; \
		ref = {"id": pool, "ref": "DATAPOOL", "grant": token}; \
		print(json.dumps({"executionId": "demo", "applicationId": "$(DEMO_APP)", \
		"creatorTenantId": "tenant-a", "body": {"data": {}, "my_dataset": ref}}))' \
		> $(DEMO)/execution.json
	$(API) -H 'Content-Type: application/json' -d @$(DEMO)/execution.json \
		http://mountd/executions | $(PY) -m json.tool
	ls -l $(DEMO)/mnt/demo/my_dataset $(DEMO)/mnt/demo/my_dataset/reports
	cat $(DEMO)/mnt/demo/my_dataset/hello.txt $(DEMO)/mnt/demo/my_dataset/reports/numbers.csv
	$(PY) -c 'from poolfs.datapool import DataPool; pool = DataPool("$(DEMO)/mnt/demo/my_dataset", \
		name="my_dataset"); print(pool.list_files()); print(pool.open("world.txt").read(), end="")'
	@echo
	@echo "Execution 'demo' is mounted read-only (VIEW grant) at $(DEMO)/mnt/demo/my_dataset."
	@echo "Unmount it:  curl -X DELETE --unix-socket $(DEMO_SOCK) http://mountd/executions/demo"
	@echo "Unmount everything and stop mountd:  make demo-umount"

demo-umount:
	@if [ -S $(DEMO_SOCK) ]; then $(API) -X DELETE http://mountd/executions/demo >/dev/null 2>&1 || true; fi
	@if [ -f $(DEMO)/mountd.pid ] && grep -qa 'mountd.serve' /proc/$$(cat $(DEMO)/mountd.pid)/cmdline 2>/dev/null; then \
		kill -TERM $$(cat $(DEMO)/mountd.pid); \
		while kill -0 $$(cat $(DEMO)/mountd.pid) 2>/dev/null; do sleep 0.1; done; \
		echo "mountd stopped; everything unmounted"; fi
	@if [ -f $(DEMO)/mountd.toml ]; then $(VENV)/bin/mountd cleanup --config $(DEMO)/mountd.toml >/dev/null; fi
	@if findmnt $(DEMO)/mnt >/dev/null 2>&1; then $(VENV)/bin/poolfs umount $(DEMO)/mnt; fi

lint: setup
	$(VENV)/bin/ruff check poolfs mountd tests bench
	$(VENV)/bin/ruff format --check poolfs mountd tests bench
	$(VENV)/bin/mypy --strict poolfs mountd

test: setup lint
	$(VENV)/bin/pytest -q

# Quick start (README): `make demo` and `make test` on a fresh Debian machine.
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := git xz-utils public-inbox linux-source-6.1 linux-source-6.12 groovy \
	build-essential flex bison bc libelf-dev libssl-dev cpio ccache \
	qemu-system-x86 qemu-utils seabios busybox-static dropbear-bin kexec-tools \
	openssh-client openssh-server openssh-sftp-server util-linux grub-pc-bin mtools
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system venv demo test clean

setup: system venv

system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi
	@# the Jenkinsfile's linter (tests/test_jenkinsfile.py); runs on the system's Java, no download at run time
	@command -v npm-groovy-lint >/dev/null || $(SUDO) npm install -g -q npm-groovy-lint@16.2.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: setup
	$(VENV)/bin/kpatchtest run series/demo.yaml --out out/demo

# The tests build their kernels in the demo's cache with the demo's recipe, so `make demo`
# after `make test` (as .ci/run does) reuses every build and costs only its boots.
test: setup
	KPATCHTEST_TEST_CACHE="$${KPATCHTEST_TEST_CACHE:-$$($(PY) -c 'from kpatchtest.kernelrepo import default_cache_dir; print(default_cache_dir())')}" \
	  $(PY) -m pytest -q

clean:
	rm -rf $(VENV) out

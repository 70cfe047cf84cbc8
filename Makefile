# qubes-reflink: build, install, test, lint, demo, benchmarks.
PYTHON ?= python3
DESTDIR ?=
PYTHON_FILES := qubes_reflink tests benchmarks setup.py demo.py

.PHONY: all install rpm system-deps deps test lint format demo bench stress powercut mutants clean

all:
	$(PYTHON) setup.py build

# --install-scripts: Debian's Python turns --prefix /usr into /usr/local;
# the console script belongs in /usr/bin whatever the platform, and runs
# dom0's /usr/bin/python3 whatever Python builds it. SITELIB: where the
# package goes (the RPM gives its release's site-packages).
SCRIPT_PYTHON ?= /usr/bin/python3
SITELIB ?=
install:
	$(PYTHON) setup.py build_scripts --executable $(SCRIPT_PYTHON) \
		install -O1 --root $(DESTDIR)/ --prefix /usr \
		--install-scripts /usr/bin $(if $(SITELIB),--install-lib $(SITELIB))

# Local RPM build for one Qubes release (RELEASE=R4.3, the default, or
# RELEASE=R4.2): built by that release's dom0 Python (found as the tests
# find it), for its site-packages, requiring its python(abi), with its
# Fedora's dist tag. The tarball is made with `git archive` (of the working
# tree, tracked and untracked files that .gitignore does not exclude, or of
# a commit with GIT_REF=HEAD), the spec from rpm_spec/qubes-reflink.spec.in
# with @VERSION@/@CHANGELOG@ substituted, `rpmbuild -ba` under
# $(RPM_TOPDIR). When the rpm database is not the system's package
# database (e.g. Debian's rpm), build dependencies cannot be checked
# (--nodeps).
VERSION := $(shell cat version)
RELEASE ?= R4.3
release_python.R4.2 := 3.11
release_python.R4.3 := 3.13
release_dist.R4.2 := .fc37
release_dist.R4.3 := .fc41
RPM_PY_VERSION = $(or $(release_python.$(RELEASE)),$(error RELEASE=$(RELEASE) \
	is not a release this package is built for: use R4.2 or R4.3))
RPM_PYTHON = $(shell $(PYTHON) tests/hosts.py $(RPM_PY_VERSION))
RPM_TOPDIR ?= $(CURDIR)/build/rpmbuild-$(RELEASE)
GIT_REF ?=
RPM_DEFINES = --define "_topdir $(RPM_TOPDIR)" \
	--define "__python3 $(RPM_PYTHON)" \
	--define "python3_version $(RPM_PY_VERSION)" \
	--define "python3_sitelib /usr/lib/python$(RPM_PY_VERSION)/site-packages" \
	--define "dist $(release_dist.$(RELEASE))" \
	$(if $(shell rpm -q --quiet rpm 2>/dev/null && echo y),,--nodeps)

rpm:
	@[ -n "$(RPM_PYTHON)" ] || { $(PYTHON) tests/hosts.py $(RPM_PY_VERSION); exit 1; }
	cd $(RPM_TOPDIR) 2>/dev/null && rm -rf BUILD BUILDROOT RPMS SRPMS SOURCES SPECS index changelog || true
	mkdir -p $(RPM_TOPDIR)/SOURCES $(RPM_TOPDIR)/SPECS
	set -e; tree='$(GIT_REF)'; \
	if [ -z "$$tree" ]; then \
		tree=$$(export GIT_INDEX_FILE=$(RPM_TOPDIR)/index; \
			git add -A . && git write-tree); \
	fi; \
	git archive --format=tar.gz --prefix=qubes-reflink-$(VERSION)/ \
		-o $(RPM_TOPDIR)/SOURCES/qubes-reflink-$(VERSION).tar.gz $$tree
	{ printf '* %s %s - %s-1\n' "$$(LC_ALL=C date +'%a %b %d %Y')" \
		"$$(git log -1 --format='%an <%ae>')" '$(VERSION)'; \
	  printf -- '- Local build (make rpm) of %s\n' \
		"$(or $(GIT_REF),the working tree at $$(git describe --always --dirty))"; \
	} >$(RPM_TOPDIR)/changelog
	sed -e 's/@VERSION@/$(VERSION)/' \
		-e '/@CHANGELOG@/{r $(RPM_TOPDIR)/changelog' -e 'd}' \
		rpm_spec/qubes-reflink.spec.in >$(RPM_TOPDIR)/SPECS/qubes-reflink.spec
	rpmbuild -ba $(RPM_DEFINES) $(RPM_TOPDIR)/SPECS/qubes-reflink.spec

# The Python of each tested Qubes release, each in a virtual environment
# of the project (.venv/py3.11, .venv/py3.13; never a system interpreter):
# R4.2's 3.11 and R4.3's 3.13, made from the machine's own Python, or one
# found on PATH, under pyenv or uv (tests/hosts.py --base says which).
VENV := .venv
PY311 := $(VENV)/py3.11/bin/python
PY313 := $(VENV)/py3.13/bin/python
TEST_PYTHONS = $(PY311) $(PY313)
# PARTIAL=1: run what can run here, list what did not (else a skip fails)
PYTEST_ARGS = -q $(if $(filter 1,$(PARTIAL)),-rs)
# the qubes-core-admin trees of the real-host tests: beside the checkout
# (../shared), named by QUBES_CORE_ADMIN_TREES, or fetched into a cache
HOST_TREES = trees=$$($(PY311) tests/hosts.py --trees) || exit 1; \
	export QUBES_CORE_ADMIN_TREES=$$trees;

$(VENV)/py%/bin/python:
	@base=$$($(PYTHON) tests/hosts.py --base $*) || exit 1; \
	echo "making $(VENV)/py$* from $$base"; \
	$$base -m venv $(VENV)/py$*

# Test and tooling dependencies, by name (the driver itself needs none):
# system tools (installed as root, or named), then pip in each venv.
system-deps:
	PARTIAL=$(PARTIAL) sh tools/ensure-system-deps

deps: system-deps $(PY311) $(PY313)
	for py in $(TEST_PYTHONS); do \
		$$py -m pip install -q --upgrade pip && \
		$$py -m pip install -q -e '.[test]' || exit 1; \
	done

# The whole suite under each release's Python; the real-host tests run each
# release's qubes-core-admin tree under its own Python either way.
test: deps lint
	@$(HOST_TREES) \
	for py in $(TEST_PYTHONS); do \
		echo "== pytest under $$($$py --version)"; \
		PARTIAL=$(PARTIAL) $$py -m pytest $(PYTEST_ARGS) || exit 1; \
	done

lint: deps
	$(PY311) -m black --check --line-length 80 $(PYTHON_FILES)
	$(PY311) -m pylint --rcfile=.pylintrc qubes_reflink

format: deps
	$(PY311) -m black --line-length 80 $(PYTHON_FILES)

demo: deps
	$(PY311) demo.py

bench: deps
	$(PY311) -m pip install -q -e '.[bench]'
	$(PY311) -m benchmarks

stress: deps
	@$(HOST_TREES) $(PY311) -m pytest -q -m slow -p no:cacheprovider

# Every flush point of every operation on btrfs, XFS and ext4, with seeded
# subsets of the writes after each (make test checks a sample); prints the
# figures table of README's Reliability section.
powercut: deps
	$(PY311) -m pytest -q -m slow -p no:cacheprovider tests/test_powercut.py

# Each mutant of tests/mutants.py (a driver that breaks one safety claim)
# hunted through every power-cut campaign until caught; prints caught or
# missed for each (make test runs the fast subset, tests/test_mutants.py).
mutants: deps
	$(PY311) tests/mutants.py

clean:
	rm -rf build dist *.egg-info

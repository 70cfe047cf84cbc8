# qubes-reflink: build, install, test, lint, demo, benchmarks.
PYTHON ?= python3
DESTDIR ?=
PYTHON_FILES := qubes_reflink tests benchmarks setup.py demo.py

.PHONY: all install rpm deps test lint format demo bench stress clean

all:
	$(PYTHON) setup.py build

# --install-scripts: Debian's Python turns --prefix /usr into /usr/local;
# the console script belongs in /usr/bin whatever the platform.
install:
	$(PYTHON) setup.py install -O1 --root $(DESTDIR)/ --prefix /usr \
		--install-scripts /usr/bin

# Local RPM build: tarball made with `git archive` (of the working tree,
# tracked and untracked files that .gitignore does not exclude, or of a
# commit with GIT_REF=HEAD), spec from rpm_spec/qubes-reflink.spec.in with
# @VERSION@/@CHANGELOG@ substituted, `rpmbuild -ba` under $(RPM_TOPDIR).
# A plain rpm (e.g. Debian's) lacks Fedora's python-rpm-macros: the missing
# macros are defined from $(PYTHON) the way Fedora computes them. When the
# rpm database is not the system's package database, build dependencies
# cannot be checked (--nodeps).
VERSION := $(shell cat version)
RPM_TOPDIR ?= $(CURDIR)/build/rpmbuild
GIT_REF ?=
rpm_define_missing = $(if $(shell rpm --eval '%{?$(1)}' 2>/dev/null),,--define "$(1) $(2)")
RPM_DEFINES = --define "_topdir $(RPM_TOPDIR)" \
	$(call rpm_define_missing,__python3,$(shell $(PYTHON) -c 'import sys; print(sys.executable)')) \
	$(call rpm_define_missing,python3_sitelib,$(shell RPM_BUILD_ROOT= $(PYTHON) -Ic "import sysconfig; print(sysconfig.get_path('purelib', vars={'platbase': '/usr', 'base': '/usr'}))")) \
	$(call rpm_define_missing,python3_version,$(shell $(PYTHON) -c 'import sys; print("{}.{}".format(*sys.version_info))')) \
	$(if $(shell rpm -q --quiet rpm 2>/dev/null && echo y),,--nodeps)

rpm:
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

# The Python of each tested Qubes release: R4.2's (3.11, this machine's
# python3) and R4.3's (3.13, found on PATH or under pyenv).
PYTHON_R43 ?= $(shell $(PYTHON) tests/hosts.py 3.13)
TEST_PYTHONS = $(PYTHON) $(PYTHON_R43)
# PARTIAL=1: run what can run here, list what did not (else a skip fails)
PYTEST_ARGS = -q $(if $(filter 1,$(PARTIAL)),-rs)

# Test and tooling dependencies, by name (the driver itself needs none):
# system tools (installed as root, or named), then pip for each Python.
deps:
	PARTIAL=$(PARTIAL) sh tools/ensure-system-deps
	@[ -n "$(PYTHON_R43)" ] || { echo "Python 3.13 not found: install it (pyenv install 3.13)"; exit 1; }
	for py in $(TEST_PYTHONS); do $$py -m pip install -q -e '.[test]' || exit 1; done

# The whole suite under each release's Python; the real-host tests run each
# release's qubes-core-admin tree under its own Python either way.
test: deps lint
	for py in $(TEST_PYTHONS); do \
		echo "== pytest under $$($$py --version)"; \
		PARTIAL=$(PARTIAL) $$py -m pytest $(PYTEST_ARGS) || exit 1; \
	done

lint:
	$(PYTHON) -m black --check --line-length 80 $(PYTHON_FILES)
	$(PYTHON) -m pylint --rcfile=.pylintrc qubes_reflink

format:
	$(PYTHON) -m black --line-length 80 $(PYTHON_FILES)

demo: deps
	$(PYTHON) demo.py

bench: deps
	$(PYTHON) -m pip install -q -e '.[bench]'
	$(PYTHON) -m benchmarks

stress: deps
	$(PYTHON) -m pytest -q -m slow -p no:cacheprovider

clean:
	rm -rf build dist *.egg-info

# ngx_http_loyalty_module
#
#   make run     install what is missing, build, start redis + nginx demo
#   make run-cluster  the same demo on a local 3-master Redis Cluster
#   make test    install what is missing, build, run every test
#   make deb     install what is missing, build the Debian package
#                libnginx-mod-http-loyalty in build/deb/, run lintian on it
#
# NGINX_SRC=/path/to/nginx-1.x.y builds against a full nginx source tree
# instead of Debian's nginx-dev (/usr/share/nginx/src).

PYTHON    = /usr/bin/python3
NGINX_SRC ?= /usr/share/nginx/src
NGINX_BIN ?= /usr/sbin/nginx
MODULE    = build/ngx_http_loyalty_module.so

SOURCES   = config $(wildcard ngx_module/*.c ngx_module/*.h ngx_module/*.lua)

CFLAGS_UNIT = -g -O1 -Wall -Wextra -Werror -Wno-unused-parameter \
              -I ngx_module -I build/nginx/objs \
              -I build/nginx/src/core -I build/nginx/src/os/unix \
              -I build/nginx/src/event -I build/nginx/src/event/quic

.PHONY: all build run run-cluster test unit integration build-static clean deps-run \
        deps-test deps-deb deb deb-check test-fresh

all: build

build: $(MODULE)

$(MODULE): $(SOURCES)
	NGINX_SRC=$(NGINX_SRC) tools/build-module

deps-run:
	tools/install-deps run

deps-test:
	tools/install-deps test build/src

deps-deb:
	tools/install-deps deb

run: deps-run
	$(MAKE) build
	tools/run-demo

# redis-server and redis-tools (redis-cli --cluster) come with deps-run
run-cluster: deps-run
	$(MAKE) build
	tools/run-demo --cluster

test: deps-test
	$(MAKE) build
	$(MAKE) unit
	$(MAKE) integration
	$(MAKE) fuzz-regress
	$(MAKE) build-static

build/unit/test_rules: tests/unit/test_rules.c ngx_module/ngx_http_loyalty_rules.c \
                       ngx_module/ngx_http_loyalty_rules.h $(MODULE)
	@mkdir -p build/unit
	$(CC) $(CFLAGS_UNIT) -o $@ tests/unit/test_rules.c \
	    ngx_module/ngx_http_loyalty_rules.c -lcmocka -lcrypto

unit: build/unit/test_rules
	build/unit/test_rules
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_docs.py \
	    tests/test_install_deps.py

integration: $(MODULE)
	NGINX_BIN=$(NGINX_BIN) LOYALTY_MODULE=$(CURDIR)/$(MODULE) \
	    $(PYTHON) -m pytest -q tests/integration

# the same sources as a static and as a dynamic module of a full nginx tree
build-static:
	tools/build-full build/src

# the packaging is in tools/deb/; tools/build-deb builds in build/deb/
deb: deps-deb
	tools/build-deb
	$(MAKE) deb-check

# lintian on the .changes: the .deb, its -dbgsym and the .buildinfo
deb-check:
	lintian --fail-on error --display-info build/deb/*.changes
	@echo "lintian: no errors; the package:" \
	    build/deb/libnginx-mod-http-loyalty_*.deb

# the two commands and the package on fresh Debian 12 and 13 chroots
# (tools/test-fresh: root, debootstrap, about 15 minutes a suite)
test-fresh:
	tools/test-fresh $(FRESH_SUITES)

clean:
	rm -rf build

# make fuzz, make test-asan, make test-valgrind
-include tests/fuzz/fuzz.mk

# make bench
-include bench/bench.mk

# make bench       baseline / module / lua throughput and latency, alternated,
#                  plus the slow-Redis case; results in bench/results.md
# make bench-rss   worker RSS over BENCH_RSS_REQUESTS (1,000,000) checkouts
# make bench-counters, make bench-insns: what the counters cost, below
# make bench-script  Redis instructions per credit script run (callgrind)
#
# BENCH_SECONDS=10 BENCH_ROUNDS=2 BENCH_CONNECTIONS=50 and the other BENCH_*
# variables of bench/README.md are read from the environment.

.PHONY: bench bench-rss bench-counters bench-insns bench-script deps-bench

deps-bench:
	tools/install-deps bench

bench: deps-bench $(MODULE)
	NGINX_BIN=$(NGINX_BIN) LOYALTY_MODULE=$(CURDIR)/$(MODULE) \
	    $(PYTHON) bench/bench.py bench

bench-rss: deps-bench $(MODULE)
	NGINX_BIN=$(NGINX_BIN) LOYALTY_MODULE=$(CURDIR)/$(MODULE) \
	    $(PYTHON) bench/bench.py rss

# make bench-counters   the module against the same module built with the
#                       counter updates compiled out (module-b), alternated
COUNTERS_OFF = build/bench/ngx_http_loyalty_module-nocounters.so

$(COUNTERS_OFF): $(SOURCES)
	LOYALTY_CFLAGS=-DNGX_HTTP_LOYALTY_NO_COUNTERS=1 \
	    LOYALTY_OUT=$(CURDIR)/$@ NGINX_SRC=$(NGINX_SRC) tools/build-module

bench-counters: deps-bench $(MODULE) $(COUNTERS_OFF)
	NGINX_BIN=$(NGINX_BIN) LOYALTY_MODULE=$(CURDIR)/$(MODULE) \
	    BENCH_MODULE_B=$(CURDIR)/$(COUNTERS_OFF) \
	    BENCH_CONFIGS="$${BENCH_CONFIGS:-module module-b}" \
	    BENCH_SLOW=$${BENCH_SLOW:-0} BENCH_SECTION=bench-counters \
	    $(PYTHON) bench/bench.py bench

# make bench-insns   instructions per checkout under callgrind: baseline,
#                    module and module-b (the module without counters)
bench-insns: deps-bench $(MODULE) $(COUNTERS_OFF)
	NGINX_BIN=$(NGINX_BIN) LOYALTY_MODULE=$(CURDIR)/$(MODULE) \
	    BENCH_MODULE_B=$(CURDIR)/$(COUNTERS_OFF) \
	    $(PYTHON) bench/bench.py insns

# make bench-script   what one credit costs Redis, in instructions; give
#                     BENCH_SCRIPTS="old.lua new.lua" to compare versions
bench-script: deps-bench
	$(PYTHON) bench/script_insns.py $(BENCH_SCRIPTS)

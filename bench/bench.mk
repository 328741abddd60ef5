# make bench       baseline / module / lua throughput and latency, alternated,
#                  plus the slow-Redis case; results in bench/results.md
# make bench-rss   worker RSS over BENCH_RSS_REQUESTS (1,000,000) checkouts
#
# BENCH_SECONDS=10 BENCH_ROUNDS=2 BENCH_CONNECTIONS=50 and the other BENCH_*
# variables of bench/README.md are read from the environment.

.PHONY: bench bench-rss deps-bench

deps-bench:
	tools/install-deps bench

bench: deps-bench $(MODULE)
	NGINX_BIN=$(NGINX_BIN) LOYALTY_MODULE=$(CURDIR)/$(MODULE) \
	    $(PYTHON) bench/bench.py bench

bench-rss: deps-bench $(MODULE)
	NGINX_BIN=$(NGINX_BIN) LOYALTY_MODULE=$(CURDIR)/$(MODULE) \
	    $(PYTHON) bench/bench.py rss

# Fuzzing and sanitizer runs, included by the top-level Makefile.
#
#   make fuzz            build every libFuzzer target into build/fuzz/, replay
#                        the seeds and crash reproducers, then fuzz each
#                        target for FUZZ_SECONDS (default 60); make -j2 fuzz
#                        runs two at a time
#   make fuzz-regress    build, then only replay tests/fuzz/corpus/<target>/
#                        and tests/fuzz/regress/<target>/ (a few seconds)
#   make fuzz-<target>   fuzz one target (customer amount redeem order reply
#                        command api)
#   make test-asan       a full nginx with the module, both built with
#                        AddressSanitizer and UndefinedBehaviorSanitizer,
#                        under the integration tests
#   make test-valgrind   the integration tests with nginx under valgrind
#                        (both: SANITIZER_TESTS="tests/integration/x.py -x"
#                        to run fewer tests; see tests/fuzz/README.md)
#
# A crash found by fuzzing is saved as build/fuzz/crashes/<target>/crash-*;
# once fixed, copy it into tests/fuzz/regress/<target>/ (any file name),
# where make fuzz-regress replays it from then on.

FUZZ_CC       = clang
FUZZ_SECONDS  = 60
FUZZ_FLAGS    =
FUZZ_OUT      = build/fuzz
FUZZ_TARGETS  = customer amount redeem order reply command api

FUZZ_CFLAGS   = -g -O1 -fsanitize=fuzzer,address,undefined \
                -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
                -Wall -Wextra -Werror -Wno-unused-parameter \
                -I tests/fuzz -I ngx_module -I build/nginx/objs \
                -I build/nginx/src/core -I build/nginx/src/os/unix \
                -I build/nginx/src/event -I build/nginx/src/event/quic \
                -I build/nginx/src/http \
                -I build/nginx/src/http/modules -I build/nginx/src/http/v2 \
                -I build/nginx/src/http/v3

FUZZ_RULES    = ngx_module/ngx_http_loyalty_rules.c
FUZZ_PROTO    = ngx_module/ngx_http_loyalty_proto.c $(FUZZ_RULES) \
                tests/fuzz/ngx_shim.c
FUZZ_DEPS     = tests/fuzz/fuzz.h tests/fuzz/ref_pending.h \
                ngx_module/ngx_http_loyalty_rules.h \
                ngx_module/ngx_http_loyalty_redis.h \
                ngx_module/ngx_http_loyalty_module.h \
                ngx_module/ngx_http_loyalty_credit.h $(MODULE)

# ASan and UBSan: stop at the first report, in every process
FUZZ_SAN_ENV  = ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
                UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

.PHONY: fuzz fuzz-build fuzz-regress test-asan test-valgrind \
        $(addprefix fuzz-,$(FUZZ_TARGETS)) \
        $(addprefix fuzz-regress-,$(FUZZ_TARGETS))

fuzz-build: $(addprefix $(FUZZ_OUT)/fuzz_,$(FUZZ_TARGETS))

$(FUZZ_OUT)/fuzz_customer: tests/fuzz/fuzz_customer.c $(FUZZ_RULES) \
                           $(FUZZ_DEPS)
	@mkdir -p $(FUZZ_OUT)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ tests/fuzz/fuzz_customer.c \
	    $(FUZZ_RULES) -lcrypto

$(FUZZ_OUT)/fuzz_amount: tests/fuzz/fuzz_amount.c $(FUZZ_RULES) $(FUZZ_DEPS)
	@mkdir -p $(FUZZ_OUT)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ tests/fuzz/fuzz_amount.c \
	    $(FUZZ_RULES) -lcrypto

$(FUZZ_OUT)/fuzz_redeem: tests/fuzz/fuzz_redeem.c $(FUZZ_RULES) $(FUZZ_DEPS)
	@mkdir -p $(FUZZ_OUT)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ tests/fuzz/fuzz_redeem.c \
	    $(FUZZ_RULES) -lcrypto

$(FUZZ_OUT)/fuzz_order: tests/fuzz/fuzz_order.c $(FUZZ_RULES) $(FUZZ_DEPS)
	@mkdir -p $(FUZZ_OUT)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ tests/fuzz/fuzz_order.c \
	    $(FUZZ_RULES) -lcrypto

$(FUZZ_OUT)/fuzz_reply: tests/fuzz/fuzz_reply.c $(FUZZ_PROTO) $(FUZZ_DEPS)
	@mkdir -p $(FUZZ_OUT)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ tests/fuzz/fuzz_reply.c \
	    $(FUZZ_PROTO) -lhiredis -lcrypto

$(FUZZ_OUT)/fuzz_command: tests/fuzz/fuzz_command.c $(FUZZ_PROTO) \
                          $(FUZZ_DEPS)
	@mkdir -p $(FUZZ_OUT)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ tests/fuzz/fuzz_command.c \
	    $(FUZZ_PROTO) -lhiredis -lcrypto

$(FUZZ_OUT)/fuzz_api: tests/fuzz/fuzz_api.c $(FUZZ_RULES) $(FUZZ_DEPS)
	@mkdir -p $(FUZZ_OUT)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ tests/fuzz/fuzz_api.c \
	    $(FUZZ_RULES) -lcrypto

# every seed and reproducer, run once each (files as arguments: no fuzzing)
fuzz-regress: $(addprefix fuzz-regress-,$(FUZZ_TARGETS))

$(addprefix fuzz-regress-,$(FUZZ_TARGETS)): fuzz-regress-%: $(FUZZ_OUT)/fuzz_%
	@files=$$(find tests/fuzz/corpus/$* tests/fuzz/regress/$* -type f \
	              2>/dev/null | sort); \
	if [ -z "$$files" ]; then \
	    echo "fuzz-regress: $*: no inputs" >&2; exit 1; \
	fi; \
	$(FUZZ_SAN_ENV) $(FUZZ_OUT)/fuzz_$* -timeout=25 -rss_limit_mb=2048 \
	    $$files > $(FUZZ_OUT)/regress-$*.log 2>&1 \
	    || { tail -n 40 $(FUZZ_OUT)/regress-$*.log; \
	         echo "fuzz-regress: $*: FAILED on" \
	              "$$(sed -n 's/^Running: //p' $(FUZZ_OUT)/regress-$*.log \
	                  | tail -n 1)," \
	              "see $(FUZZ_OUT)/regress-$*.log" >&2; exit 1; }; \
	echo "fuzz-regress: $*: $$(echo "$$files" | wc -l) inputs ok"

# new inputs go to build/fuzz/corpus/<target>/ (the first directory);
# tests/fuzz/corpus/<target>/ is only read
$(addprefix fuzz-,$(FUZZ_TARGETS)): fuzz-%: fuzz-regress-%
	@mkdir -p $(FUZZ_OUT)/corpus/$* $(FUZZ_OUT)/crashes/$*
	@echo "fuzz-$*: $(FUZZ_SECONDS) s, log in $(FUZZ_OUT)/fuzz-$*.log"
	@$(FUZZ_SAN_ENV) $(FUZZ_OUT)/fuzz_$* \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	    -print_final_stats=1 \
	    $(if $(wildcard tests/fuzz/$*.dict),-dict=tests/fuzz/$*.dict) \
	    -artifact_prefix=$(FUZZ_OUT)/crashes/$*/ $(FUZZ_FLAGS) \
	    $(FUZZ_OUT)/corpus/$* tests/fuzz/corpus/$* \
	    > $(FUZZ_OUT)/fuzz-$*.log 2>&1 \
	    || { tail -n 60 $(FUZZ_OUT)/fuzz-$*.log; \
	         echo "fuzz-$*: CRASH, reproducer in $(FUZZ_OUT)/crashes/$*/;" \
	              "replay: $(FUZZ_OUT)/fuzz_$* FILE" >&2; exit 1; }
	@grep -E '^stat::number_of_executed_units|^Done' \
	    $(FUZZ_OUT)/fuzz-$*.log | sed 's/^/fuzz-$*: /'

fuzz: $(addprefix fuzz-,$(FUZZ_TARGETS))


# sanitized and valgrind runs of the integration tests; SANITIZER_TESTS
# selects tests (pytest arguments, default tests/integration)

SANITIZER_TESTS =

test-asan: deps-test
	PYTHON=$(PYTHON) tests/fuzz/sanitized-nginx asan build/src \
	    $(SANITIZER_TESTS)

test-valgrind: deps-test
	PYTHON=$(PYTHON) tests/fuzz/sanitized-nginx valgrind build/src \
	    $(SANITIZER_TESTS)

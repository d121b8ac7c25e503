#!/usr/bin/env bash
# The unit tests and the integration tests over a build of the whole tree with sanitizers
# (`make sanitize`, `make tsan`; not part of `make test`):
#
#   tools/sanitize.sh asan    AddressSanitizer (with LeakSanitizer) and UBSan, in build/asan:
#                             every unit test program but test_alloc_fail (`make alloc-asan`
#                             runs that one), then tests/integration against build/asan's
#                             duogend, duogend-fake, duogenctl and tools
#   tools/sanitize.sh tsan    ThreadSanitizer, in build/tsan: test_sched_threads (schedulers
#                             on several threads over one model) and tests/integration (the
#                             worker's main, keeper and metrics threads)
#
# T=name narrows both parts as `make test T=name` does. Every process writes its sanitizer
# reports to files of its own under build/<kind>/reports (UBSan goes on after a report, so
# one run finds them all); the run fails when a test fails or when any report was written,
# and prints the reports. Under ThreadSanitizer the engine computes on one thread (the tests
# give workers --threads 1 and test_sched_threads one thread a scheduler when DG_SANITIZER
# is tsan; OMP_NUM_THREADS=1 for the rest): libgomp is not built with it, and the fork and
# join of its teams would be reported as races. A source edited while a run goes on can be
# rebuilt by a test's own `make install BUILD=...` (test_rollout) with the plain compiler:
# remove build/<kind>/obj then.
set -u
cd "$(dirname "$0")/.."
kind=${1:-}
filter=${T:-}
case "$kind" in
asan) cc="gcc -fsanitize=address,undefined -fno-omit-frame-pointer" ;;
tsan) cc="gcc -fsanitize=thread" ;;
*)    echo "usage: tools/sanitize.sh asan|tsan" >&2; exit 2 ;;
esac
build=build/$kind
reports=$PWD/$build/reports

tools/deps.sh || exit 1
make --no-print-directory -j"$(nproc)" BUILD="$build" CC="$cc" all || exit 1
if [ "$kind" = asan ]; then units=$(ls "$build"/tests/test_* | grep -v '/test_alloc_fail$')
else units=$build/tests/test_sched_threads; fi
rm -rf "$reports" && mkdir -p "$reports"

# verify_asan_link_order=0: a test preloads a shim of its own (crash_on_unpack.c) before
# the ASan runtime; LeakSanitizer's reports are reports like the others
export ASAN_OPTIONS="log_path=$reports/asan:detect_leaks=1:verify_asan_link_order=0"
export UBSAN_OPTIONS="log_path=$reports/ubsan:print_stacktrace=1"
export TSAN_OPTIONS="log_path=$reports/tsan:second_deadlock_stack=1"
export OMP_NUM_THREADS=1 DG_BUILD="$build" DG_SANITIZER="$kind"

failed=0
for t in $units; do
    name=$(basename "$t")
    [ -n "$filter" ] && [[ "$name" != *"$filter"* ]] && continue
    out=$("$t" 2>&1); rc=$?
    printf '%-40s rc %s  %s\n' "$name" "$rc" "$(printf '%s\n' "$out" | grep -E '^[0-9]+ passed' | tail -n 1)"
    if [ $rc -ne 0 ]; then failed=$((failed + 1)); printf '%s\n' "$out" | grep -vE '^(ok|skip) ' | tail -n 30; fi
done

basetemp=$(mktemp -d)
args=(-q -rs -p no:cacheprovider --basetemp "$basetemp" tests/integration)
[ -n "$filter" ] && args+=(-k "$filter")
/usr/bin/python3 -m pytest "${args[@]}" || failed=$((failed + 1))
rm -rf "$basetemp"

n=$(find "$reports" -type f | wc -l)
if [ "$n" -gt 0 ]; then
    for f in "$reports"/*; do echo "==== $f"; head -n 60 "$f"; done
fi
echo "$kind: $failed failing part(s), $n sanitizer report(s) (in $reports)"
[ "$failed" -eq 0 ] && [ "$n" -eq 0 ]

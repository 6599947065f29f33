#!/usr/bin/env bash
# Runs cargo-fuzz targets of fuzz/ one after the other and prints one table row per
# target: executions, exec/s, coverage (cov: edges, ft: features), corpus size,
# crashes, timeouts, seconds. Exits 1 when any target crashed, timed out or ran out
# of memory. Called by `make fuzz` after `cargo fuzz build -O`.
#
#   scripts/fuzz.sh run SECONDS RUNS TARGET...   fuzz each for SECONDS (or RUNS inputs
#                                                when RUNS > 0), corpus in fuzz/corpus/
#   scripts/fuzz.sh seeds TARGET...              replace the corpus-* seeds with the
#                                                SEEDS_MAX (50) corpus inputs that
#                                                reach the most features together
#   scripts/fuzz.sh stats TARGET...              run the seeds and corpus once with
#                                                ZC_FUZZ_STATS=1: the deep-path counters
#
# Per input: -timeout=5 (a hang is reported after 5 s, not libFuzzer's 20 minutes),
# -rss_limit_mb=2048, -detect_leaks=0 (the device targets keep a DMA log thread and
# statics alive across inputs, and LeakSanitizer's scans after such inputs took most
# of the time; a leak is no memory-safety defect in Rust). Single job: the machine is shared (run under flock when asked).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
BIN=target/x86_64-unknown-linux-gnu/release
FLAGS=(-timeout=5 -rss_limit_mb=2048 -detect_leaks=0 -print_final_stats=1)
mode=$1
shift

case $mode in
run)
    seconds=$1 runs=$2
    shift 2
    mkdir -p logs
    rows=()
    failed=0
    for t in "$@"; do
        mkdir -p "corpus/$t" "artifacts/$t"
        budget=(-max_total_time="$seconds")
        [ "$runs" -gt 0 ] && budget=(-runs="$runs")
        start=$(date +%s)
        rc=0
        "$BIN/$t" "${FLAGS[@]}" "${budget[@]}" -artifact_prefix="artifacts/$t/" \
            "corpus/$t" "seeds/$t" >"logs/$t.log" 2>&1 || rc=$?
        secs=$(($(date +%s) - start))
        log=logs/$t.log
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
        last=$(grep -E '^#[0-9]+' "$log" | tail -1)
        cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
        ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
        corp=$(find "corpus/$t" -type f | wc -l)
        crashes=$(grep -cE 'ERROR: libFuzzer: (deadly signal|fuzz target exited|out-of-memory)|ERROR: AddressSanitizer|panicked at' "$log" || true)
        timeouts=$(grep -c 'ERROR: libFuzzer: timeout' "$log" || true)
        if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ] || [ "$timeouts" -ne 0 ]; then
            failed=1
            echo "$t: FAILED (exit $rc), see fuzz/$log and fuzz/artifacts/$t/" >&2
        fi
        rows+=("$(printf '| %-11s | %10s | %6s | %5s | %6s | %6s | %7s | %8s | %7s |' \
            "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$corp" "$crashes" "$timeouts" "$secs")")
    done
    echo
    echo "| target      |      execs | exec/s |   cov |     ft | corpus | crashes | timeouts | seconds |"
    echo "|-------------|-----------:|-------:|------:|-------:|-------:|--------:|---------:|--------:|"
    printf '%s\n' "${rows[@]}"
    exit $failed
    ;;
seeds)
    # The inputs that together reach the most features, at most SEEDS_MAX of them
    # (scripts/fuzz-seed-pick reads what one -set_cover_merge=1 run says each input
    # reaches), replace the corpus-* seeds; the hand-written seeds stay.
    max=${SEEDS_MAX:-50}
    for t in "$@"; do
        tmp=$(mktemp -d)
        mkdir "$tmp/merged" "$tmp/picked"
        "$BIN/$t" "${FLAGS[@]}" -set_cover_merge=1 -merge_control_file="$tmp/control" \
            "$tmp/merged" "corpus/$t" "seeds/$t" >"$tmp/log" 2>&1 ||
            { echo "$t: the merge failed, see $tmp/log" >&2; exit 1; }
        ../scripts/fuzz-seed-pick "$tmp/control" "$max" | while read -r f; do
            cp "$f" "$tmp/picked/corpus-$(sha1sum "$f" | cut -c1-16)"
        done
        rm -f "seeds/$t"/corpus-*
        cp "$tmp/picked"/* "seeds/$t/" 2>/dev/null || true
        rm -rf "$tmp"
        echo "$t: $(find "seeds/$t" -type f | wc -l) seeds"
    done
    ;;
stats)
    for t in "$@"; do
        mkdir -p "corpus/$t"
        echo "$t: $(ZC_FUZZ_STATS=1 "$BIN/$t" "${FLAGS[@]}" -runs=0 "seeds/$t" "corpus/$t" 2>&1 |
            grep '^zc-fuzz-stats:' | tail -1)"
    done
    ;;
*)
    echo "usage: $0 run SECONDS RUNS TARGET... | seeds TARGET... | stats TARGET..." >&2
    exit 2
    ;;
esac

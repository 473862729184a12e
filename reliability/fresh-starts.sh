#!/usr/bin/env bash
# Start gunicorn (the Procfile's web line) on a brand-new instance again and again, beside
# two CPU-bound processes, and count the starts that went wrong: /healthz never answered,
# the master gone a few seconds later, or "database is locked" / "Worker failed to boot"
# / a traceback in the log.
#
#   reliability/fresh-starts.sh [STARTS] [WORKERS] [CODE_DIR]    # defaults: 20 4 .
#
# CODE_DIR is the checkout to start (another one lets you compare with older code).
set -uo pipefail
starts=${1:-20}
workers=${2:-4}
code=$(cd "${3:-.}" && pwd)
venv=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))

timeout 900 sh -c 'while :; do :; done' & hog1=$!
timeout 900 sh -c 'while :; do :; done' & hog2=$!
trap 'kill $hog1 $hog2 2>/dev/null' EXIT

bad=0
for i in $(seq "$starts"); do
    instance="$work/instance$i"
    mkdir -p "$instance"
    (cd "$code" && PATH="$venv:$PATH" IMAGESTORE_INSTANCE="$instance" HOST=127.0.0.1 \
        PORT=$port WEB_CONCURRENCY=$workers exec $(sed -n 's/^web: *//p' Procfile)) \
        > "$instance/gunicorn.log" 2>&1 &
    master=$!
    served=no
    for _ in $(seq 600); do  # up to 60 s
        if curl -sf "http://127.0.0.1:$port/healthz" > /dev/null; then served=yes; break; fi
        kill -0 $master 2>/dev/null || break
        sleep 0.1
    done
    sleep 5  # let every worker finish loading the app, or fail to
    alive=yes; kill -0 $master 2>/dev/null || alive=no
    kill -TERM $master 2>/dev/null; wait $master
    failures=$(grep -c -E "database is locked|Worker failed to boot|Traceback" "$instance/gunicorn.log")
    if [ $served = no ] || [ $alive = no ] || [ "$failures" != 0 ]; then
        bad=$((bad + 1))
        echo "start $i: served=$served alive=$alive failure lines=$failures ($instance/gunicorn.log)"
    fi
done
echo "$((starts - bad)) of $starts fresh starts with $workers workers served cleanly (logs: $work)"
[ $bad = 0 ]

#!/bin/sh
# Bring up a real LAVA (Debian bookworm's lava-server + lava-dispatcher 2023.01) on
# 127.0.0.1, without systemd: PostgreSQL, gunicorn (the web UI, XML-RPC and the worker
# API), lava-scheduler and lava-worker started by hand, a superuser with an API token,
# one worker, the `qemu` device type and one device with KVM off (TCG, nested SVM so
# kvm_amd runs inside it), and a local HTTP server for the job's artifacts.
#
# Idempotent: every step checks first and is skipped when already done; running it again
# only restarts what is not running. Each step's time is printed (`bringup: STEP N s`).
#
# Environment (defaults in brackets):
#   KPT_LAVA_STATE [/var/tmp/kpatchtest-lava]  pidfiles, logs, token, the artifact dir
#   KPT_LAVA_PORT [8800]                       gunicorn on 127.0.0.1
#   KPT_LAVA_ARTIFACT_PORT [8801]              python -m http.server on 127.0.0.1
#   KPT_LAVA_DEVICE [qemu-kpt-01]
# Output, last line: a shell-sourceable summary, also written to $KPT_LAVA_STATE/env:
#   LAVA_URL=... LAVA_TOKEN=... LAVA_ARTIFACT_URL=... LAVA_ARTIFACT_DIR=...
# Stop everything: tests/lava/bringup.sh stop
set -eu

STATE=${KPT_LAVA_STATE:-/var/tmp/kpatchtest-lava}
PORT=${KPT_LAVA_PORT:-8800}
APORT=${KPT_LAVA_ARTIFACT_PORT:-8801}
DEVICE=${KPT_LAVA_DEVICE:-qemu-kpt-01}
WORKER=kpt-worker
ADMIN=kpatchtest
URL="http://127.0.0.1:$PORT"
mkdir -p "$STATE/log" "$STATE/run" "$STATE/artifacts"
# One bring-up at a time: CI starts one beside the tests, and the opt-in test runs it again
# (then only to wait for the first and read its summary). A directory, not flock: every
# daemon started below (PostgreSQL by apt or pg_ctlcluster, gunicorn, the worker) would
# inherit a lock file descriptor and hold the lock for ever.
LOCK="$STATE/bringup.lockdir"
i=0
until mkdir "$LOCK" 2>/dev/null; do
    holder=$(cat "$LOCK/pid" 2>/dev/null || true)
    if [ -n "$holder" ] && ! kill -0 "$holder" 2>/dev/null; then rm -rf "$LOCK"; continue; fi
    i=$((i + 1))
    if [ $i -gt 1500 ]; then echo "bringup: another bring-up ($holder) holds $LOCK" >&2; exit 1; fi
    sleep 1
done
echo $$ >"$LOCK/pid"
trap 'rm -rf "$LOCK"' EXIT

now() { cut -d' ' -f1 /proc/uptime; }
T=$(now)
step() {   # step NAME: the time since the previous step
    t=$(now)
    echo "bringup: $1 $(echo "$t $T" | awk '{printf "%.1f", $1 - $2}') s" >&2
    T=$t
}
running() { [ -f "$STATE/run/$1.pid" ] && kill -0 "$(cat "$STATE/run/$1.pid")" 2>/dev/null; }
start() {  # start NAME CMD...: in its own session, logs in $STATE/log/NAME.log
    name=$1; shift
    if running "$name"; then return 0; fi
    setsid "$@" >>"$STATE/log/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/run/$name.pid"
}
manage() { lava-server manage "$@"; }

if [ "${1:-}" = stop ]; then
    for n in worker scheduler gunicorn artifacts; do
        if running "$n"; then kill -TERM -- "-$(cat "$STATE/run/$n.pid")" 2>/dev/null || true; fi
        rm -f "$STATE/run/$n.pid"
    done
    echo "bringup: stopped" >&2
    exit 0
fi

# 1. packages (never part of `make deps`: LAVA is an opt-in test)
# PostgreSQL first, and running: lava-server's postinst creates its database in it (with no
# systemd here, a fresh machine's postinst may not have started the cluster)
pg_up() {
    if ! pg_lsclusters -h | awk '{print $4}' | grep -q online; then
        pg_ctlcluster "$(pg_lsclusters -h | awk 'NR == 1 {print $1}')" main start
    fi
}
if ! dpkg-query -W -f='${Status}\n' postgresql 2>/dev/null | grep -q 'install ok installed'; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >"$STATE/log/apt-pg.log" 2>&1
fi
pg_up
if [ "$(dpkg-query -W -f='${Status}\n' lava-server lava-dispatcher 2>/dev/null | grep -c 'install ok installed')" != 2 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        lava-server lava-dispatcher >"$STATE/log/apt.log" 2>&1
fi
step apt

# 2. PostgreSQL and the database (lava-server's postinst creates it when PostgreSQL runs
# during the install; run it again if it did not), then the schema
pg_up
if ! su postgres -c "psql -lqt" | cut -d'|' -f1 | grep -w lavaserver >/dev/null; then
    python3 /usr/share/lava-server/postinst.py >"$STATE/log/postinst.log" 2>&1
fi
manage migrate --noinput >"$STATE/log/migrate.log" 2>&1
step db

# 3. the server: gunicorn for the UI, XML-RPC and the workers' API; the scheduler
mkdir -p /var/log/lava-server /var/lib/lava-server/default/media/job-output
chown -R lavaserver:lavaserver /var/log/lava-server /var/lib/lava-server/default/media
start gunicorn gunicorn3 lava_server.wsgi --bind "127.0.0.1:$PORT" -u lavaserver -g lavaserver \
    --worker-class eventlet --workers 2 --timeout 120 --log-level INFO
start scheduler runuser -u lavaserver -- lava-server manage lava-scheduler --level INFO \
    --log-file /var/log/lava-server/lava-scheduler.log
i=0
until python3 -c "import urllib.request,sys; urllib.request.urlopen('$URL/api/v0.2/system/version/', timeout=5)" 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 120 ]; then echo "bringup: gunicorn did not answer on $URL (see $STATE/log/gunicorn.log)" >&2; exit 1; fi
    sleep 0.5
done
step server

# 4. a superuser and its API token (XML-RPC: http://USER:TOKEN@127.0.0.1:PORT/RPC2)
if ! manage users list 2>/dev/null | grep -w "$ADMIN" >/dev/null; then
    manage users add --superuser --staff --email kpatchtest@localhost "$ADMIN" >/dev/null
fi
if [ ! -s "$STATE/token" ]; then
    secret=$(python3 -c "import secrets; print(secrets.token_hex(24))")
    manage tokens add --user "$ADMIN" --description kpatchtest --secret "$secret" >/dev/null
    echo "$secret" >"$STATE/token"
    chmod 600 "$STATE/token"
fi

# 5. a worker, the qemu device type, one TCG device (its dictionary: KVM off, the CPU
# with SVM and NPT so kvm_amd loads on the kernel under test and runs nested guests)
if ! manage workers list 2>/dev/null | grep -w "$WORKER" >/dev/null; then
    manage workers add "$WORKER" --health ACTIVE >/dev/null
fi
manage workers details "$WORKER" | sed -n 's/^token *: //p' >"$STATE/worker-token"
if ! manage device-types list 2>/dev/null | grep -w qemu >/dev/null; then
    manage device-types add qemu >/dev/null
fi
mkdir -p /etc/lava-server/dispatcher-config/devices
cat >"/etc/lava-server/dispatcher-config/devices/$DEVICE.jinja2" <<'EOF'
{% extends 'qemu.jinja2' %}
{% set arch = 'amd64' %}
{% set no_kvm = True %}
{% set memory = 1024 %}
{% set netdevice = 'user' %}
{% set extra_options = ['-cpu qemu64,+svm,+npt', '-smp 2', '-machine q35,smm=on'] %}
EOF
chown lavaserver:lavaserver "/etc/lava-server/dispatcher-config/devices/$DEVICE.jinja2"
if ! manage devices list 2>/dev/null | grep -w "$DEVICE" >/dev/null; then
    manage devices add --device-type qemu --worker "$WORKER" "$DEVICE" >/dev/null
fi
manage devices update --health GOOD "$DEVICE" >/dev/null
step objects

# 6. the worker (runs lava-run, i.e. QEMU, as root) and the artifact server
start worker lava-worker --name "$WORKER" --url "$URL/" --token-file "$STATE/worker-token" \
    --worker-dir "$STATE/worker" --level INFO --log-file "$STATE/log/worker-app.log"
start artifacts python3 -m http.server --bind 127.0.0.1 --directory "$STATE/artifacts" "$APORT"
i=0
until manage workers details "$WORKER" | grep "^state *: Online" >/dev/null; do
    i=$((i + 1))
    if [ $i -gt 120 ]; then echo "bringup: worker $WORKER not online (see $STATE/log/worker*.log)" >&2; exit 1; fi
    sleep 0.5
done
step worker
sleep 2
for n in gunicorn scheduler worker artifacts; do
    if ! running "$n"; then echo "bringup: $n exited (see $STATE/log/$n.log)" >&2; exit 1; fi
done

summary="LAVA_URL=$URL LAVA_USER=$ADMIN LAVA_TOKEN=$(cat "$STATE/token") LAVA_DEVICE_TYPE=qemu \
LAVA_ARTIFACT_URL=http://127.0.0.1:$APORT LAVA_ARTIFACT_DIR=$STATE/artifacts"
echo "$summary" >"$STATE/env"
echo "$summary"

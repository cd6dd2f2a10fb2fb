#!/usr/bin/env bash
# A loopback Ray head for local development, and a stop that ends exactly its processes.
#
#   cluster/local_head.sh [start] [--port 6380] [--temp-dir /tmp/sleep_ray_head] [--num-cpus 2]
#   cluster/local_head.sh stop    [--temp-dir /tmp/sleep_ray_head] [--pid-file FILE]
#   cluster/local_head.sh status  [--port 6380]
#
# Auth: Ray 2.60 turns token auth on by default; `ray job submit` and `ray status` then fail with
# InvalidAuthToken unless both sides use the same mode. This head is loopback-only and runs with
# RAY_AUTH_MODE=disabled; export the same in the shell that submits jobs:
#   export RAY_AUTH_MODE=disabled RAY_ADDRESS=http://127.0.0.1:8265
#
# The head's port must lie outside 10002-19999 (Ray's worker port range). Keep the temp dir short
# (unix socket paths are limited to ~107 characters) and outside the venv. `stop` never runs
# `ray stop`: it ends only the pids recorded at start, after checking each one still belongs to
# this head's temp dir.
set -euo pipefail

export RAY_AUTH_MODE=disabled

cmd=start
case "${1:-}" in start|stop|status) cmd=$1; shift ;; esac

port=${RAY_HEAD_PORT:-6380}
temp_dir=${RAY_HEAD_TEMP_DIR:-/tmp/sleep_ray_head}
num_cpus=${RAY_HEAD_NUM_CPUS:-2}
dashboard_port=${RAY_HEAD_DASHBOARD_PORT:-8265}
pid_file=${RAY_HEAD_PID_FILE:-}
ray_bin=${RAY_BIN:-ray}

while [ $# -gt 0 ]; do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --temp-dir) temp_dir=$2; shift 2 ;;
    --num-cpus) num_cpus=$2; shift 2 ;;
    --dashboard-port) dashboard_port=$2; shift 2 ;;
    --pid-file) pid_file=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "local_head.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
pid_file=${pid_file:-$temp_dir/local_head.pids}

# Pids of live processes whose command line names this head's temp dir (read from /proc; no
# pattern-based kill anywhere).
head_pids() {
  local p cmdline
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = "$$" ] && continue
    cmdline=$(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline") 2>/dev/null || continue
    case "$cmdline" in
      *local_head.sh*) ;;  # this script and its own subshells
      *"$temp_dir"*) echo "$p" ;;
    esac
  done
}

belongs() {  # pid still alive and still one of this head's processes
  local cmdline
  cmdline=$(tr '\0' ' ' 2>/dev/null < "/proc/$1/cmdline") 2>/dev/null || return 1
  case "$cmdline" in *"$temp_dir"*) return 0 ;; *) return 1 ;; esac
}

case "$cmd" in
start)
  if [ "$port" -ge 10002 ] && [ "$port" -le 19999 ]; then
    echo "local_head.sh: port $port lies in Ray's worker range 10002-19999; pick another" >&2
    exit 2
  fi
  temp_dir=$(mkdir -p "$temp_dir" && cd "$temp_dir" && pwd)
  pid_file=${pid_file/#\~/$HOME}
  if [ -s "$pid_file" ]; then
    for p in $(cat "$pid_file"); do
      if belongs "$p"; then
        echo "local_head.sh: a head from $temp_dir is already running (pid $p); run '$0 stop' first" >&2
        exit 1
      fi
    done
  fi
  "$ray_bin" start --head \
    --node-ip-address=127.0.0.1 \
    --port="$port" \
    --dashboard-host=127.0.0.1 \
    --dashboard-port="$dashboard_port" \
    --temp-dir="$temp_dir" \
    --num-cpus="$num_cpus" \
    --disable-usage-stats
  head_pids > "$pid_file"
  echo "local_head.sh: head pids ($(wc -l < "$pid_file")) recorded in $pid_file"
  echo "export RAY_AUTH_MODE=disabled"
  echo "RAY_ADDRESS=http://127.0.0.1:$dashboard_port"
  echo "# e.g.: RAY_AUTH_MODE=disabled RAY_ADDRESS=http://127.0.0.1:$dashboard_port ray job submit --working-dir . -- python jobs/tiny_sleep.py"
  ;;
stop)
  if [ ! -s "$pid_file" ]; then
    echo "local_head.sh: no pid file at $pid_file; nothing to stop" >&2
    exit 0
  fi
  pids=$(cat "$pid_file")
  # Workers the raylet started after `start` also carry the temp dir; end them too.
  pids=$(printf '%s\n' $pids $(head_pids) | sort -un)
  live=()
  for p in $pids; do if belongs "$p"; then live+=("$p"); fi; done
  [ ${#live[@]} -gt 0 ] && kill -TERM "${live[@]}" 2>/dev/null || true
  # gcs_server and the autoscaler monitor may linger on SIGTERM; like `ray stop`, escalate to
  # SIGKILL after a grace period (RAY_HEAD_STOP_GRACE_S, default 5 s), on the same pids only.
  grace=${RAY_HEAD_STOP_GRACE_S:-5}
  for _ in $(seq 1 $((grace * 5))); do
    left=()
    for p in "${live[@]}"; do if belongs "$p"; then left+=("$p"); fi; done
    [ ${#left[@]} -eq 0 ] && break
    sleep 0.2
  done
  if [ ${#left[@]} -gt 0 ]; then
    kill -KILL "${left[@]}" 2>/dev/null || true
    for _ in $(seq 1 25); do
      alive=0
      for p in "${left[@]}"; do if belongs "$p"; then alive=1; fi; done
      [ $alive -eq 0 ] && break
      sleep 0.2
    done
  fi
  rm -f "$pid_file"
  echo "local_head.sh: stopped ${#live[@]} head processes from $temp_dir"
  ;;
status)
  "$ray_bin" status --address "127.0.0.1:$port"
  ;;
esac

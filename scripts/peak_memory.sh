#!/usr/bin/env bash
# Peak resident memory (VmHWM) of every process of a command after SECONDS seconds, then the
# command is stopped with SIGTERM (docs/streaming.md). Reads /proc: the ranks that `ddl launch`
# starts through mpiexec are not children that /usr/bin/time could account for.
#     scripts/peak_memory.sh SECONDS COMMAND...
set -u
seconds=$1; shift
setsid "$@" > /dev/null 2>&1 &
leader=$!
sleep "$seconds"
descendants() {   # the tree under $1 (mpiexec's proxies start sessions of their own)
    echo "$1"
    for child in $(ps -o pid= --ppid "$1"); do descendants "$child"; done
}
for pid in $(descendants "$leader"); do
    hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
    [ -n "$hwm" ] && echo "$((hwm / 1024)) MB peak  pid $pid  $(tr '\0' ' ' < "/proc/$pid/cmdline" | cut -c1-100)"
done | sort -rn
kill -TERM "$leader"
wait "$leader"

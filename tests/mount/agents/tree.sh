#!/usr/bin/env bash
# A test agent that leaves descendants behind: a double-forked, setsid'd
# daemon and a child that ignores SIGTERM. Their pids go to $PIDS/.
set -u
( setsid sleep 1000 & echo $! >"$PIDS/$$.daemon" )
( trap '' TERM; exec sleep 1000 ) &
echo $! >"$PIDS/$$.stubborn"
echo $$ >"$PIDS/$$.main"
exec sleep 1000

#!/usr/bin/env bash
# Starts a local Redis server for vaestream's broker source (vaestream publish / stream-encode --source / follow
# --source): 127.0.0.1 only, the append-only file (fsync on every write) in DIR, so a restart keeps the streams,
# their consumer groups and acknowledgements.
#   scripts/start_broker.sh [PORT [DIR]]     (default 6379, runs/redis)   -> redis://127.0.0.1:PORT/STREAM
# Stop it with: redis-cli -p PORT shutdown
set -euo pipefail
PORT="${1:-6379}"
DIR="${2:-runs/redis}"
if ! command -v redis-server >/dev/null; then
  echo "start_broker: redis-server is not installed (Debian: apt-get install redis-server)" >&2
  exit 1
fi
mkdir -p "$DIR"
redis-server --port "$PORT" --bind 127.0.0.1 --dir "$DIR" --appendonly yes --appendfsync always --save '' \
  --daemonize yes --logfile redis.log --pidfile "$(cd "$DIR" && pwd)/redis.pid"
for _ in $(seq 50); do
  if python -c "import redis, sys; redis.Redis(port=int(sys.argv[1])).ping()" "$PORT" 2>/dev/null; then
    echo "redis://127.0.0.1:$PORT/"
    exit 0
  fi
  sleep 0.1
done
echo "start_broker: redis-server did not answer on 127.0.0.1:$PORT (see $DIR/redis.log)" >&2
exit 1

# Shared by bench/callgrind-hop and bench/syscalls-hop: one outbound
# HTTP/1.1 hop of mesh-proxy in front of an nginx that answers "hello".
# nginx listens on 127.0.0.1:18081, the proxy on 127.0.0.1:18140.

# hop_setup DIR: writes nginx's and the proxy's configs into DIR and starts nginx.
hop_setup() {
  local dir=$1
  cat > "$dir/nginx.conf" <<NG
daemon off; worker_processes 1; pid $dir/nginx.pid; error_log $dir/error.log;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $dir; proxy_temp_path $dir; fastcgi_temp_path $dir; uwsgi_temp_path $dir; scgi_temp_path $dir;
  server { listen 127.0.0.1:18081; keepalive_requests 1000000; location / { return 200 "hello\n"; } } }
NG
  nginx -c "$dir/nginx.conf" -p "$dir" &
  hop_nginx=$!
  cat > "$dir/proxy.toml" <<PX
[listen]
outbound = "127.0.0.1:18140"
admin = "127.0.0.1:0"

[[services]]
name = "backend"
protocol = "http"
endpoints = [ { addr = "127.0.0.1:18081", version = "v1" } ]
PX
}

# hop_wait_ready: until a request through the proxy is answered (bounded),
# by this run's nginx (one that could not bind its port has exited).
hop_wait_ready() {
  for _ in $(seq 1 100); do
    kill -0 "$hop_nginx" 2>/dev/null || { echo "nginx did not start (port 18081 taken?)" >&2; return 1; }
    curl -s -o /dev/null -H 'Host: backend' http://127.0.0.1:18140/ && return 0
    sleep 0.3
  done
  echo "the proxy never answered" >&2
  return 1
}

# hop_load SECONDS: wrk -t1 -c32 through the proxy; prints the request count.
hop_load() {
  wrk -t1 -c32 -d"$1"s -H 'Host: backend' http://127.0.0.1:18140/ | awk '/requests in/ {print $1}'
}

hop_teardown() {
  kill "$hop_nginx" 2>/dev/null || true
  wait "$hop_nginx" 2>/dev/null || true
}

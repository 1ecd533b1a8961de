# Shared by bench/callgrind-hop and bench/syscalls-hop: one outbound
# HTTP/1.1 hop of mesh-proxy in front of an nginx that answers "hello".
# Both listen on loopback ports the kernel reports free (port 0), chosen in
# hop_setup as $hop_backend_port and $hop_proxy_port.

# free_port: a port the kernel just handed out for 127.0.0.1, released again.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# hop_setup DIR: writes nginx's and the proxy's configs into DIR and starts nginx.
hop_setup() {
  local dir=$1
  hop_backend_port=$(free_port)
  hop_proxy_port=$(free_port)
  cat > "$dir/nginx.conf" <<NG
daemon off; worker_processes 1; pid $dir/nginx.pid; error_log $dir/error.log;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $dir; proxy_temp_path $dir; fastcgi_temp_path $dir; uwsgi_temp_path $dir; scgi_temp_path $dir;
  server { listen 127.0.0.1:$hop_backend_port; keepalive_requests 1000000; location / { return 200 "hello\n"; } } }
NG
  nginx -c "$dir/nginx.conf" -p "$dir" &
  hop_nginx=$!
  cat > "$dir/proxy.toml" <<PX
[listen]
outbound = "127.0.0.1:$hop_proxy_port"
admin = "127.0.0.1:0"

[[services]]
name = "backend"
protocol = "http"
endpoints = [ { addr = "127.0.0.1:$hop_backend_port", version = "v1" } ]
PX
}

# hop_wait_ready: until a request through the proxy is answered (bounded),
# by this run's nginx (one that could not bind its port has exited).
hop_wait_ready() {
  for _ in $(seq 1 100); do
    kill -0 "$hop_nginx" 2>/dev/null || { echo "nginx did not start (port $hop_backend_port taken?)" >&2; return 1; }
    curl -s -o /dev/null -H 'Host: backend' http://127.0.0.1:$hop_proxy_port/ && return 0
    sleep 0.3
  done
  echo "the proxy never answered" >&2
  return 1
}

# hop_load SECONDS: wrk -t1 -c32 through the proxy; prints the request count.
hop_load() {
  wrk -t1 -c32 -d"$1"s -H 'Host: backend' http://127.0.0.1:$hop_proxy_port/ | awk '/requests in/ {print $1}'
}

hop_teardown() {
  kill "$hop_nginx" 2>/dev/null || true
  wait "$hop_nginx" 2>/dev/null || true
}

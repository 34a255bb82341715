# script/lib.sh: shell functions shared by the scripts in script/. Source it; it defines
# functions only. Everything a function starts is recorded so rs_cleanup stops exactly that (by pid)
# and removes exactly the directories it made.
#
#   rs_install_packages          apt-get install what is missing of docker.io, docker-registry,
#                                skopeo, prometheus, curl, chromium, haproxy (apt-get update only when something is missing)
#   rs_start_dockerd DIR         start a private dockerd whose every file lives under DIR; sets
#                                RS_DOCKER_HOST=unix://DIR/docker.sock once `docker info` answers
#   rs_start_registry DIR PORT   start distribution on 127.0.0.1:PORT, storage and log under DIR
#   rs_free_port                 print a loopback TCP port that is free right now
#   rs_wait_http URL [TRIES]     wait until URL answers 2xx (0.2 s between tries, default 100)
#   rs_track_pid PID NAME        have rs_cleanup stop PID (for other background processes)
#   rs_track_dir DIR             have rs_cleanup unmount anything under DIR and remove it
#   rs_cleanup                   stop what was tracked (newest first), remove tracked dirs
#   rs_install_moto DIR          moto's S3 server in DIR/venv (from PyPI, once per DIR), for the
#                                tests of registries on object storage
#   rs_install_commands CMD=PKG...  apt-get install the packages of missing commands
#   rs_apt_install PKG...        apt-get install PKGs, their services kept from starting
#   rs_nginx_conf DIR PORT UPSTREAM_PORT WORKERS   print the bench's nginx config
#   rs_haproxy_cfg PORT UPSTREAM_PORT [THREADS]    print the bench's haproxy config
#   rs_log MSG...                print a progress line on stderr

RS_PIDS=()
RS_PID_NAMES=()
RS_DIRS=()

rs_log() {
    printf '==> %s\n' "$*" >&2
}

rs_track_pid() {
    RS_PIDS+=("$1")
    RS_PID_NAMES+=("$2")
}

rs_track_dir() {
    RS_DIRS+=("$1")
}

rs_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

rs_wait_http() {
    local url=$1 tries=${2:-100} i
    for i in $(seq "$tries"); do
        curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
        sleep 0.2
    done
    return 1
}

rs_install_packages() {
    local missing=()
    readarray -t missing < <(rs_missing_packages curl=curl dockerd=docker.io docker-registry=docker-registry \
        skopeo=skopeo prometheus=prometheus chromium=chromium haproxy=haproxy)
    # Chromium's screenshots need a font; not a command, so asked of dpkg.
    dpkg -s fonts-dejavu-core >/dev/null 2>&1 || missing+=(fonts-dejavu-core)
    rs_apt_install "${missing[@]}"
}

# rs_apt_install PACKAGE...: apt-get install them (nothing when none is named).
rs_apt_install() {
    [ "$#" -eq 0 ] && return 0
    rs_log "installing $*"
    # Packages must not start their system services (a registry on :5000, a system dockerd, nginx
    # on :80): keep a policy-rc.d that forbids it for the duration, unless the machine has one.
    local policy=/usr/sbin/policy-rc.d made_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >&2 || rc=$?
    [ -n "$made_policy" ] && rm -f "$policy"
    return "$rc"
}

# dockerd without systemd, bridges or iptables, with the vfs storage driver (no overlay mounts
# needed). It starts and stops its own containerd under DIR/exec. DIR must be short: containerd's
# socket path has to fit in 108 bytes.
rs_start_dockerd() {
    local dir=$1
    mkdir -p "$dir"
    rs_track_dir "$dir"
    dockerd --storage-driver=vfs --iptables=false --ip6tables=false --bridge=none \
        --data-root "$dir/root" --exec-root "$dir/exec" --pidfile "$dir/docker.pid" \
        -H "unix://$dir/docker.sock" >"$dir/dockerd.log" 2>&1 &
    local pid=$!
    rs_track_pid "$pid" dockerd
    RS_DOCKER_HOST="unix://$dir/docker.sock"
    local i
    for i in $(seq 120); do
        if DOCKER_HOST=$RS_DOCKER_HOST docker info >/dev/null 2>&1; then
            rs_log "dockerd $pid ready on $RS_DOCKER_HOST"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        sleep 0.5
    done
    rs_log "dockerd did not start; its log:"
    tail -n 40 "$dir/dockerd.log" >&2
    return 1
}

rs_start_registry() {
    local dir=$1 port=$2
    mkdir -p "$dir"
    rs_track_dir "$dir"
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
    docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
    local pid=$!
    rs_track_pid "$pid" docker-registry
    if rs_wait_http "http://127.0.0.1:$port/v2/"; then
        rs_log "registry $pid ready on 127.0.0.1:$port"
        return 0
    fi
    rs_log "registry did not start; its log:"
    tail -n 20 "$dir/registry.log" >&2
    return 1
}

# rs_install_commands CMD=PACKAGE...: apt-get install the packages of the commands missing.
rs_install_commands() {
    local missing=()
    readarray -t missing < <(rs_missing_packages "$@")
    rs_apt_install "${missing[@]}"
}

# rs_missing_packages CMD=PACKAGE...: prints the packages of the commands missing, once each.
rs_missing_packages() {
    local pair cmd
    for pair in "$@"; do
        cmd=${pair%%=*}
        command -v "$cmd" >/dev/null 2>&1 || command -v "/usr/sbin/$cmd" >/dev/null 2>&1 || echo "${pair#*=}"
    done | sort -u
}

# distribution's recipe (docs/recipes/nginx.md) without TLS and auth, plus unbuffered streaming
# both ways and HTTP/1.1 keep-alive to the upstream. WORKERS: auto, or 1 with no master process
# (one process, for callgrind).
rs_nginx_conf() {
    local dir=$1 port=$2 upstream_port=$3 workers=$4 master=
    [ "$workers" = 1 ] && master='master_process off;'
    cat <<EOF
$master
user root;
worker_processes $workers;
worker_rlimit_nofile 16384;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 8192; }
http {
  access_log $dir/nginx-access.log;
  client_body_temp_path $dir/client_body;
  proxy_temp_path $dir/proxy_temp;
  fastcgi_temp_path $dir/fastcgi_temp;
  uwsgi_temp_path $dir/uwsgi_temp;
  scgi_temp_path $dir/scgi_temp;
  upstream docker-registry {
    server 127.0.0.1:$upstream_port;
    keepalive 64;
  }
  map \$upstream_http_docker_distribution_api_version \$docker_distribution_api_version {
    '' 'registry/2.0';
  }
  server {
    listen 127.0.0.1:$port;
    client_max_body_size 0;
    chunked_transfer_encoding on;
    location /v2/ {
      add_header 'Docker-Distribution-Api-Version' \$docker_distribution_api_version always;
      proxy_pass                          http://docker-registry;
      proxy_set_header  Host              \$http_host;
      proxy_set_header  X-Real-IP         \$remote_addr;
      proxy_set_header  X-Forwarded-For   \$proxy_add_x_forwarded_for;
      proxy_set_header  X-Forwarded-Proto \$scheme;
      proxy_read_timeout                  900;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_request_buffering off;
      proxy_buffering off;
    }
  }
}
EOF
}

# HTTP mode with keep-alive both ways and X-Forwarded-For. THREADS: haproxy's default (one per
# CPU) when absent, else that many.
rs_haproxy_cfg() {
    local port=$1 upstream_port=$2 threads=
    [ -n "${3:-}" ] && threads="  nbthread $3"
    cat <<EOF
global
  maxconn 8000
$threads
defaults
  mode http
  option http-keep-alive
  option forwardfor
  timeout connect 10s
  timeout client 900s
  timeout server 900s
  timeout http-request 30s
  timeout http-keep-alive 30s
frontend registry
  bind 127.0.0.1:$port
  default_backend origin
backend origin
  server origin 127.0.0.1:$upstream_port maxconn 8000
EOF
}

# TERM, then KILL after 20 s: dockerd needs a few seconds to stop containerd and unmount.
rs_stop_pid() {
    local pid=$1 name=$2 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.2
    done
    rs_log "$name ($pid) ignored TERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# A dockerd that was killed leaves its data root bind-mounted: unmount deepest first, then remove.
rs_remove_dir() {
    local dir=$1 mnt
    [ -d "$dir" ] || return 0
    awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts | sort -r |
        while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
    rm -rf "$dir"
}

rs_cleanup() {
    local i
    for ((i = ${#RS_PIDS[@]} - 1; i >= 0; i--)); do
        rs_stop_pid "${RS_PIDS[$i]}" "${RS_PID_NAMES[$i]}"
    done
    for ((i = ${#RS_DIRS[@]} - 1; i >= 0; i--)); do
        rs_remove_dir "${RS_DIRS[$i]}"
    done
    RS_PIDS=()
    RS_PID_NAMES=()
    RS_DIRS=()
}

# moto's S3 API server, for a registry that keeps its blobs in a bucket and redirects blob GETs to
# presigned URLs. Installed once into DIR/venv (about 20 s, needs PyPI), then reused.
rs_install_moto() {
    local dir=$1
    if [ -x "$dir/venv/bin/moto_server" ]; then
        return 0
    fi
    rs_log "installing moto's S3 server into $dir"
    mkdir -p "$dir"
    python3 -m venv "$dir/venv" >&2
    PIP_CACHE_DIR="$dir/pip-cache" "$dir/venv/bin/pip" install -q 'moto[server]==5.2.5' >&2
}

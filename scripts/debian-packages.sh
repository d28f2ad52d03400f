#!/usr/bin/env bash
# Usage: scripts/debian-packages.sh [--check] [--require] GROUP...
# Installs the packages of each GROUP of scripts/packages.txt (data, fonts, browser, docker) that are missing, where
# this machine can: as root or with sudo that asks no password, with apt-get (Debian or Ubuntu). Prints one line
# naming what it installs, and nothing, at no cost, when nothing is missing. Where it cannot install (or with
# --check) it prints one line naming the missing packages and what goes without them, and exits 0 so the caller
# goes on (the tests skip, or fail under SIAMESE_TESTS_STRICT=1); with --require it exits 1 instead.
# SIAMESE_PACKAGES names another list (the tests use it).
set -euo pipefail
list="${SIAMESE_PACKAGES:-$(cd "$(dirname "$0")" && pwd)/packages.txt}"
check="" require=""
while [ $# -gt 0 ]; do
  case "$1" in
    --check) check=1; shift ;;
    --require) require=1; shift ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "Usage: $0 [--check] [--require] GROUP... (the groups of $list)" >&2; exit 2; }

missing_packages() {  # the packages of the asked groups whose file is missing, and what needs them
  missing=() needs=()
  local group package file what want
  while read -r group package file what; do
    case "$group" in "" | \#*) continue ;; esac
    for want in "${groups[@]}"; do
      if [ "$group" = "$want" ] && [ ! -e "$file" ]; then
        missing+=("$package")
        case " ${needs[*]:-} " in *"$what"*) ;; *) needs+=("$what") ;; esac
      fi
    done
  done <"$list"
}

report() {  # one line: what is missing, why it stays missing, what goes without it, and the fix
  local IFS="; "
  echo "Missing Debian packages: ${missing[*]} ($1). Without them: ${needs[*]}. Fix: sudo apt-get install ${missing[*]}" >&2
  [ -z "$require" ] || exit 1
  exit 0
}

groups=("$@")
missing_packages
[ ${#missing[@]} -gt 0 ] || exit 0
[ -z "$check" ] || report "--check installs nothing"
command -v apt-get >/dev/null || report "no apt-get here: not Debian or Ubuntu"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  sudo -n true 2>/dev/null || report "not root, and sudo asks for a password"
  sudo=(sudo -n)
fi
echo "Installing Debian packages for $*: ${missing[*]} (scripts/packages.txt)"
log="$(mktemp)"
if ! { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$log" 2>&1; then
  last="$(grep -v '^\s*$' "$log" | tail -n 1)"
  rm -f "$log"
  missing_packages
  report "apt-get failed: ${last:-no message}"
fi
rm -f "$log"
missing_packages
[ ${#missing[@]} -eq 0 ] || report "apt-get installed them, but their files are not where scripts/packages.txt says"

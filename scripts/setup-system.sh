#!/usr/bin/env bash
# System packages kimia's tests and data tools use (Debian/Ubuntu). Safe to re-run.
# espeak-ng: real synthetic speech for tests and the corpus builder; sox: audio inspection;
# chromium + chromium-driver: the headless browser test of the web page; wordnet-base: the corpus' WordNet
# sentence pool (kimia.data.texts.wordnet_sentences).
set -euo pipefail
PKGS="espeak-ng sox chromium chromium-driver wordnet-base"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -z "$missing" ]; then echo "system packages present:$PKGS"; exit 0; fi
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
  echo "please install as root: apt-get install -y$missing" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends $missing

#!/usr/bin/env bash
# System packages for `kimia data synth` (Debian bookworm / Ubuntu). Safe to re-run; needs root or sudo.
#
# Speech engines: espeak-ng (+ mbrola voices, Debian non-free), pico (libttspico-utils, non-free), flite,
# festival with its diphone and HTS voices. Sound sources: sound-theme-freedesktop, sound-icons.
# Text sources: fortunes (fortune-mod data), WordNet's usage examples (wordnet-base), word lists (wamerican, wbritish).
# Real human speech, evaluation only (`kimia eval --build asterisk|pocketsphinx`, the pipeline's eval stage):
# asterisk-core-sounds-en-g722 + asterisk-core-sounds-en (transcripts), pocketsphinx-testdata.
# Debian ships mbrola and pico only in the non-free component: on Debian this script adds a
# `kimia-nonfree.sources` file that copies the main stanza (same URIs, suites, Signed-By) with
# `Components: contrib non-free`. Engines whose packages cannot be installed are skipped by the builder.
set -euo pipefail

MAIN_PKGS="espeak-ng sox libsox-fmt-all flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
 sound-theme-freedesktop sound-icons fortunes fortunes-min wordnet-base wamerican wbritish
 asterisk-core-sounds-en-g722 asterisk-core-sounds-en pocketsphinx-testdata"
NONFREE_PKGS="mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 libttspico-utils
 mbrola-de1 mbrola-de2 mbrola-de3 mbrola-de4 mbrola-de5 mbrola-de6 mbrola-gr2 mbrola-ro1 mbrola-nl2
 mbrola-fr1 mbrola-fr4 mbrola-hu1 mbrola-sw1 mbrola-sw2 mbrola-af1 mbrola-pl1"

if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
  echo "setup-data-system: run as root or install sudo" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive

missing_of() { local m=""; for p in $1; do dpkg -s "$p" >/dev/null 2>&1 || m="$m $p"; done; echo "$m"; }

missing_main=$(missing_of "$MAIN_PKGS")
missing_nonfree=$(missing_of "$NONFREE_PKGS")
if [ -z "$missing_main$missing_nonfree" ]; then echo "data system packages present"; exit 0; fi

# Enable contrib + non-free once (Debian deb822 sources only; other layouts are left to the admin).
SRC_DIR=/etc/apt/sources.list.d
NONFREE_FILE=$SRC_DIR/kimia-nonfree.sources
updated=0
if [ -n "$missing_nonfree" ] && [ -f "$SRC_DIR/debian.sources" ] && [ ! -f "$NONFREE_FILE" ] \
   && ! grep -Rqs "non-free" /etc/apt/sources.list "$SRC_DIR"; then
  # First stanza of debian.sources (the main archive: bookworm bookworm-updates), components replaced.
  awk 'BEGIN{RS=""; ORS="\n"} NR==1{print; exit}' "$SRC_DIR/debian.sources" \
    | sed -E 's/^Components:.*/Components: contrib non-free/' | $SUDO tee "$NONFREE_FILE" >/dev/null
  echo "setup-data-system: added $NONFREE_FILE (contrib non-free)"
fi

$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq && updated=1
[ -n "$missing_main" ] && $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $missing_main
if [ -n "$missing_nonfree" ]; then
  # Install what exists; a voice that this archive lacks is skipped, not fatal.
  avail=""
  for p in $missing_nonfree; do apt-cache show "$p" >/dev/null 2>&1 && avail="$avail $p"; done
  if [ -n "$avail" ]; then $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $avail; fi
  for p in $missing_nonfree; do case " $avail " in *" $p "*) ;; *) echo "setup-data-system: $p unavailable, skipped";; esac; done
fi
echo "data system packages installed (apt update: $updated)"

#!/usr/bin/env bash
# Fetch the Stanford CoreNLP 3.6.0 jars that SPICE needs and put them where pycocoevalcap's SPICE looks
# for them: <site-packages>/pycocoevalcap/spice/lib/ (spice-1.0.jar's manifest names lib/stanford-corenlp-3.6.0.jar
# and lib/stanford-corenlp-3.6.0-models.jar). Needs internet once; PET-VLM never downloads at run time.
#
#   coco-caption/get_stanford_models.sh [PYTHON]      # PYTHON defaults to .venv/bin/python, else python3
#
# Set SPICE_LIB_DIR to install elsewhere (then copy the two jars into pycocoevalcap/spice/lib yourself).
set -euo pipefail

CORENLP=stanford-corenlp-full-2015-12-09
JAR=stanford-corenlp-3.6.0
URL="${CORENLP_URL:-https://nlp.stanford.edu/software/${CORENLP}.zip}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python=python3; fi
fi

if [[ -n "${SPICE_LIB_DIR:-}" ]]; then
    lib="$SPICE_LIB_DIR"
else
    # pycocoevalcap is a namespace package: use __path__, it has no __file__.
    lib="$("$python" -c 'import os, pycocoevalcap; print(os.path.join(list(pycocoevalcap.__path__)[0], "spice", "lib"))')" || {
        echo "error: $python cannot import pycocoevalcap; install the project first (pip install -e .)" >&2
        exit 1
    }
fi
mkdir -p "$lib"

if [[ -f "$lib/$JAR.jar" && -f "$lib/$JAR-models.jar" ]]; then
    echo "SPICE models already present in $lib"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "downloading $URL (about 400 MB) ..."
if command -v curl >/dev/null; then
    curl -fL --retry 3 -o "$tmp/corenlp.zip" "$URL"
else
    wget -O "$tmp/corenlp.zip" "$URL"
fi
unzip -q -j "$tmp/corenlp.zip" "$CORENLP/$JAR.jar" "$CORENLP/$JAR-models.jar" -d "$tmp"
# Move into place only once both are complete, so an interrupted run leaves nothing half-written.
for f in "$JAR.jar" "$JAR-models.jar"; do
    cp "$tmp/$f" "$lib/.$f.part"
    mv -f "$lib/.$f.part" "$lib/$f"
done
echo "installed $JAR.jar and $JAR-models.jar in $lib; SPICE is now enabled"

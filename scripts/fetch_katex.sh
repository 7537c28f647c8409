#!/usr/bin/env bash
# Refresh the KaTeX copy bundled with `ocrtune serve` (ocrtune/serve/static/katex/) from the npm registry.
# Only katex.min.js, katex.min.css (woff2-only @font-face rules), the woff2 fonts and the license are kept
# (~600 KB), so the web page renders formulas with no internet. Usage: scripts/fetch_katex.sh [version]
set -euo pipefail
VERSION="${1:-0.19.1}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/ocrtune/serve/static/katex"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent "katex@$VERSION" >/dev/null && tar xzf katex-*.tgz)
rm -rf "$DEST"
mkdir -p "$DEST/fonts"
cp "$TMP/package/dist/katex.min.js" "$DEST/"
cp "$TMP/package/dist/fonts/"*.woff2 "$DEST/fonts/"
cp "$TMP/package/LICENSE" "$DEST/LICENSE"
# keep only the woff2 source of each font (every browser that runs the page reads woff2)
sed -E 's/,url\(fonts\/[A-Za-z0-9_-]+\.woff\) format\("woff"\),url\(fonts\/[A-Za-z0-9_-]+\.ttf\) format\("truetype"\)//g' \
  "$TMP/package/dist/katex.min.css" > "$DEST/katex.min.css"
if grep -qE '\.(woff|ttf)\)' "$DEST/katex.min.css"; then
  echo "fetch_katex: could not strip woff/ttf font sources from katex.min.css" >&2; exit 1
fi
echo "$VERSION" > "$DEST/VERSION"
du -sh "$DEST"

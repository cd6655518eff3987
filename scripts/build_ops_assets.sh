#!/usr/bin/env bash
# Copies the operator page's third-party assets into the Python package, from the versions
# web/ops/package-lock.json pins (Leaflet 1.9.4, BSD-2-Clause). The copies are committed, so
# the package works without npm; run this after changing web/ops/package.json and commit
# what it changed (docs/OPS.md#assets). tests/unit/test_opspage.py checks the copies match
# the lockfile's version.
#
# Usage: scripts/build_ops_assets.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
(cd web/ops && npm ci --no-audit --no-fund)

src=web/ops/node_modules/leaflet
dest=dispatcher/api/opsassets/vendor/leaflet
rm -rf "$dest"
mkdir -p "$dest/images"
# The minified build and its stylesheet; the stylesheet names images/ relative to itself.
cp "$src/dist/leaflet.js" "$src/dist/leaflet.css" "$dest/"
cp "$src"/dist/images/*.png "$dest/images/"
cp "$src/LICENSE" "$dest/LICENSE.txt"
version=$(node -p "require('./$src/package.json').version")
licence=$(node -p "require('./$src/package.json').license")
printf 'leaflet %s %s\n' "$version" "$licence" >"$dest/VERSION.txt"
# The source map is left out: browsers fetch it only with developer tools open.
sed -i '/^\/\/# sourceMappingURL=/d' "$dest/leaflet.js"
echo "copied leaflet $version ($licence) into $dest"

#!/bin/sh
# Code lines per built-in plugin (issue 13: each algorithm in at most 80): lines that are
# not blank and not `//` comments, outside `#[cfg(test)]` items. Built-ins are the crates
# listed in plugins/builtins.txt (every crate under plugins/ but the SDK if there is none).
# Usage: bench/plugin_lines.sh [LIMIT]   (exits 1 when a plugin is over LIMIT, default 80)
set -eu
cd "$(dirname "$0")/.."
limit=${1:-80}
if [ -f plugins/builtins.txt ]; then
    names=$(grep -v '^[[:space:]]*\(#\|$\)' plugins/builtins.txt)
else
    names=$(ls plugins | grep -vx sdk)
fi
over=0
for name in $names; do
    lines=$(awk '
        # A `#[cfg(test)]` item is skipped up to the brace that closes it.
        /^[[:space:]]*#\[cfg\(test\)\]/ { skip = 1; depth = 0; opened = 0; next }
        skip {
            line = $0
            o = gsub(/\{/, "", line); c = gsub(/\}/, "", line)
            depth += o - c
            if (o > 0) opened = 1
            if (opened && depth <= 0) skip = 0
            next
        }
        /^[[:space:]]*$/ || /^[[:space:]]*\/\// { next }
        { n++ }
        END { print n + 0 }
    ' plugins/"$name"/src/*.rs)
    flag=""
    if [ "$lines" -gt "$limit" ]; then flag="  over $limit"; over=1; fi
    printf '%-28s %4d%s\n' "$name" "$lines" "$flag"
done
exit $over

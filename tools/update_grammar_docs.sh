#!/bin/sh
# Regenerates the spec grammar's token table in docs/gradcheck.md and the token
# list in README.md from the grammar table (spec_layers<S>() in
# include/moonwalk/nets/spec.hpp), between their BEGIN/END markers.
# tests/tools/test_grammar_docs.cpp checks both against the table.
#
# usage: tools/update_grammar_docs.sh BUILD_DIR   (BUILD_DIR/bin/moonwalk-gradcheck built)
set -eu
build=${1:?usage: tools/update_grammar_docs.sh BUILD_DIR}
tool="$build/bin/moonwalk-gradcheck"
[ -x "$tool" ] || { echo "update_grammar_docs.sh: $tool not found (build moonwalk-gradcheck first)" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)

# replace FILE MARKER FORMAT: the lines strictly between "<!-- BEGIN MARKER" and
# "<!-- END MARKER -->" become the tool's --grammar FORMAT output; written to a
# temporary file in the same directory, then renamed over FILE.
replace() {
  file=$1 marker=$2 format=$3
  gen=$(mktemp "$file.gen.XXXXXX")
  out=$(mktemp "$file.new.XXXXXX")
  trap 'rm -f "$gen" "$out"' EXIT
  "$tool" --grammar "$format" > "$gen"
  awk -v begin="<!-- BEGIN $marker" -v end="<!-- END $marker -->" -v gen="$gen" '
    index($0, begin) == 1 { print; while ((getline line < gen) > 0) print line; skip = 1; found++; next }
    index($0, end) == 1   { skip = 0 }
    !skip                 { print }
    END { if (found != 1) { print "no single BEGIN marker" > "/dev/stderr"; exit 1 } }
  ' "$file" > "$out" || { echo "update_grammar_docs.sh: $file: markers '$marker' not found once" >&2; exit 1; }
  chmod --reference="$file" "$out"
  mv "$out" "$file"
  rm -f "$gen"
  trap - EXIT
}
replace "$root/docs/gradcheck.md" spec_layers markdown
replace "$root/README.md" spec_tokens list
echo "updated docs/gradcheck.md and README.md from $tool"

# Sourced by setup.sh and build-debian-image.sh: the archive URI the
# machine's own apt sources (one-line or deb822) already use for a suite, so
# no host name is ever written into the project.
#   apt_mirror_for SUITE   -> prints the first URI that serves SUITE, or nothing
apt_mirror_for() {
  local suite=$1 f
  {
    awk '$1 == "deb" { line = $0; gsub(/\[[^]]*\]/, "", line); split(line, f, /[[:space:]]+/); print f[2], f[3] }' \
      /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -e "$f" ] || continue
      awk 'BEGIN { RS = ""; FS = "\n" }
           { uris = ""; suites = "";
             for (i = 1; i <= NF; i++) {
               if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[[:space:]]*/, "", uris) }
               if ($i ~ /^Suites:/) { suites = $i; sub(/^Suites:[[:space:]]*/, "", suites) }
             }
             n = split(uris, u, /[[:space:]]+/); m = split(suites, s, /[[:space:]]+/);
             for (a = 1; a <= n; a++) for (b = 1; b <= m; b++) print u[a], s[b] }' "$f"
    done
  } | awk -v suite="$suite" '$2 == suite { print $1; exit }'
}

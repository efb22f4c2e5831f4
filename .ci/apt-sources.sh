# Reading the machine's apt sources, for install-qemu.sh (sourced; also by test/installQemu.test.ts).
# No network, no writes: functions that print what an apt configuration directory says.

# Prints "URI SUITE" for every enabled binary (`deb`) source of the apt configuration in $1 (default /etc/apt),
# in apt's order: sources.list, then sources.list.d/*.list (one-line format) and *.sources (deb822) by name.
# URIs lose their trailing slashes; deb-src entries, comments and `Enabled: no` stanzas are skipped.
apt_sources() {
  local etc=${1:-/etc/apt} file
  local -a files=()
  [[ -f $etc/sources.list ]] && files+=("$etc/sources.list")
  for file in "$etc"/sources.list.d/*; do
    [[ -f $file && ( $file == *.list || $file == *.sources ) ]] && files+=("$file")
  done
  for file in "${files[@]}"; do
    if [[ $file == *.sources ]]; then
      awk '
        function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t\r]+$/, "", s); return s }
        function flush(   n, m, i, j, u, s, uri) {
          if ((" " types " ") ~ /[ \t]deb[ \t]/ && tolower(enabled) != "no") {
            n = split(uris, u, /[ \t]+/); m = split(suites, s, /[ \t]+/)
            for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) {
              uri = u[i]; sub(/\/+$/, "", uri)
              if (uri != "" && s[j] != "") print uri, s[j]
            }
          }
          types = ""; uris = ""; suites = ""; enabled = ""; field = ""
        }
        /^#/ { next }
        /^[ \t\r]*$/ { flush(); next }
        /^[ \t]/ {
          # a continuation line of the field above
          if (field == "types") types = types " " trim($0)
          else if (field == "uris") uris = uris " " trim($0)
          else if (field == "suites") suites = suites " " trim($0)
          next
        }
        {
          field = tolower($0); sub(/:.*/, "", field); field = trim(field)
          value = $0; sub(/^[^:]*:/, "", value); value = trim(value)
          if (field == "types") types = value
          else if (field == "uris") uris = value
          else if (field == "suites") suites = value
          else if (field == "enabled") enabled = value
        }
        END { flush() }
      ' "$file"
    else
      awk '
        $1 == "deb" {
          i = 2
          # options: "[arch=amd64 signed-by=...]", possibly spread over several words
          if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
          uri = $i; suite = $(i + 1); sub(/\/+$/, "", uri)
          if (uri != "" && suite != "") print uri, suite
        }
      ' "$file"
    fi
  done
}

# Prints the mirror that serves the suite $2 (a release codename: bookworm) in the apt configuration in $1:
# the URI of its first enabled deb source. Prints nothing when no source carries that suite.
apt_mirror_for() {
  apt_sources "$1" | awk -v suite="$2" '$2 == suite { print $1; exit }'
}

# Succeeds when the apt configuration in $1 already has an enabled deb source for suite $2.
apt_has_suite() {
  apt_sources "$1" | awk -v suite="$2" '$2 == suite { found = 1 } END { exit !found }'
}

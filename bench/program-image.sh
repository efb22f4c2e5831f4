#!/usr/bin/env bash
# program-image.sh OUT SIZE -- a RAM image of real programs' bytes, for the compression rows of a memory that
# compresses as a guest's code and data do (deflate level 1: about 0.4 of the bytes here), unlike the
# half-zero image's random pages: this machine's shared libraries and programs (/usr/lib/x86_64-linux-gnu,
# /usr/bin, /usr/libexec, files over 64 KiB) one after the other in name order, cut at SIZE bytes (numfmt IEC
# suffixes allowed), started over if they run short. The same machine gives the same image: bench.ts and
# qemu-extra-bench.sh (row zlibprog) both build theirs with this script.
set -euo pipefail
out=$1
size=$(numfmt --from=iec "$2")
python3 - "$out" "$size" <<'PY'
import os, sys
out, size = sys.argv[1], int(sys.argv[2])
files = []
for d in ('/usr/lib/x86_64-linux-gnu', '/usr/bin', '/usr/libexec'):
    if os.path.isdir(d):
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) > 65536:
                files.append(p)
files.sort()
if not files:
    sys.exit('program-image.sh: no programs found')
left = size
with open(out, 'wb') as f:
    while left > 0:
        for p in files:
            if left == 0:
                break
            try:
                with open(p, 'rb') as g:
                    data = g.read(left)
            except OSError:
                continue
            f.write(data)
            left -= len(data)
PY

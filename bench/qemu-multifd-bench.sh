#!/usr/bin/env bash
# qemu-multifd-bench.sh -- reference measurement of QEMU's own multifd live migration
# on this machine (loopback TCP, paused guests, RAM-only "machine none").
#
# Usage (as root):
#   bash bench/qemu-multifd-bench.sh   (from the project root; a copy of the shared reference script; SIZE=256M REPS=1 for a quick look)
# Environment knobs (defaults in brackets):
#   SIZE=1G            guest RAM size / image size (numfmt IEC suffixes: 512M, 1G, 2G)
#   CHANNELS="0 1 2 4 8" multifd channel counts for the random image ("0" = multifd off, legacy precopy)
#   REPS=5             repetitions per configuration (table shows median and best)
#   WARMUP=1           one discarded 2-channel migration per destination mode before measuring
#   COMP_CHANNELS=2    channel count for the 50%-zero-image compression runs
#   COMPRESSIONS="none zlib zstd"   multifd-compression values for the 50%-zero image
#   QEMU_FROM=backports  where to install QEMU from if missing: backports | stable
#   TMPFS=1            put RAM images on a tmpfs mounted under $WORK (0 = plain files in $WORK)
#   TMPFS_HUGE=never   tmpfs huge= option (never | always | within_size)
#   DST_MODES="prefault fresh"  destination RAM: prefault = prealloc=on (pages faulted in before the
#                      migration starts, measures the pipeline only); fresh = untouched sparse file
#                      (every received page also costs a first-touch page fault, as in a real incoming VM)
#   RUN_TIMEOUT=300    seconds allowed per migration
#   MAX_BW=1099511627776  max-bandwidth (bytes/s) for the source
#   DOWNTIME_MS=60000  downtime-limit (ms) for the source
#   IPERF_SECS=5       iperf3 duration; SKIP_IPERF=1 / SKIP_MEM=1 to skip the physical-limit part
#   WORK=/tmp/qemu-multifd-bench   scratch dir (removed at the end unless KEEP=1)
# Output: human-readable tables on stdout; raw per-run data in $WORK/results.tsv
# (copied to /tmp/qemu-multifd-bench-results.tsv before cleanup).
set -euo pipefail

SIZE=${SIZE:-1G}
CHANNELS=${CHANNELS-"0 1 2 4 8"}
REPS=${REPS:-5}
WARMUP=${WARMUP:-1}
COMP_CHANNELS=${COMP_CHANNELS:-2}
COMPRESSIONS=${COMPRESSIONS-"none zlib zstd"}
QEMU_FROM=${QEMU_FROM:-backports}
TMPFS=${TMPFS:-1}
TMPFS_HUGE=${TMPFS_HUGE:-never}
DST_MODES=${DST_MODES-"prefault fresh"}
DST_PREALLOC=off
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
MAX_BW=${MAX_BW:-1099511627776}
DOWNTIME_MS=${DOWNTIME_MS:-60000}
IPERF_SECS=${IPERF_SECS:-5}
SKIP_IPERF=${SKIP_IPERF:-0}
SKIP_MEM=${SKIP_MEM:-0}
WORK=${WORK:-/tmp/qemu-multifd-bench}
KEEP=${KEEP:-0}
QEMU=${QEMU:-qemu-system-x86_64}

case "$WORK" in /tmp/*) ;; *) echo "WORK must be under /tmp" >&2; exit 1;; esac
SIZE_B=$(numfmt --from=iec "$SIZE")
RAM="$WORK/ram"
PIDS=()          # every process we start; killed by PID only
MOUNTED=0

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

wait_pid() {     # wait_pid PID SECONDS : bounded wait, then SIGKILL that PID
  local pid=$1 secs=$2 i
  for ((i = 0; i < secs * 20; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid still alive after ${secs}s, SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local p
  for p in "${PIDS[@]:-}"; do
    [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null && { kill -TERM "$p" 2>/dev/null || true; wait_pid "$p" 5; }
  done
  [[ -f "$WORK/results.tsv" ]] && cp "$WORK/results.tsv" /tmp/qemu-multifd-bench-results.tsv || true
  if [[ "$MOUNTED" == 1 ]]; then umount "$RAM" 2>/dev/null || log "umount $RAM failed"; fi
  if [[ "$KEEP" != 1 ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- 1. install
install_deps() {
  local need_qemu=0 need_iperf=0 codename
  command -v "$QEMU" >/dev/null || need_qemu=1
  command -v iperf3 >/dev/null || need_iperf=1
  command -v gcc >/dev/null || log "gcc missing: C memcpy test will be skipped"
  codename=$(. /etc/os-release; echo "${VERSION_CODENAME:-bookworm}")
  mkdir -p "$WORK/apt"
  # the backports suite of the machine's own Debian mirror (read from its apt sources)
  local mirror
  mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
  [[ -n "$mirror" ]] || mirror=$(awk '$1 == "deb" && $2 ~ /\/debian$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
  echo "deb $mirror ${codename}-backports main" > "$WORK/apt/bp.list"
  # backports is only *added for this command* (no file under /etc is touched)
  APT_BP=(-o "Dir::Etc::sourcelist=$WORK/apt/bp.list" -o "Dir::Etc::sourceparts=/etc/apt/sources.list.d"
          -o "APT::Get::List-Cleanup=0")
  if (( need_qemu || need_iperf )); then
    log "apt-get update (stable + ${codename}-backports)"
    timeout 300 apt-get update -qq "${APT_BP[@]}" >/dev/null || log "apt-get update had errors"
  fi
  if (( need_qemu )); then
    if [[ "$QEMU_FROM" == backports ]] &&
       DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends \
         "${APT_BP[@]}" -t "${codename}-backports" qemu-system-x86 >/dev/null; then
      log "installed qemu-system-x86 from ${codename}-backports"
    else
      DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends \
        qemu-system-x86 >/dev/null
      log "installed qemu-system-x86 from ${codename} (stable)"
    fi
  fi
  if (( need_iperf )); then
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends iperf3 >/dev/null
  fi
  echo "== apt-cache policy qemu-system-x86 (stable + backports sources) =="
  apt-cache "${APT_BP[@]}" policy qemu-system-x86 2>/dev/null | sed -n '1,12p'
}

# ------------------------------------------------------------ python helpers
write_helpers() {
  cat > "$WORK/qmp.py" <<'PY'
import json, socket, sys, time
class QMP:
    def __init__(self, path, timeout=120.0):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.s.settimeout(timeout)
        self.f = self.s.makefile('rwb', buffering=0)
        self.events = []
        self._read()                       # greeting
        self.cmd('qmp_capabilities')
    def _read(self):
        line = self.f.readline()
        if not line:
            raise RuntimeError('QMP connection closed')
        return json.loads(line)
    def cmd(self, name, **args):
        msg = {'execute': name}
        if args:
            msg['arguments'] = args
        self.f.write((json.dumps(msg) + '\n').encode())
        while True:
            r = self._read()
            if 'return' in r:
                return r['return']
            if 'error' in r:
                raise RuntimeError('%s: %s' % (name, r['error'].get('desc', r['error'])))
            self.events.append(r)
    def wait_event(self, name, pred, timeout):
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get('event') == name and pred(e.get('data', {})):
                    return self.events.pop(i)
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError('no %s event within %ss' % (name, timeout))
            self.s.settimeout(left)
            self.events.append(self._read())
def ts(e):
    return e['timestamp']['seconds'] + e['timestamp']['microseconds'] / 1e6
if __name__ == '__main__':           # qmp.py SOCK '{"execute":...}' ...
    q = QMP(sys.argv[1], timeout=20)
    for a in sys.argv[2:]:
        m = json.loads(a)
        print(json.dumps(q.cmd(m['execute'], **m.get('arguments', {}))))
PY

  cat > "$WORK/mig.py" <<'PY'
# One migration: configure both sides over QMP, migrate, wait for the MIGRATION
# "completed" events on both sides, print one JSON object.
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp import QMP, ts
ap = argparse.ArgumentParser()
for a in ('--src', '--dst', '--compression'):
    ap.add_argument(a, required=True)
for a in ('--port', '--channels', '--max-bw', '--downtime', '--timeout', '--src-pid', '--dst-pid'):
    ap.add_argument(a, type=int, required=True)
o = ap.parse_args()
TCK = os.sysconf('SC_CLK_TCK')
def cpu(pid):                       # user+sys seconds of the whole process (all threads)
    f = open('/proc/%d/stat' % pid).read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / TCK
out = {'status': 'error'}
try:
    src, dst = QMP(o.src), QMP(o.dst)
    caps = [{'capability': 'events', 'state': True},
            {'capability': 'multifd', 'state': o.channels > 0}]
    for q in (src, dst):
        q.cmd('migrate-set-capabilities', capabilities=caps)
        if o.channels > 0:
            q.cmd('migrate-set-parameters', **{'multifd-channels': o.channels,
                                               'multifd-compression': o.compression})
    src.cmd('migrate-set-parameters', **{'max-bandwidth': o.max_bw, 'downtime-limit': o.downtime})
    dst.cmd('migrate-incoming', uri='tcp:127.0.0.1:%d' % o.port)
    c0 = (cpu(o.src_pid), cpu(o.dst_pid))
    t0 = time.time()
    src.cmd('migrate', uri='tcp:127.0.0.1:%d' % o.port)
    done = lambda d: d.get('status') in ('completed', 'failed', 'cancelled')
    try:
        es = src.wait_event('MIGRATION', done, o.timeout)
        ed = dst.wait_event('MIGRATION', done, max(5, o.timeout - (time.time() - t0)))
    except TimeoutError as e:
        try:
            src.cmd('migrate_cancel')
        except Exception:
            pass
        raise
    c1 = (cpu(o.src_pid), cpu(o.dst_pid))
    si, di = src.cmd('query-migrate'), dst.cmd('query-migrate')
    ok = es['data']['status'] == 'completed' and ed['data']['status'] == 'completed'
    out = {'status': 'completed' if ok else 'src=%s dst=%s' % (es['data']['status'], ed['data']['status']),
           'e2e_s': ts(ed) - t0, 'src_done_s': ts(es) - t0,
           'src_cpu_s': c1[0] - c0[0], 'dst_cpu_s': c1[1] - c0[1],
           'src': si, 'dst_status': di.get('status'), 'dst_error': di.get('error-desc')}
    if not ok:
        out['error'] = si.get('error-desc') or di.get('error-desc')
except Exception as e:
    out['error'] = '%s: %s' % (type(e).__name__, e)
print(json.dumps(out))
PY

  cat > "$WORK/mkimg.py" <<'PY'
# mkimg.py PATH SIZE : every other 4 KiB page random, the rest zero (50% zero pages)
import os, sys
path, size, P = sys.argv[1], int(sys.argv[2]), 4096
CH = 4 << 20
with open(path, 'wb') as f:
    off = 0
    while off < size:
        n = min(CH, size - off)
        npg = n // P
        r = os.urandom(((npg + 1) // 2) * P)
        buf = bytearray(n)
        for i in range(0, npg, 2):
            j = (i // 2) * P
            buf[i * P:(i + 1) * P] = r[j:j + P]
        f.write(buf)
        off += n
PY

  cat > "$WORK/memcpy.c" <<'C'
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static size_t SZ; static char *A, *B; static int NT;
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
static void *worker(void *arg){size_t i=(size_t)arg, part=SZ/NT; memcpy(B+i*part, A+i*part, part); return 0;}
int main(int argc,char**argv){
  SZ=(size_t)atoll(argv[1]); NT=atoi(argv[2]); int reps=atoi(argv[3]);
  A=malloc(SZ); B=malloc(SZ); memset(A,1,SZ); memset(B,2,SZ);
  double best=1e9; pthread_t th[64];
  for(int r=0;r<reps;r++){double t=now();
    for(long i=0;i<NT;i++) pthread_create(&th[i],0,worker,(void*)i);
    for(int i=0;i<NT;i++) pthread_join(th[i],0);
    t=now()-t; if(t<best)best=t;}
  printf("%.2f\n", SZ/best/(1<<30)); return 0;}
C
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# ----------------------------------------------------------- one migration
# run_one LABEL IMAGE CHANNELS COMPRESSION REP
run_one() {
  local label=$1 img=$2 ch=$3 comp=$4 rep=$5 port spid dpid res ok
  port=$(free_port)
  rm -f "$RAM/dst.img"; truncate -s "$SIZE_B" "$RAM/dst.img"     # fresh, all-zero destination RAM
  rm -f "$WORK/src.sock" "$WORK/dst.sock"
  local common=(-machine none,memory-backend=mem -m "$((SIZE_B >> 20))M" -accel tcg -nodefaults
                -display none -S -monitor none -serial none -parallel none)
  "$QEMU" "${common[@]}" -name dst \
    -object "memory-backend-file,id=mem,size=$SIZE_B,mem-path=$RAM/dst.img,share=on,prealloc=$DST_PREALLOC" \
    -qmp "unix:$WORK/dst.sock,server=on,wait=off" -incoming defer \
    >"$WORK/dst.log" 2>&1 &
  dpid=$!; PIDS+=("$dpid")
  # source: private (copy-on-write) mapping of the image, fully pre-faulted like resident guest RAM;
  # the image file itself is never modified.
  "$QEMU" "${common[@]}" -name src \
    -object "memory-backend-file,id=mem,size=$SIZE_B,mem-path=$img,share=off,prealloc=on" \
    -qmp "unix:$WORK/src.sock,server=on,wait=off" \
    >"$WORK/src.log" 2>&1 &
  spid=$!; PIDS+=("$spid")
  res=$(timeout $((RUN_TIMEOUT + 150)) python3 "$WORK/mig.py" --src "$WORK/src.sock" --dst "$WORK/dst.sock" \
          --port "$port" --channels "$ch" --compression "$comp" --max-bw "$MAX_BW" \
          --downtime "$DOWNTIME_MS" --timeout "$RUN_TIMEOUT" --src-pid "$spid" --dst-pid "$dpid") ||
    res='{"status":"error","error":"driver timed out or crashed"}'
  [[ -n "$res" ]] || res='{"status":"error","error":"driver printed nothing"}'
  timeout 15 python3 "$WORK/qmp.py" "$WORK/src.sock" '{"execute":"quit"}' >/dev/null 2>&1 || true
  timeout 15 python3 "$WORK/qmp.py" "$WORK/dst.sock" '{"execute":"quit"}' >/dev/null 2>&1 || true
  wait_pid "$spid" 20; wait_pid "$dpid" 20
  if cmp -s "$img" "$RAM/dst.img"; then ok=yes; else ok=no; fi
  python3 - "$label" "$(basename "$img")" "$ch" "$comp" "$rep" "$ok" "$res" >>"$WORK/results.tsv" <<'PY'
import json, sys
label, img, ch, comp, rep, ok, res = sys.argv[1:]
r = json.loads(res); s = r.get('src', {}); ram = s.get('ram', {})
err = (r.get('error') or '').replace('\t', ' ').replace('\n', ' ')
print('\t'.join(str(x) for x in [label, img, ch, comp, rep, r.get('status'), s.get('total-time', ''),
      s.get('setup-time', ''), s.get('downtime', ''), '%.4f' % r['e2e_s'] if 'e2e_s' in r else '',
      ram.get('total', ''), ram.get('transferred', ''), ram.get('normal-bytes', ''), ram.get('duplicate', ''),
      ram.get('multifd-bytes', ''), ram.get('mbps', ''), '%.2f' % r.get('src_cpu_s', 0),
      '%.2f' % r.get('dst_cpu_s', 0), ok, err]))
PY
  local line; line=$(tail -n 1 "$WORK/results.tsv")
  log "$(echo "$line" | awk -F'\t' '{printf "%-14s ch=%s comp=%s rep=%s status=%s total=%sms e2e=%ss ok=%s %s", $1,$3,$4,$5,$6,$7,$10,$19,$20}')"
  if [[ "$(echo "$line" | cut -f6)" != completed ]]; then
    log "src.log: $(tail -c 600 "$WORK/src.log" | tr '\n' ' ')"
    log "dst.log: $(tail -c 600 "$WORK/dst.log" | tr '\n' ' ')"
  fi
}

summarize() {
  python3 - "$WORK/results.tsv" "$SIZE_B" <<'PY'
import sys, statistics as st
rows = [l.rstrip('\n').split('\t') for l in open(sys.argv[1])
        if l.strip() and not l.startswith('label') and not l.startswith('warmup')]
size = int(sys.argv[2]); G = 1 << 30
groups = {}
for r in rows:
    groups.setdefault((r[0], r[1], r[2], r[3]), []).append(r)
hdr = ('%-13s %-13s %3s %-5s %4s | %8s %8s %8s %8s | %8s %9s | %7s %7s | %s'
       % ('set', 'image', 'ch', 'comp', 'reps', 'total_s', 'e2e_s', 'GiB/s', 'bestGiB', 'wireGiB', 'zeropages', 'srcCPU', 'dstCPU', 'correct'))
print(hdr); print('-' * len(hdr))
for (label, img, ch, comp), rs in groups.items():
    good = [r for r in rs if r[5] == 'completed']
    correct = 'yes' if all(r[18] == 'yes' for r in rs) and good and len(good) == len(rs) else \
              'no (%d/%d ok)' % (sum(r[18] == 'yes' for r in rs), len(rs))
    if not good:
        print('%-13s %-13s %3s %-5s %4d | FAILED: %s' % (label, img, ch, comp, len(rs), rs[-1][19][:150])); continue
    tot = st.median(float(r[6]) / 1000 for r in good)
    e2e = st.median(float(r[9]) for r in good)
    wire = st.median(int(r[11]) for r in good) / G
    zp = st.median(int(r[13]) for r in good)
    best = min(float(r[6]) / 1000 for r in good)
    sc = st.median(float(r[16]) for r in good); dc = st.median(float(r[17]) for r in good)
    print('%-13s %-13s %3s %-5s %4d | %8.3f %8.3f %8.3f %8.3f | %8.3f %9d | %7.2f %7.2f | %s'
          % (label, img, 'off' if ch == '0' else ch, comp, len(good), tot, e2e, size / G / tot, size / G / best,
             wire, zp, sc, dc, correct))
    if len(good) > 1:
        print('%-13s   per-rep total_s: %s' % ('', ' '.join('%.3f' % (float(r[6]) / 1000) for r in good)))
PY
}

# ------------------------------------------------------------ physical limits
physical_limits() {
  echo; echo "== physical-limit reference =="
  if [[ "$SKIP_IPERF" != 1 ]] && command -v iperf3 >/dev/null; then
    local P port ipid
    for P in 1 4; do
      port=$(free_port)
      iperf3 -s -1 -B 127.0.0.1 -p "$port" >/dev/null 2>&1 & ipid=$!; PIDS+=("$ipid")
      sleep 0.5
      if timeout $((IPERF_SECS + 30)) iperf3 -c 127.0.0.1 -p "$port" -t "$IPERF_SECS" -P "$P" -J >"$WORK/iperf$P.json" 2>&1; then
        python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["end"]; b=e["sum_received"]["bits_per_second"]
print("iperf3 loopback -P %s %ss: %.2f Gbit/s = %.3f GiB/s (sender CPU %.0f%%, receiver CPU %.0f%%)" % (sys.argv[2], sys.argv[3], b/1e9, b/8/2**30, e["cpu_utilization_percent"]["host_total"], e["cpu_utilization_percent"]["remote_total"]))' \
          "$WORK/iperf$P.json" "$P" "$IPERF_SECS"
      else
        echo "iperf3 -P $P failed: $(tail -c 300 "$WORK/iperf$P.json")"
      fi
      wait_pid "$ipid" 10
    done
    # iperf3 3.12 runs all -P streams in ONE thread; two independent processes use both cores
    local p1 p2 s1 s2 c1 c2
    p1=$(free_port); p2=$(free_port)
    iperf3 -s -1 -B 127.0.0.1 -p "$p1" >/dev/null 2>&1 & s1=$!; PIDS+=("$s1")
    iperf3 -s -1 -B 127.0.0.1 -p "$p2" >/dev/null 2>&1 & s2=$!; PIDS+=("$s2")
    sleep 0.5
    timeout $((IPERF_SECS + 30)) iperf3 -c 127.0.0.1 -p "$p1" -t "$IPERF_SECS" -J >"$WORK/iperfA.json" 2>&1 & c1=$!; PIDS+=("$c1")
    timeout $((IPERF_SECS + 30)) iperf3 -c 127.0.0.1 -p "$p2" -t "$IPERF_SECS" -J >"$WORK/iperfB.json" 2>&1 & c2=$!; PIDS+=("$c2")
    wait_pid "$c1" $((IPERF_SECS + 40)); wait_pid "$c2" $((IPERF_SECS + 40)); wait_pid "$s1" 10; wait_pid "$s2" 10
    python3 -c 'import json,sys
try:
    b=[json.load(open(f))["end"]["sum_received"]["bits_per_second"] for f in sys.argv[1:3]]
    print("iperf3 loopback, 2 concurrent processes x 1 stream %ss: %.2f Gbit/s = %.3f GiB/s (%.2f + %.2f Gbit/s)" % (sys.argv[3], sum(b)/1e9, sum(b)/8/2**30, b[0]/1e9, b[1]/1e9))
except Exception as e:
    print("iperf3 2-process run failed:", e)' "$WORK/iperfA.json" "$WORK/iperfB.json" "$IPERF_SECS"
  fi
  if [[ "$SKIP_MEM" != 1 ]]; then
    echo "dd if=/dev/zero of=/dev/null bs=1M count=20000: $(timeout 120 dd if=/dev/zero of=/dev/null bs=1M count=20000 2>&1 | tail -n 1)"
    if command -v gcc >/dev/null && gcc -O2 -pthread -o "$WORK/memcpy" "$WORK/memcpy.c"; then
      local t
      for t in 1 2; do
        echo "memcpy 1 GiB -> 1 GiB, $t thread(s), best of 5: $(timeout 120 "$WORK/memcpy" $((1 << 30)) "$t" 5) GiB/s"
      done
    fi
  fi
}

# ===================================================================== main
[[ $EUID -eq 0 ]] || { echo "run as root (apt-get, mount)" >&2; exit 1; }
mkdir -p "$WORK" "$RAM"
install_deps
write_helpers
echo "== environment =="
echo "QEMU: $("$QEMU" --version | head -n 1)"
echo "iperf3: $(iperf3 --version 2>/dev/null | head -n 1)"
echo "CPU: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), RAM $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r)"
echo "SIZE=$SIZE ($SIZE_B bytes) REPS=$REPS MAX_BW=$MAX_BW DOWNTIME_MS=$DOWNTIME_MS TMPFS=$TMPFS TMPFS_HUGE=$TMPFS_HUGE DST_MODES=\"$DST_MODES\""

if [[ "$TMPFS" == 1 ]]; then
  if mount -t tmpfs -o "size=$(( (3 * SIZE_B >> 20) + 256 ))M,huge=$TMPFS_HUGE" tmpfs "$RAM"; then
    MOUNTED=1; echo "RAM images on tmpfs $RAM (huge=$TMPFS_HUGE)"
  else
    echo "tmpfs mount failed; RAM images are plain files under $RAM ($(df --output=fstype "$RAM" | tail -n 1))"
  fi
fi

log "creating images"
head -c "$SIZE_B" /dev/urandom > "$RAM/random.img"
python3 "$WORK/mkimg.py" "$RAM/halfzero.img" "$SIZE_B"
printf 'label\timage\tch\tcomp\trep\tstatus\ttotal_ms\tsetup_ms\tdowntime_ms\te2e_s\tram_total\ttransferred\tnormal_bytes\tzero_pages\tmultifd_bytes\tmbps\tsrc_cpu_s\tdst_cpu_s\tcorrect\terror\n' >"$WORK/results.tsv"

dst_mode() {
  case "$1" in prefault) DST_PREALLOC=on;; fresh) DST_PREALLOC=off;; *) echo "bad DST_MODES entry $1" >&2; exit 1;; esac
}
if [[ "$WARMUP" == 1 ]]; then
  for mode in $DST_MODES; do dst_mode "$mode"; run_one warmup "$RAM/random.img" 2 none 0; done
fi
# repetitions are the outer loop so that slow drifts spread over all configurations
for ((r = 1; r <= REPS; r++)); do
  for mode in $DST_MODES; do
    dst_mode "$mode"
    for ch in $CHANNELS; do run_one "dst=$mode" "$RAM/random.img" "$ch" none "$r"; done
    for comp in $COMPRESSIONS; do run_one "dst=$mode" "$RAM/halfzero.img" "$COMP_CHANNELS" "$comp" "$r"; done
  done
done

echo; echo "== QEMU multifd results (SIZE=$SIZE; total_s = QEMU total-time on source; e2e_s = 'migrate' command -> destination 'completed' event;"
echo "   GiB/s = guest RAM size / median total_s, bestGiB = same for the fastest rep; wireGiB = ram.transferred; CPU = seconds of CPU used by each QEMU during the migration) =="
summarize
physical_limits

#!/usr/bin/env bash
# qemu-extra-bench.sh -- extra reference measurements of QEMU's own multifd migration on this machine
# (trimmed adaptation of bench/qemu-multifd-bench.sh: paused guests, RAM-only "machine none",
# random RAM image on tmpfs, destination RAM pre-faulted with prealloc=on).
#
# Rows measured (all with multifd, CHANNELS channels, multifd-compression none, but zlib-prog):
#   tcp        QEMU -> QEMU over loopback TCP, no TLS (reference row)
#   tcp+tls    same, with TLS-PSK (tls-creds-psk, username "qemu", key from a keys.psk file), QEMU's default
#              TLS priority (the cipher gnutls picks is reported from the sniffed ServerHello)
#   tls-aes    TLS-PSK with TLS_PRIO_AES as the creds' priority= on both
#              sides (default removes CHACHA20-POLY1305, so AES-GCM is negotiated)
#   file-save  source QEMU saves its RAM to a file: URI with the mapped-ram capability (file on tmpfs)
#   file-load  destination QEMU restores that file (incoming file: + mapped-ram + multifd)
#   zlib-prog  (row zlibprog, not run by default) multifd-compression zlib over COMP_CHANNELS channels on an
#              image of this machine's programs and libraries (bench/program-image.sh, as `npm run bench`'s
#              COMP_IMAGES=program rows): a memory that compresses as code and data do
# Note: file-save writes into freshly allocated tmpfs pages; on this VM (page_reporting + DAMON) first
# touch of such pages is expensive, and perf shows the save ~62% in copy_folio_from_iter_atomic and
# ~26% spinning on the file's inode rwsem (the channels' pwritev calls serialize on one tmpfs inode),
# so its time hardly depends on CHANNELS (1 channel measured about the same).
#
# Usage (as root, from the project root):
#   SIZE=1G REPS=3 bash bench/qemu-extra-bench.sh
# Environment knobs (defaults in brackets):
#   SIZE=1G          guest RAM size / image size (numfmt IEC suffixes: 512M, 1G, 2G)
#   REPS=3           repetitions per row (table shows median and best)
#   CHANNELS=4       multifd-channels for every row
#   ROWS="tcp tls tlsaes file"  which configurations to run (tcp | tls | tlsaes | file | zlibprog)
#   COMP_CHANNELS=2  multifd-channels for the zlibprog row
#   TLS_PRIO_AES="NORMAL:-CHACHA20-POLY1305"  priority= for the tlsaes row (QEMU appends the PSK kx)
#   WARMUP=1         one discarded run per configuration before measuring (the TLS warm-up also sniffs
#                    the TLS ServerHello on lo to report the negotiated version / cipher; SNIFF_TLS=0 skips)
#   TMPFS=1          put RAM images and the migration file on a tmpfs mounted under $WORK
#   TMPFS_HUGE=never tmpfs huge= option (never | always | within_size)
#   RUN_TIMEOUT=300  seconds allowed per migration (per phase for file save / restore)
#   MAX_BW=1099511627776  max-bandwidth (bytes/s) for the source
#   DOWNTIME_MS=60000     downtime-limit (ms) for the source
#   WORK=/tmp/qemu-extra-bench   scratch dir (removed at the end unless KEEP=1)
# Output: table on stdout; raw per-run data in $WORK/results.tsv
# (copied to /tmp/qemu-extra-bench-results.tsv before cleanup).
set -euo pipefail

SIZE=${SIZE:-1G}
REPS=${REPS:-3}
CHANNELS=${CHANNELS:-4}
COMP_CHANNELS=${COMP_CHANNELS:-2}
ROWS=${ROWS-"tcp tls tlsaes file"}
TLS_PRIO_AES=${TLS_PRIO_AES:-NORMAL:-CHACHA20-POLY1305}
WARMUP=${WARMUP:-1}
SNIFF_TLS=${SNIFF_TLS:-1}
TMPFS=${TMPFS:-1}
TMPFS_HUGE=${TMPFS_HUGE:-never}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
MAX_BW=${MAX_BW:-1099511627776}
DOWNTIME_MS=${DOWNTIME_MS:-60000}
WORK=${WORK:-/tmp/qemu-extra-bench}
KEEP=${KEEP:-0}
QEMU=${QEMU:-qemu-system-x86_64}

case "$WORK" in /tmp/*) ;; *) echo "WORK must be under /tmp" >&2; exit 1;; esac
SIZE_B=$(numfmt --from=iec "$SIZE")
RAM="$WORK/ram"
PSKDIR="$WORK/psk"
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
  [[ -f "$WORK/results.tsv" ]] && cp "$WORK/results.tsv" /tmp/qemu-extra-bench-results.tsv || true
  if [[ "$MOUNTED" == 1 ]]; then umount "$RAM" 2>/dev/null || log "umount $RAM failed"; fi
  if [[ "$KEEP" != 1 ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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
# One measurement: configure both sides over QMP, run, print one JSON object.
#   --mode tcp  : migrate over tcp:127.0.0.1:PORT (optionally with tls-creds on both sides)
#   --mode file : save the source to file:PATH with mapped-ram, then restore it into the destination
import argparse, json, os, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp import QMP, ts
ap = argparse.ArgumentParser()
for a in ('--src', '--dst', '--mode'):
    ap.add_argument(a, required=True)
ap.add_argument('--file', default='')
ap.add_argument('--sniff', default='')             # path of tlssniff.py: report the TLS ServerHello
ap.add_argument('--compression', default='none')
for a in ('--port', '--channels', '--max-bw', '--downtime', '--timeout', '--src-pid', '--dst-pid', '--tls'):
    ap.add_argument(a, type=int, required=True)
o = ap.parse_args()
TCK = os.sysconf('SC_CLK_TCK')
def cpu(pid):                       # user+sys seconds of the whole process (all threads)
    f = open('/proc/%d/stat' % pid).read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / TCK
done = lambda d: d.get('status') in ('completed', 'failed', 'cancelled')
out = {'status': 'error'}
sniffer = None
try:
    src, dst = QMP(o.src), QMP(o.dst)
    caps = [{'capability': 'events', 'state': True}, {'capability': 'multifd', 'state': True}]
    if o.mode == 'file':
        caps.append({'capability': 'mapped-ram', 'state': True})
    params = {'multifd-channels': o.channels, 'multifd-compression': o.compression}
    if o.tls:
        params['tls-creds'] = 'tlscreds0'
    for q in (src, dst):
        q.cmd('migrate-set-capabilities', capabilities=caps)
        q.cmd('migrate-set-parameters', **params)
    src.cmd('migrate-set-parameters', **{'max-bandwidth': o.max_bw, 'downtime-limit': o.downtime})
    if o.mode == 'tcp':
        uri = 'tcp:127.0.0.1:%d' % o.port
        dst.cmd('migrate-incoming', uri=uri)
        if o.sniff:
            sniffer = subprocess.Popen([sys.executable, o.sniff, str(o.port), str(o.channels + 1), '20'],
                                       stdout=subprocess.PIPE, text=True)
            if sniffer.stdout.readline().strip() != 'ready':
                raise RuntimeError('TLS sniffer did not start')
        c0 = (cpu(o.src_pid), cpu(o.dst_pid))
        t0 = time.time()
        src.cmd('migrate', uri=uri)
        try:
            es = src.wait_event('MIGRATION', done, o.timeout)
            ed = dst.wait_event('MIGRATION', done, max(5, o.timeout - (time.time() - t0)))
        except TimeoutError:
            try:
                src.cmd('migrate_cancel')
            except Exception:
                pass
            raise
        c1 = (cpu(o.src_pid), cpu(o.dst_pid))
        si, di = src.cmd('query-migrate'), dst.cmd('query-migrate')
        ok = es['data']['status'] == 'completed' and ed['data']['status'] == 'completed'
        out = {'status': 'completed' if ok else 'src=%s dst=%s' % (es['data']['status'], ed['data']['status']),
               'secs': si.get('total-time', 0) / 1000, 'e2e_s': ts(ed) - t0,
               'src_cpu_s': c1[0] - c0[0], 'dst_cpu_s': c1[1] - c0[1], 'src': si}
        if not ok:
            out['error'] = si.get('error-desc') or di.get('error-desc')
        if sniffer:
            try:
                line, _ = sniffer.communicate(timeout=25)
                out['tls'] = json.loads(line.strip().splitlines()[-1])
            except Exception as e:
                out['tls'] = {'error': '%s: %s' % (type(e).__name__, e)}
    else:
        uri = 'file:' + o.file
        # ---- save: source -> file
        c0 = cpu(o.src_pid)
        t0 = time.time()
        src.cmd('migrate', uri=uri)
        try:
            es = src.wait_event('MIGRATION', done, o.timeout)
        except TimeoutError:
            try:
                src.cmd('migrate_cancel')
            except Exception:
                pass
            raise
        c1 = cpu(o.src_pid)
        si = src.cmd('query-migrate')
        fsize = os.stat(o.file).st_size
        fblocks = os.stat(o.file).st_blocks * 512
        save = {'status': es['data']['status'], 'secs': si.get('total-time', 0) / 1000,
                'e2e_s': ts(es) - t0, 'src_cpu_s': c1 - c0, 'src': si,
                'file_size': fsize, 'file_alloc': fblocks}
        if es['data']['status'] != 'completed':
            out = {'status': 'save ' + es['data']['status'], 'save': save, 'error': si.get('error-desc')}
            raise SystemExit
        # ---- restore: file -> destination (pre-faulted RAM, -incoming defer)
        d0 = cpu(o.dst_pid)
        t1 = time.time()
        dst.cmd('migrate-incoming', uri=uri)
        ed = dst.wait_event('MIGRATION', done, o.timeout)
        d1 = cpu(o.dst_pid)
        di = dst.cmd('query-migrate')
        load = {'status': ed['data']['status'], 'secs': ts(ed) - t1, 'e2e_s': ts(ed) - t1,
                'dst_cpu_s': d1 - d0, 'error': di.get('error-desc')}
        ok = save['status'] == 'completed' and load['status'] == 'completed'
        out = {'status': 'completed' if ok else 'load ' + load['status'], 'save': save, 'load': load}
        if not ok:
            out['error'] = di.get('error-desc')
except SystemExit:
    pass
except Exception as e:
    out['error'] = '%s: %s' % (type(e).__name__, e)
finally:
    if sniffer and sniffer.poll() is None:
        sniffer.kill(); sniffer.wait()
print(json.dumps(out))
PY

  cat > "$WORK/tlssniff.py" <<'PY'
# tlssniff.py PORT N SECS : read packets on lo (AF_PACKET), print the first N TLS ServerHellos sent from
# tcp PORT as one JSON line, then exit (or after SECS). Runs only during the discarded warm-up.
import json, socket, struct, sys, time
port, want, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
HRR = bytes.fromhex('cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c')
SUITES = {0x1301: 'TLS_AES_128_GCM_SHA256', 0x1302: 'TLS_AES_256_GCM_SHA384',
          0x1303: 'TLS_CHACHA20_POLY1305_SHA256', 0x1304: 'TLS_AES_128_CCM_SHA256',
          0x00a8: 'TLS_PSK_WITH_AES_128_GCM_SHA256', 0x00a9: 'TLS_PSK_WITH_AES_256_GCM_SHA384',
          0x00aa: 'TLS_DHE_PSK_WITH_AES_128_GCM_SHA256', 0x00ab: 'TLS_DHE_PSK_WITH_AES_256_GCM_SHA384',
          0xccab: 'TLS_PSK_WITH_CHACHA20_POLY1305_SHA256', 0xccac: 'TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256',
          0xccad: 'TLS_DHE_PSK_WITH_CHACHA20_POLY1305_SHA256'}
VERS = {0x0304: 'TLS1.3', 0x0303: 'TLS1.2', 0x0302: 'TLS1.1'}
GROUPS = {0x001d: 'x25519', 0x001e: 'x448', 0x0017: 'secp256r1', 0x0018: 'secp384r1', 0x0019: 'secp521r1',
          0x0100: 'ffdhe2048', 0x0101: 'ffdhe3072', 0x0102: 'ffdhe4096'}
def server_hello(p):
    if len(p) < 45 or p[0] != 0x16 or p[5] != 0x02:
        return None
    h = p[5:]; i = 4
    ver = struct.unpack('>H', h[i:i + 2])[0]; i += 2
    rnd = h[i:i + 32]; i += 32
    i += 1 + h[i]
    cs = struct.unpack('>H', h[i:i + 2])[0]; i += 3
    info = {}
    if i + 2 <= len(h):
        end = i + 2 + struct.unpack('>H', h[i:i + 2])[0]; i += 2
        while i + 4 <= min(end, len(h)):
            t, l = struct.unpack('>HH', h[i:i + 4]); d = h[i + 4:i + 4 + l]; i += 4 + l
            if t == 0x002b and len(d) >= 2: ver = struct.unpack('>H', d[:2])[0]
            elif t == 0x0033 and len(d) >= 2: info['group'] = GROUPS.get(struct.unpack('>H', d[:2])[0], hex(struct.unpack('>H', d[:2])[0]))
            elif t == 0x0029: info['psk'] = 'accepted'
    info['version'] = VERS.get(ver, hex(ver))
    info['cipher'] = SUITES.get(cs, '0x%04x' % cs)
    if rnd == HRR:
        info['hello_retry_request'] = True
    return info
def client_ciphers(p):             # offered cipher suites of a ClientHello, in the client's order
    if len(p) < 45 or p[0] != 0x16 or p[5] != 0x01:
        return None
    h = p[5:]; i = 4 + 2 + 32
    i += 1 + h[i]
    n = struct.unpack('>H', h[i:i + 2])[0]; i += 2
    cs = [struct.unpack('>H', h[j:j + 2])[0] for j in range(i, min(i + n, len(h) - 1), 2)]
    return [SUITES.get(c, '0x%04x' % c) for c in cs]
offered = None
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
s.bind(('lo', 0)); s.settimeout(0.2)
print('ready', flush=True)
seen, deadline = {}, time.time() + secs
while len(seen) < want and time.time() < deadline:
    try:
        pkt, addr = s.recvfrom(65536)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING or len(pkt) < 34 or pkt[12:14] != b'\x08\x00':
        continue
    ip = pkt[14:]
    if ip[9] != 6:
        continue
    tcp = ip[(ip[0] & 15) * 4:]
    sport, dport = struct.unpack('>HH', tcp[:4])
    if dport == port and offered is None:
        offered = client_ciphers(tcp[(tcp[12] >> 4) * 4:])
    if sport != port or dport in seen:
        continue
    hello = server_hello(tcp[(tcp[12] >> 4) * 4:])
    if hello and not hello.get('hello_retry_request'):
        seen[dport] = hello
s.close()
print(json.dumps({'handshakes': len(seen), 'distinct': sorted({json.dumps(v, sort_keys=True) for v in seen.values()}),
                  'client_offer': offered}))
PY
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# ----------------------------------------------------------- one measurement
# run_one LABEL(tcp|tls|file) REP [sniff]
run_one() {
  local label=$1 rep=$2 sniff=${3:-} port spid dpid res ok tls=0 mode=tcp img="$RAM/random.img"
  local prio="" channels=$CHANNELS compression=none
  [[ "$label" == tls || "$label" == tlsaes ]] && tls=1
  [[ "$label" == zlibprog ]] && { img="$RAM/program.img"; channels=$COMP_CHANNELS; compression=zlib; }
  [[ "$label" == tlsaes ]] && prio=",priority=$TLS_PRIO_AES"
  [[ "$label" == file ]] && mode=file
  port=$(free_port)
  rm -f "$RAM/dst.img" "$RAM/mig.bin"; truncate -s "$SIZE_B" "$RAM/dst.img"   # fresh destination RAM
  rm -f "$WORK/src.sock" "$WORK/dst.sock"
  local common=(-machine none,memory-backend=mem -m "$((SIZE_B >> 20))M" -accel tcg -nodefaults
                -display none -S -monitor none -serial none -parallel none)
  # destination: shared mapping of a tmpfs file (so it can be compared afterwards), pre-faulted
  "$QEMU" "${common[@]}" -name dst \
    -object "memory-backend-file,id=mem,size=$SIZE_B,mem-path=$RAM/dst.img,share=on,prealloc=on" \
    -object "tls-creds-psk,id=tlscreds0,endpoint=server,dir=$PSKDIR$prio" \
    -qmp "unix:$WORK/dst.sock,server=on,wait=off" -incoming defer \
    >"$WORK/dst.log" 2>&1 &
  dpid=$!; PIDS+=("$dpid")
  # source: private (copy-on-write) mapping of the image, fully pre-faulted like resident guest RAM;
  # the image file itself is never modified.
  "$QEMU" "${common[@]}" -name src \
    -object "memory-backend-file,id=mem,size=$SIZE_B,mem-path=$img,share=off,prealloc=on" \
    -object "tls-creds-psk,id=tlscreds0,endpoint=client,dir=$PSKDIR,username=qemu$prio" \
    -qmp "unix:$WORK/src.sock,server=on,wait=off" \
    >"$WORK/src.log" 2>&1 &
  spid=$!; PIDS+=("$spid")
  local extra=()
  [[ -n "$sniff" ]] && extra=(--sniff "$WORK/tlssniff.py")
  res=$(timeout $((2 * RUN_TIMEOUT + 150)) python3 "$WORK/mig.py" --src "$WORK/src.sock" --dst "$WORK/dst.sock" \
          --mode "$mode" --file "$RAM/mig.bin" --tls "$tls" --port "$port" --channels "$channels" \
          --compression "$compression" \
          --max-bw "$MAX_BW" --downtime "$DOWNTIME_MS" --timeout "$RUN_TIMEOUT" \
          --src-pid "$spid" --dst-pid "$dpid" "${extra[@]}") ||
    res='{"status":"error","error":"driver timed out or crashed"}'
  [[ -n "$res" ]] || res='{"status":"error","error":"driver printed nothing"}'
  timeout 15 python3 "$WORK/qmp.py" "$WORK/src.sock" '{"execute":"quit"}' >/dev/null 2>&1 || true
  timeout 15 python3 "$WORK/qmp.py" "$WORK/dst.sock" '{"execute":"quit"}' >/dev/null 2>&1 || true
  wait_pid "$spid" 20; wait_pid "$dpid" 20
  if cmp -s "$img" "$RAM/dst.img"; then ok=yes; else ok=no; fi
  [[ -n "$sniff" ]] && echo "$res" > "$WORK/tls-sniff-$label.json"
  python3 - "$label" "$channels" "$rep" "$ok" "$SIZE_B" "$res" >>"$WORK/results.tsv" <<'PY'
import json, sys
label, ch, rep, ok, size, res = sys.argv[1:]
r = json.loads(res); size = int(size)
err = (r.get('error') or '').replace('\t', ' ').replace('\n', ' ')
def row(lbl, d, src, status, correct, note=''):
    ram = (src or {}).get('ram', {})
    print('\t'.join(str(x) for x in [lbl, ch, rep, status, '%.4f' % d['secs'] if 'secs' in d else '',
          '%.4f' % d['e2e_s'] if 'e2e_s' in d else '', ram.get('transferred', ''), ram.get('mbps', ''),
          '%.2f' % d['src_cpu_s'] if 'src_cpu_s' in d else '', '%.2f' % d['dst_cpu_s'] if 'dst_cpu_s' in d else '',
          correct, note, err]))
if label == 'file':
    s, l = r.get('save', {}), r.get('load', {})
    fs = s.get('file_size')
    note = 'file=%s alloc=%s' % (fs, s.get('file_alloc')) if fs else ''
    # the save is correct if the file holds the whole RAM and restoring it reproduced the image
    save_ok = 'yes' if ok == 'yes' and fs and fs >= size else 'no'
    row('file-save', s, s.get('src'), s.get('status', r.get('status')), save_ok, note)
    row('file-load', l, None, l.get('status', r.get('status')), ok)
else:
    row({'tls': 'tcp+tls', 'tlsaes': 'tls-aes', 'zlibprog': 'zlib-prog'}.get(label, 'tcp'), r, r.get('src'), r.get('status'), ok,
        json.dumps(r['tls']) if 'tls' in r else '')
PY
  local line
  while IFS= read -r line; do
    log "$(echo "$line" | awk -F'\t' '{printf "%-10s ch=%s rep=%s status=%s secs=%s e2e=%s ok=%s %s %s", $1,$2,$3,$4,$5,$6,$11,$12,$13}')"
  done < <(tail -n "$([[ $label == file ]] && echo 2 || echo 1)" "$WORK/results.tsv")
  if ! grep -q "completed" <<<"$res" || [[ "$ok" != yes ]]; then
    log "result: $res"
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
    groups.setdefault((r[0], r[1]), []).append(r)
hdr = ('%-10s %3s %4s | %8s %8s %8s %8s | %8s | %7s %7s | %s'
       % ('row', 'ch', 'reps', 'secs', 'e2e_s', 'GiB/s', 'bestGiB', 'wireGiB', 'srcCPU', 'dstCPU', 'correct'))
print(hdr); print('-' * len(hdr))
for (label, ch), rs in groups.items():
    good = [r for r in rs if r[3] == 'completed']
    correct = 'yes' if good and len(good) == len(rs) and all(r[10] == 'yes' for r in rs) else \
              'no (%d/%d ok)' % (sum(r[10] == 'yes' for r in rs), len(rs))
    if not good:
        print('%-10s %3s %4d | FAILED: %s' % (label, ch, len(rs), rs[-1][12][:150])); continue
    secs = [float(r[4]) for r in good]
    med = st.median(secs)
    e2e = st.median(float(r[5]) for r in good)
    wire = ('%8.3f' % (st.median(int(r[6]) for r in good) / G)) if good[0][6] else '%8s' % '-'
    sc = ('%7.2f' % st.median(float(r[8]) for r in good)) if good[0][8] else '%7s' % '-'
    dc = ('%7.2f' % st.median(float(r[9]) for r in good)) if good[0][9] else '%7s' % '-'
    print('%-10s %3s %4d | %8.3f %8.3f %8.3f %8.3f | %s | %s %s | %s'
          % (label, ch, len(good), med, e2e, size / G / med, size / G / min(secs), wire, sc, dc, correct))
    print('%-10s   per-rep secs: %s%s' % ('', ' '.join('%.3f' % s for s in secs),
          ('   (' + good[-1][11] + ')') if label == 'file-save' and good[-1][11] else ''))
PY
}

# ===================================================================== main
[[ $EUID -eq 0 ]] || { echo "run as root (mount, AF_PACKET sniffing)" >&2; exit 1; }
command -v "$QEMU" >/dev/null || { echo "$QEMU not found" >&2; exit 1; }
mkdir -p "$WORK" "$RAM" "$PSKDIR"
write_helpers
# PSK credentials the QEMU way: DIR/keys.psk with "username:hexkey" lines (same file on both sides)
printf 'qemu:%s\n' "$(head -c 32 /dev/urandom | xxd -p -c 64)" > "$PSKDIR/keys.psk"
chmod 600 "$PSKDIR/keys.psk"

echo "== environment =="
echo "QEMU: $("$QEMU" --version | head -n 1)"
echo "gnutls: $(dpkg-query -W -f '${Version}' libgnutls30 2>/dev/null || echo '?')"
echo "CPU: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), RAM $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r)"
echo "SIZE=$SIZE ($SIZE_B bytes) REPS=$REPS CHANNELS=$CHANNELS ROWS=\"$ROWS\" MAX_BW=$MAX_BW DOWNTIME_MS=$DOWNTIME_MS TMPFS=$TMPFS TMPFS_HUGE=$TMPFS_HUGE dst=prefault(prealloc=on)"

if [[ "$TMPFS" == 1 ]]; then
  if mount -t tmpfs -o "size=$(( (4 * SIZE_B >> 20) + 256 ))M,huge=$TMPFS_HUGE" tmpfs "$RAM"; then
    MOUNTED=1; echo "RAM images and migration file on tmpfs $RAM (huge=$TMPFS_HUGE)"
  else
    echo "tmpfs mount failed; RAM images are plain files under $RAM ($(df --output=fstype "$RAM" | tail -n 1))"
  fi
fi

log "creating image"
head -c "$SIZE_B" /dev/urandom > "$RAM/random.img"
if [[ " $ROWS " == *" zlibprog "* ]]; then
  bash "$(dirname "${BASH_SOURCE[0]}")/program-image.sh" "$RAM/program.img" "$SIZE_B"
fi
printf 'label\tch\trep\tstatus\tsecs\te2e_s\ttransferred\tmbps\tsrc_cpu_s\tdst_cpu_s\tcorrect\tnote\terror\n' >"$WORK/results.tsv"

T_START=$(date '+%F %T %Z')
if [[ "$WARMUP" == 1 ]]; then
  for row in $ROWS; do
    if [[ "$row" == tls* && "$SNIFF_TLS" == 1 ]]; then run_one "$row" 0 sniff; else run_one "$row" 0; fi
  done
  # warm-up rows (rep 0) are kept in results.tsv but left out of the table
  awk -F'\t' 'BEGIN{OFS="\t"} NR > 1 && $3 == "0" {$1 = "warmup-" $1} {print}' "$WORK/results.tsv" >"$WORK/r.tmp"
  mv "$WORK/r.tmp" "$WORK/results.tsv"
fi
T_MEAS=$(date '+%F %T %Z')
# repetitions are the outer loop so that slow drifts spread over all configurations
for ((r = 1; r <= REPS; r++)); do
  for row in $ROWS; do run_one "$row" "$r"; done
done
T_END=$(date '+%F %T %Z')

echo; echo "== QEMU extra results (SIZE=$SIZE, multifd-channels=$CHANNELS, compression none but zlib-prog: zlib over $COMP_CHANNELS, dst pre-faulted) =="
echo "   secs: tcp rows = QEMU total-time on the source; file-save = source total-time of the file: migration;"
echo "         file-load = 'migrate-incoming' -> destination MIGRATION 'completed' event."
echo "   e2e_s: tcp rows = 'migrate' command -> destination 'completed' event; file-save = 'migrate' -> source 'completed'."
echo "   GiB/s = SIZE / median secs; bestGiB = same for the fastest rep; wireGiB = ram.transferred;"
echo "   CPU = seconds of CPU used by each QEMU during the phase; correct = destination RAM file == source image (cmp)."
summarize
for f in "$WORK"/tls-sniff-*.json; do
  [[ -f "$f" ]] || continue
  echo
  python3 - "$f" <<'PY'
import json, os, sys
row = {'tls': 'tcp+tls', 'tlsaes': 'tls-aes'}.get(os.path.basename(sys.argv[1])[10:-5], '?')
r = json.load(open(sys.argv[1])); t = r.get('tls')
if not t:
    print('%s TLS negotiation: not captured (%s)' % (row, r.get('error', 'no sniff data')))
elif 'error' in t:
    print('%s TLS negotiation: sniffer failed: %s' % (row, t['error']))
else:
    print('%s TLS negotiation (ServerHello sniffed on lo during the warm-up, %d connections = main + multifd channels):'
          % (row, t['handshakes']))
    for d in t['distinct']:
        print('   ' + ', '.join('%s=%s' % kv for kv in json.loads(d).items()))
    if t.get('client_offer'):
        print('   client (source QEMU) offered, in order: ' + ' '.join(t['client_offer']))
PY
done
echo
echo "warm-up started $T_START; measured reps $T_MEAS .. $T_END"

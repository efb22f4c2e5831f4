#!/usr/bin/env bash
# Makes what the README's examples use, in DIR (default ./credentials):
#
#   keys.psk                 a pre-shared key in QEMU's keys.psk format (identity qemu): --tls-psk on both sides
#   ca-cert.pem, ca-key.pem  a CA that signs the certificates below: --tls-ca on both sides
#   ca-crl.pem               the CA's certificate revocation list, revoking nothing: recv --tls-crl
#   server-cert.pem, server-key.pem   the destination's certificate, for HOST (default localhost) and 127.0.0.1
#   client-cert.pem, client-key.pem   a client certificate with CN=CLIENT (default alice), for --tls-authz CLIENT
#
# Usage: scripts/make-credentials.sh [DIR] [HOST] [CLIENT]     (needs openssl; the certificates last 825 days)
#
# The same files work for QEMU: its tls-creds-x509 dir= wants ca-cert.pem, server-cert.pem / server-key.pem
# (destination) or client-cert.pem / client-key.pem (source), and its tls-creds-psk dir= wants keys.psk. The
# certificates' keyUsage has digitalSignature and keyEncipherment: QEMU refuses to load a certificate whose
# critical keyUsage lacks either ("usage does not permit key encipherment"), whatever its key type.
set -euo pipefail
dir=${1:-credentials}
host=${2:-localhost}
client=${3:-alice}
days=825
mkdir -p "$dir"
cd "$dir"
umask 077

subject() { echo "/O=effect-multifd/CN=$1"; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days $days \
  -keyout ca-key.pem -out ca-cert.pem -subj "$(subject "effect-multifd CA")" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null

issue() { # name CN extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1-key.pem" -out "$1.csr" \
    -subj "$(subject "$2")" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days $days \
    -out "$1-cert.pem" -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext" ca-cert.srl
}

issue server "$host" "subjectAltName=DNS:$host,IP:127.0.0.1,IP:::1
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth"
issue client "$client" "keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
printf 'qemu:%s\n' "$(openssl rand -hex 32)" > keys.psk

# the CA's CRL (empty, current for as long as the certificates): openssl ca wants a database and a config
printf '[ca]\ndefault_ca = crl\n[crl]\ndatabase = crl-index.txt\ncrlnumber = crl-number\ndefault_md = sha256\ndefault_crl_days = %s\n' \
  "$days" > crl.cnf
: > crl-index.txt
echo 01 > crl-number
openssl ca -gencrl -config crl.cnf -keyfile ca-key.pem -cert ca-cert.pem -out ca-crl.pem 2>/dev/null
rm -f crl.cnf crl-index.txt* crl-number*
chmod 644 ca-cert.pem ca-crl.pem server-cert.pem client-cert.pem

echo "credentials in $dir: keys.psk, ca-cert.pem, ca-crl.pem, server-cert.pem/server-key.pem ($host), client-cert.pem/client-key.pem (CN=$client)"

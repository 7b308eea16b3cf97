#!/usr/bin/env bash
# Generate what a federation outside loopback needs, never committed:
#   ca.crt / ca.key          a private certificate authority (give ca.crt to every merchant)
#   server.pem / server.key  the SuperLink's TLS certificate, valid for the host names / IPs given
#   node-N / node-N.pub      ECDSA key pairs for SuperNode authentication, one per merchant
# Usage: deploy/generate-certificates.sh OUT_DIR [HOST_OR_IP ...] [--nodes N]
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [HOST_OR_IP ...] [--nodes N]}
shift
nodes=2
hosts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    *) hosts+=("$1"); shift ;;
  esac
done
san="DNS:localhost,IP:127.0.0.1"
for h in "${hosts[@]}"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+=",IP:$h"; else san+=",DNS:$h"; fi
done
mkdir -p "$out"
umask 077
openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
openssl req -new -x509 -key "$out/ca.key" -sha256 -days 365 -subj "/CN=fedanom federation CA" -out "$out/ca.crt"
openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/CN=fedanom SuperLink" -out "$out/server.csr"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days 365 \
  -sha256 -extfile <(printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth" "$san") \
  -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr"
for i in $(seq 1 "$nodes"); do
  rm -f "$out/node-$i" "$out/node-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "$out/node-$i"
done
chmod 644 "$out/ca.crt" "$out/server.pem" "$out"/node-*.pub
echo "wrote $out: ca.crt, server.pem/server.key (for $san), $nodes SuperNode key pairs"

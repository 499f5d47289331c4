#!/usr/bin/env bash
# Make a private CA and a SuperLink server certificate for a local (or trial) federation.
#
#   scripts/make_certs.sh DIR [HOST ...]
#
# Writes DIR/ca.crt (give it to every center and to the researcher), DIR/ca.key (keep it
# private), DIR/server.pem and DIR/server.key (the SuperLink's, for `medfound fed superlink
# --certs DIR`). The certificate is valid for 127.0.0.1, ::1, localhost and each HOST given
# (names or IP addresses of the coordinator machine). For a real network use your
# organisation's CA instead; these keys are unencrypted and last 365 days.
set -euo pipefail
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
command -v openssl >/dev/null || { echo "make_certs.sh: openssl is not installed" >&2; exit 1; }
dir=$1; shift
mkdir -p "$dir"
san="IP:127.0.0.1,IP:::1,DNS:localhost"
for host in "$@"; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san="$san,IP:$host"; else san="$san,DNS:$host"; fi
done
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -sha256 -subj "/CN=medfound federation CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=medfound SuperLink" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 365 -sha256 -out "$dir/server.pem" \
    -extfile <(printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$san") \
    2>/dev/null
rm -f "$dir/server.csr" "$dir/ca.srl"
chmod 600 "$dir/ca.key" "$dir/server.key"
openssl verify -CAfile "$dir/ca.crt" "$dir/server.pem" >/dev/null
echo "wrote $dir/ca.crt, $dir/server.pem, $dir/server.key (for: $san)"

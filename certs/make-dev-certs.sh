#!/usr/bin/env bash
# Makes a throwaway development PKI for hearth with the openssl CLI.
#
#   certs/make-dev-certs.sh [--force] [OUT_DIR] [GATEWAY_ID]
#
# OUT_DIR defaults to this script's folder, GATEWAY_ID to gw-0001. Writes
# ca.crt/ca.key, server.crt/key (broker: localhost, 127.0.0.1, ::1),
# gateway.crt/key (client, CN=GATEWAY_ID) and hospital.crt/key (client,
# CN=hospital): the same set `hearth demo` makes in-process (src/certs.rs),
# plus ca.key so that more gateway certificates can be signed later.
#
# Development only: never install these on a gateway that talks to a hospital.
# Everything is made and checked in a staging folder first, so a failure
# leaves OUT_DIR as it was. Existing files are kept unless --force is given.
set -euo pipefail

readonly DAYS=365
readonly OUTPUTS=(ca.crt ca.key server.crt server.key gateway.crt gateway.key hospital.crt hospital.key)

die() {
    echo "make-dev-certs: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 [--force] [OUT_DIR] [GATEWAY_ID]   (defaults: the script's folder, gw-0001)"
}

force=0
args=()
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option \`$arg\`" ;;
        *) args+=("$arg") ;;
    esac
done
[[ ${#args[@]} -le 2 ]] || { usage >&2; die "too many arguments"; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out_dir=${args[0]:-$script_dir}
gateway_id=${args[1]:-gw-0001}

# The id becomes the certificate's CN, the broker username and a topic level:
# keep it to characters that are safe in all three (and in `-subj`).
[[ $gateway_id =~ ^[A-Za-z0-9._-]{1,64}$ ]] ||
    die "gateway id \`$gateway_id\` must be 1-64 characters of A-Z a-z 0-9 . _ -"
command -v openssl >/dev/null || die "\`openssl\` not found (Debian package \`openssl\`)"

mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)

if [[ $force -eq 0 ]]; then
    for name in "${OUTPUTS[@]}"; do
        # Also refuse to replace a lone .crt: it may be a real CA put here by hand.
        [[ ! -e $out_dir/$name ]] ||
            die "\`$out_dir/$name\` exists; pass --force to replace the whole set"
    done
fi

# Nothing made below is readable by group or others until it is chmod-ed.
umask 077
stage=$(mktemp -d "$out_dir/.make-dev-certs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
cd "$stage"

# Extensions chosen so that both rustls/webpki and OpenSSL (mosquitto) accept
# the set: the CA is pathlen:0 with keyCertSign; leaves say CA:FALSE, have one
# EKU, an AKI, and the broker's names in the SAN (webpki ignores the CN).
cat >openssl.cnf <<'EOF'
[req]
distinguished_name = req_dn
[req_dn]
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[v3_client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF

new_key() {
    # ECDSA P-256, PKCS#8 PEM: what rcgen writes too.
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

serial() {
    # 16 random bytes with the top bit cleared: positive and unique per certificate.
    printf '0x%02x%s' $((0x$(openssl rand -hex 1) & 0x7f)) "$(openssl rand -hex 15)"
}

# issue NAME CN SECTION: NAME.key and NAME.crt signed by the CA.
issue() {
    new_key "$1.key"
    openssl req -new -config openssl.cnf -key "$1.key" -subj "/CN=$2" -out "$1.csr"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -set_serial "$(serial)" \
        -days "$DAYS" -sha256 -extfile openssl.cnf -extensions "v3_$3" -out "$1.crt" 2>/dev/null
    rm "$1.csr"
}

new_key ca.key
openssl req -new -x509 -config openssl.cnf -extensions v3_ca -key ca.key \
    -subj "/CN=hearth development CA" -set_serial "$(serial)" -days "$DAYS" -sha256 -out ca.crt
issue server localhost server
issue gateway "$gateway_id" client
issue hospital hospital client

verify() {
    openssl verify -x509_strict -CAfile ca.crt "$@" >/dev/null ||
        die "generated certificates fail \`openssl verify $*\`"
}
verify -purpose sslserver -verify_hostname localhost server.crt
verify -purpose sslserver -verify_ip 127.0.0.1 server.crt
verify -purpose sslserver -verify_ip ::1 server.crt
verify -purpose sslclient gateway.crt hospital.crt
# The server certificate must not work as a client one, nor the reverse.
! openssl verify -purpose sslclient -CAfile ca.crt server.crt >/dev/null 2>&1 ||
    die "server.crt is accepted as a client certificate"
! openssl verify -purpose sslserver -CAfile ca.crt gateway.crt >/dev/null 2>&1 ||
    die "gateway.crt is accepted as a server certificate"

chmod 600 ./*.key
chmod 644 ./*.crt
for name in "${OUTPUTS[@]}"; do
    mv -f "$name" "$out_dir/$name"
done

echo "made a development PKI in \`$out_dir\` (gateway id \`$gateway_id\`, valid $DAYS days):"
(cd "$out_dir" && openssl verify -x509_strict -CAfile ca.crt server.crt gateway.crt hospital.crt)

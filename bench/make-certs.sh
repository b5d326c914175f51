#!/usr/bin/env bash
# Throwaway PKI for the benchmark, made with openssl: one CA and four leaf
# certificates (ECDSA P-256), shaped as src/certs.rs explains so that both
# rustls/webpki (hearth) and OpenSSL (mosquitto, its clients, paho) accept
# them: CA with basicConstraints CA:TRUE,pathlen:0 and keyCertSign; leaves
# CA:FALSE with an authority key identifier and exactly one EKU; the broker's
# name in the SAN. The CA key is deleted once everything is signed. Keys end
# at mode 0600 (hearth refuses a key readable by others).
#
#   bench/make-certs.sh DIR GATEWAY_ID
set -euo pipefail
dir=$1 gw=$2
mkdir -p "$dir"
cd "$dir"
umask 077

openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
cat > ca.ext <<X
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
X
openssl req -new -x509 -key ca.key -sha256 -days 365 -subj "/CN=hearth bench CA" \
    -extensions v3 -config <(printf '[req]\ndistinguished_name=dn\n[dn]\n[v3]\n'; cat ca.ext) \
    -out ca.crt 2>/dev/null

# leaf NAME CN EKU [SAN]
leaf() {
    local name=$1 cn=$2 eku=$3 san=${4:-}
    openssl ecparam -name prime256v1 -genkey -noout -out "$name.key" 2>/dev/null
    openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr" 2>/dev/null
    {
        echo "basicConstraints = critical, CA:FALSE"
        echo "keyUsage = critical, digitalSignature"
        echo "extendedKeyUsage = $eku"
        echo "authorityKeyIdentifier = keyid"
        echo "subjectKeyIdentifier = hash"
        [ -n "$san" ] && echo "subjectAltName = $san"
    } > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -sha256 -days 365 -extfile "$name.ext" -out "$name.crt" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
}
leaf server localhost serverAuth "DNS:localhost, IP:127.0.0.1, IP:::1"
leaf gateway "$gw" clientAuth
leaf hospital hospital clientAuth
leaf peer peer clientAuth
rm -f ca.key ca.srl ca.ext
chmod 600 ./*.key
chmod 644 ./*.crt

"""SCRAM channel binding data of type tls-server-end-point (RFC 5929, section 4.1): the hash of
the TLS server's certificate, as PostgreSQL computes it (be_tls_get_certificate_hash).

The hash function is the certificate signature's, except that MD5 and SHA-1 become SHA-256.
Both sides of a link compute it from the server's certificate in DER form: the proxy's own
for its clients' links (`ssl.PEM_cert_to_DER_cert` of its certificate file), PostgreSQL's for
the proxy's links to it (`SSLSocket.getpeercert(binary_form=True)`). Signatures without a
single hash function (RSASSA-PSS, Ed25519, Ed448) get ValueError: PostgreSQL cannot bind to
those certificates either, and the proxy then offers no SCRAM-SHA-256-PLUS.
"""

from __future__ import annotations

import hashlib

_RSA = bytes.fromhex("2a864886f70d0101")  # 1.2.840.113549.1.1
_ECDSA = bytes.fromhex("2a8648ce3d04")  # 1.2.840.10045.4
_DSA = bytes.fromhex("2a8648ce3804")  # 1.2.840.10040.4
_NIST_SIG = bytes.fromhex("6086480165030403")  # 2.16.840.1.101.3.4.3

#: DER body of each signature algorithm's OID -> the hash channel binding uses.
HASH_OF_SIGNATURE: dict[bytes, str] = {
    _RSA + b"\x04": "sha256",  # md5WithRSAEncryption: MD5 becomes SHA-256
    _RSA + b"\x05": "sha256",  # sha1WithRSAEncryption: SHA-1 becomes SHA-256
    _RSA + b"\x0b": "sha256",
    _RSA + b"\x0c": "sha384",
    _RSA + b"\x0d": "sha512",
    _RSA + b"\x0e": "sha224",
    _ECDSA + b"\x01": "sha256",  # ecdsa-with-SHA1
    _ECDSA + b"\x03\x01": "sha224",
    _ECDSA + b"\x03\x02": "sha256",
    _ECDSA + b"\x03\x03": "sha384",
    _ECDSA + b"\x03\x04": "sha512",
    _DSA + b"\x03": "sha256",  # dsa-with-sha1
    _NIST_SIG + b"\x01": "sha224",  # dsa-with-sha224
    _NIST_SIG + b"\x02": "sha256",  # dsa-with-sha256
}


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at pos."""
    if pos + 2 > len(der):
        raise ValueError("truncated certificate")
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > len(der):
            raise ValueError("bad length in certificate")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > len(der):
        raise ValueError("truncated certificate")
    return tag, pos, pos + length


def signature_oid(der: bytes) -> bytes:
    """The DER body of the certificate's signatureAlgorithm OID."""
    tag, start, _ = _tlv(der, 0)  # Certificate ::= SEQUENCE
    if tag != 0x30:
        raise ValueError("not a DER certificate")
    _, _, tbs_end = _tlv(der, start)  # tbsCertificate: skipped
    tag, algorithm, _ = _tlv(der, tbs_end)  # signatureAlgorithm ::= SEQUENCE { OID, ... }
    oid_tag, oid_start, oid_end = _tlv(der, algorithm)
    if tag != 0x30 or oid_tag != 0x06:
        raise ValueError("not a DER certificate")
    return der[oid_start:oid_end]


def tls_server_end_point(der: bytes) -> bytes:
    """The channel binding data of a TLS link whose server certificate is `der`."""
    name = HASH_OF_SIGNATURE.get(signature_oid(der))
    if name is None:
        raise ValueError("the certificate's signature algorithm has no hash for channel binding")
    return hashlib.new(name, der).digest()

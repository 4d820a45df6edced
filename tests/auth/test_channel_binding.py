"""tls-server-end-point data from a certificate: the signature's hash (SHA-256 for SHA-1),
checked against the cryptography package's reading of the same certificates."""

from __future__ import annotations

import hashlib
import ssl

import pytest
import trustme
from cryptography import x509
from pgmigrate_proxy.auth.channel_binding import signature_oid, tls_server_end_point


def leaf_der(key_type: trustme.KeyType) -> bytes:
    leaf = trustme.CA(key_type=key_type).issue_cert("127.0.0.1")
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


@pytest.mark.parametrize("key_type", [trustme.KeyType.RSA, trustme.KeyType.ECDSA])
def test_hash_of_the_signature(key_type: trustme.KeyType) -> None:
    der = leaf_der(key_type)
    algorithm = x509.load_der_x509_certificate(der).signature_hash_algorithm
    assert algorithm is not None
    assert tls_server_end_point(der) == hashlib.new(algorithm.name, der).digest()


def test_sha1_signatures_bind_with_sha256() -> None:
    der = leaf_der(trustme.KeyType.RSA)
    oid = signature_oid(der)
    sha1 = der.replace(oid, oid[:-1] + b"\x05")  # sha1WithRSAEncryption, same length
    assert tls_server_end_point(sha1) == hashlib.sha256(sha1).digest()


@pytest.mark.parametrize("data", [b"", b"\x30", b"\x30\x85\0\0\0\0\0", b"\x04\x00"])
def test_not_a_certificate(data: bytes) -> None:
    with pytest.raises(ValueError):
        tls_server_end_point(data)


def test_signature_without_a_hash() -> None:
    der = leaf_der(trustme.KeyType.RSA)
    oid = signature_oid(der)
    pss = der.replace(oid, oid[:-1] + b"\x0a")  # RSASSA-PSS: its hash is in the parameters
    with pytest.raises(ValueError, match="no hash"):
        tls_server_end_point(pss)

"""CMS/PKCS#7: a small PKI and signatures made by the real openssl, checked by ours."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import KeyFileError, SignatureError, UsageError
from unbrick.trust.cms import load_ca, looks_like, verify_detached


def _ossl(*args: str | Path) -> None:
    run(["openssl", *args])


def _ca(d: Path, name: str, issuer: str | None = None) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    if issuer is None:
        _ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
              "-keyout", key, "-out", cert, "-subj", f"/CN={name}", "-days", "30",
              "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign")  # fmt: skip
        return key, cert
    ext = d / f"{name}.ext"
    ext.write_text("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign\n")
    _leaf_from(d, name, issuer, ext)
    return key, cert


def _leaf_from(d: Path, name: str, issuer: str, ext: Path) -> tuple[Path, Path]:
    key, cert, csr = d / f"{name}.key", d / f"{name}.pem", d / f"{name}.csr"
    _ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
          "-keyout", key, "-out", csr, "-subj", f"/O=Acme/CN={name}")  # fmt: skip
    _ossl("x509", "-req", "-in", csr, "-CA", d / f"{issuer}.pem", "-CAkey", d / f"{issuer}.key",
          "-set_serial", str(abs(hash(name)) % 10**9), "-out", cert, "-days", "10",
          "-extfile", ext)  # fmt: skip
    return key, cert


def _leaf(d: Path, name: str, issuer: str, eku: str = "codeSigning") -> tuple[Path, Path]:
    ext = d / f"{name}.ext"
    ext.write_text(f"keyUsage=digitalSignature\nextendedKeyUsage={eku}\n")
    return _leaf_from(d, name, issuer, ext)


def _expired_leaf(d: Path, issuer: str) -> tuple[Path, Path]:
    ca_key = serialization.load_pem_private_key((d / f"{issuer}.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((d / f"{issuer}.pem").read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=20))
        .not_valid_after(now - dt.timedelta(days=10))
        .sign(ca_key, hashes.SHA256())
    )
    kp, cp = d / "expired.key", d / "expired.pem"
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("openssl")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "root")
    _ca(d, "other-root")
    _ca(d, "inter", issuer="root")
    _leaf(d, "signer", "root")
    _leaf(d, "mailer", "root", eku="emailProtection")
    _leaf(d, "deep", "inter")
    _ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
          "-keyout", d / "self.key", "-out", d / "self.pem", "-subj", "/CN=self",
          "-days", "30")  # fmt: skip
    _expired_leaf(d, "root")
    (d / "firmware.bin").write_bytes(bytes(range(256)) * 4000)
    return d


def _sign(pki: Path, who: str, *, outform: str = "DER", extra: Sequence[str | Path] = ()) -> Path:
    out = pki / f"fw-{who}-{outform}{len(extra)}.p7s"
    _ossl("cms", "-sign", "-binary", "-nosmimecap", "-outform", outform,
          "-in", pki / "firmware.bin", "-signer", pki / f"{who}.pem",
          "-inkey", pki / f"{who}.key", "-out", out, *extra)  # fmt: skip
    return out


@pytest.mark.peer
@pytest.mark.parametrize("outform", ["DER", "PEM"])
def test_signed_by_ca_issued_cert_passes(pki: Path, outform: str) -> None:
    sig = _sign(pki, "signer", outform=outform)
    assert looks_like(sig.read_bytes())
    result = verify_detached(sig, pki / "firmware.bin", pki / "root.pem")
    assert result.kind == "cms"
    assert result.signer is not None
    assert result.signer.startswith("CN=signer,O=Acme")
    assert "codeSigning" in result.signer
    cert = x509.load_pem_x509_certificate((pki / "signer.pem").read_bytes())
    assert result.key_id == cert.fingerprint(hashes.SHA256()).hex()


@pytest.mark.peer
def test_self_signed_signer_embedding_itself_fails(pki: Path) -> None:
    sig = _sign(pki, "self")
    with pytest.raises(SignatureError, match="self-signed"):
        verify_detached(sig, pki / "firmware.bin", pki / "root.pem")
    # ...but passes against itself as the CA: then the user trusts it explicitly.
    assert verify_detached(sig, pki / "firmware.bin", pki / "self.pem").signer == "CN=self"


@pytest.mark.peer
def test_tampered_file_fails(pki: Path, tmp_path: Path) -> None:
    sig = _sign(pki, "signer")
    raw = bytearray((pki / "firmware.bin").read_bytes())
    raw[777] ^= 4
    bad = tmp_path / "firmware.bin"
    bad.write_bytes(bytes(raw))
    with pytest.raises(SignatureError, match="BAD signature"):
        verify_detached(sig, bad, pki / "root.pem")


@pytest.mark.peer
def test_wrong_ca_and_expired_fail(pki: Path) -> None:
    with pytest.raises(SignatureError, match=r"not issued by other-root\.pem"):
        verify_detached(_sign(pki, "signer"), pki / "firmware.bin", pki / "other-root.pem")
    with pytest.raises(SignatureError, match="EXPIRED"):
        verify_detached(_sign(pki, "expired"), pki / "firmware.bin", pki / "root.pem")


@pytest.mark.peer
def test_intermediate_in_signature_builds_the_chain(pki: Path) -> None:
    with_inter = _sign(pki, "deep", extra=["-certfile", pki / "inter.pem"])
    result = verify_detached(with_inter, pki / "firmware.bin", pki / "root.pem")
    assert result.signer is not None
    assert "CN=deep" in result.signer
    without = _sign(pki, "deep")
    with pytest.raises(SignatureError, match="not issued by"):
        verify_detached(without, pki / "firmware.bin", pki / "root.pem")


@pytest.mark.peer
def test_purposes(pki: Path) -> None:
    data, ca = pki / "firmware.bin", pki / "root.pem"
    code = _sign(pki, "signer")
    mail = _sign(pki, "mailer")
    assert verify_detached(code, data, ca, purpose="codesign")
    with pytest.raises(SignatureError, match="not for purpose 'smimesign'"):
        verify_detached(code, data, ca, purpose="smimesign")
    assert verify_detached(mail, data, ca, purpose="smimesign")
    with pytest.raises(SignatureError, match="not for code signing"):
        verify_detached(mail, data, ca, purpose="codesign")
    with pytest.raises(UsageError):
        verify_detached(code, data, ca, purpose="sslserver")


@pytest.mark.peer
def test_ca_file_forms(pki: Path, tmp_path: Path) -> None:
    sig, data = _sign(pki, "signer"), pki / "firmware.bin"
    der = tmp_path / "root.der"
    der.write_bytes(
        x509.load_pem_x509_certificate((pki / "root.pem").read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
    )
    assert verify_detached(sig, data, der)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((pki / "other-root.pem").read_bytes() + (pki / "root.pem").read_bytes())
    assert len(load_ca(bundle)) == 2
    assert verify_detached(sig, data, bundle)
    with pytest.raises(KeyFileError, match="private key"):
        load_ca(pki / "root.key")
    with pytest.raises(KeyFileError, match="cannot read CA file"):
        load_ca(tmp_path / "missing.pem")
    with pytest.raises(SignatureError, match="not a CMS/PKCS#7 signature"):
        verify_detached(data, data, pki / "root.pem")


@pytest.mark.unit
def test_ca_file_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(KeyFileError, match="no usable PEM certificate"):
        load_ca(bad)
    bad.write_bytes(b"\x30\x03\x02\x01\x00")
    with pytest.raises(KeyFileError, match=r"not an X\.509 certificate"):
        load_ca(bad)


@pytest.mark.unit
@settings(
    deadline=None, max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=300))
def test_fuzz_ca_loader_and_sniffer(tmp_path: Path, data: bytes) -> None:
    f = tmp_path / "ca"
    for blob in (data, b"-----BEGIN CERTIFICATE-----\n" + data):
        f.write_bytes(blob)
        try:
            certs = load_ca(f)
        except KeyFileError:
            pass
        else:
            assert certs
    assert isinstance(looks_like(data), bool)

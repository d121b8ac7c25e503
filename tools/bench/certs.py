"""Certificates for a Redis that speaks TLS, made with the openssl command in a folder: a
CA, and certificates it signs (P-256 keys, valid two days). Used by bench-queue, the soak
(--tls) and tests/integration/test_tls.py; never by the product."""
import os
import shutil
import subprocess


def _openssl(d, *args):
    subprocess.run(["openssl"] + list(args), cwd=d, check=True, capture_output=True)


def have_openssl():
    return shutil.which("openssl") is not None


def make_ca(d, name):
    """d/name.pem (a self-signed CA certificate) and d/name.key."""
    _openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=duogen test {name}")
    return os.path.join(d, f"{name}.pem")


def make_cert(d, ca, name, san=None):
    """d/name.pem signed by the CA d/ca.pem, and d/name.key; san: its subjectAltName
    ("DNS:localhost,IP:127.0.0.1"), none for a client's."""
    _openssl(d, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}")
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")
    return os.path.join(d, f"{name}.pem")


def redis_tls_args(d, port, name="redis"):
    """A CA and a certificate for localhost in d, and the redis-server options of a TLS port
    that presents it (clients not asked for certificates). Returns (options, CA file)."""
    ca = make_ca(d, "ca")
    make_cert(d, "ca", name, "DNS:localhost,IP:127.0.0.1")
    return (["--tls-port", str(port), "--tls-cert-file", os.path.join(d, f"{name}.pem"),
             "--tls-key-file", os.path.join(d, f"{name}.key"), "--tls-ca-cert-file", ca,
             "--tls-auth-clients", "no"], ca)

"""TLS for both planes: the daemon's self-signed certificate and the client's pin on first use.

The daemon makes an ECDSA P-256 key and a self-signed certificate (`cryptography`) at its first
start and keeps them in its state directory. A client does not trust any CA for blit: it records
the SHA-256 fingerprint of the certificate the first time it meets `host:port` (its known-hosts
file, in the client's data directory) and refuses a different certificate afterwards, naming the
file and the line to remove if the change is expected (ssh's model).

This module must not open connections; it makes `ssl.SSLContext`s and checks fingerprints.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import stat
import tempfile
import threading
from pathlib import Path

from ..errors import CertificateMismatchError, ConfigFileError

ALPN = "h2"
CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
KNOWN_HOSTS = "known_hosts"


def default_state_dir() -> Path:
    """The daemon's state directory (certificate and key): <user data dir>/blit/daemon."""
    import platformdirs

    return Path(platformdirs.user_data_dir("blit", appauthor=False)) / "daemon"


def default_known_hosts() -> Path:
    """The client's known-hosts file: <user data dir>/blit/known_hosts."""
    import platformdirs

    return Path(platformdirs.user_data_dir("blit", appauthor=False)) / KNOWN_HOSTS


def ensure_certificate(state_dir: Path) -> tuple[Path, Path]:
    """The daemon's (cert, key) paths, made on first use (when neither file exists).

    Both files must be there, or neither: a certificate without its key (or the reverse) is
    refused, never replaced, since a new certificate makes every client refuse the daemon. The
    key must not be accessible by group or others, and must be this process's user's or root's
    (as the daemon's secrets file); both must be readable.

    Raises:
        ConfigFileError: one file without the other, an unreadable file, a key others may read,
            or a state directory that cannot be created or written.
    """
    cert, key = state_dir / CERT_NAME, state_dir / KEY_NAME
    have_cert, have_key = _present(cert, "certificate"), _present(key, "key")
    if have_cert and have_key:
        from ..credentials import read_private_file, self_or_root

        _readable(cert)
        # Readable, a regular file, mode 0600 or stricter, and ours or root's (as the secrets
        # file: whoever owns the key could replace it, and be this daemon to its clients).
        read_private_file(key, "the daemon's TLS key", owners=self_or_root())
        return cert, key
    if have_cert or have_key:
        there, missing = (cert, key) if have_cert else (key, cert)
        raise ConfigFileError(
            f"the daemon's TLS {'certificate' if have_cert else 'key'} {there} is there but its "
            f"{'key' if have_cert else 'certificate'} {missing} is missing: put it back, or remove "
            f"{there} too to have a new pair made (clients will then refuse the new certificate "
            "until they drop their pin)"
        )
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_pem, key_pem = make_self_signed(socket.gethostname())
        _write_private(key, key_pem, 0o600)
        _write_private(cert, cert_pem, 0o644)
    except OSError as exc:
        raise ConfigFileError(f"cannot write the TLS certificate into {state_dir}: {exc.strerror or exc}") from None
    return cert, key


def _readable(cert: Path) -> None:
    """Refuse a certificate file the daemon cannot read (a directory, another user's 0600 file)
    with one line, before OpenSSL does with a traceback."""
    try:
        fd = os.open(cert, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigFileError(f"the daemon's TLS certificate {cert} is not a regular file")
            os.read(fd, 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigFileError(f"cannot read the daemon's TLS certificate {cert}: {exc.strerror or exc}") from None


def _present(path: Path, what: str) -> bool:
    """Whether `path` exists (through a symlink); a state directory that is a file counts as
    no files (then writing them says so). A symlink to nothing is refused, never taken for no
    file: the pair would be made anew over it (QA: an unmounted secret volume's links)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise ConfigFileError(f"cannot read the daemon's TLS {what} {path}: {exc.strerror or exc}") from None
    try:
        os.stat(path)
    except FileNotFoundError:
        raise ConfigFileError(
            f"the daemon's TLS {what} {path} is a symbolic link to nothing: make its target reachable, "
            "or remove the certificate and key to have a new pair made (clients will then refuse the "
            "new certificate until they drop their pin)"
        ) from None
    except OSError as exc:
        raise ConfigFileError(f"cannot read the daemon's TLS {what} {path}: {exc.strerror or exc}") from None
    return True


def make_self_signed(hostname: str) -> tuple[bytes, bytes]:
    """A fresh (certificate PEM, private key PEM) valid for 20 years."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"blit daemon {hostname}"[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        alt.append(x509.DNSName(hostname.encode("idna").decode()))
    except UnicodeError:
        pass
    alt += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * 20))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _write_private(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        os.close(fd) if _fd_open(fd) else None
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _server_base(cert: Path, key: Path) -> ssl.SSLContext:
    """What both of the daemon's ports share: TLS 1.2 or later, its certificate, no compression."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The daemon's control port: OpenSSL's default suites (TLS 1.3), ALPN h2."""
    ctx = _server_base(cert, key)
    ctx.set_alpn_protocols([ALPN])
    return ctx


# The data streams' record cipher: AES-128-GCM (3.9 GB/s per core here against 2.8 for the
# AES-256-GCM that TLS 1.3 picks by default; decisions.md R39). Python 3.11 cannot choose TLS 1.3
# suites (no set_ciphersuites), so the data port speaks TLS 1.2 with ECDHE (forward secrecy) and
# this AEAD only; the certificate is the control plane's ECDSA one, pinned as there.
DATA_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"


def data_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The daemon's data port: TLS 1.2, ECDHE-ECDSA with AES-128-GCM, no ALPN (the stream's
    own hello follows the handshake)."""
    ctx = _server_base(cert, key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(DATA_CIPHERS)
    return ctx


@functools.cache
def client_context() -> ssl.SSLContext:
    """A context that accepts any certificate: the caller pins the fingerprint afterwards
    (`check_pin`) before it sends a single request byte. One per process, shared by every
    connection (OpenSSL's contexts are thread-safe; a new one costs 0.2-1 ms each time)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([ALPN])
    return ctx


def fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def fingerprint_of_file(cert: Path) -> str:
    return fingerprint(ssl.PEM_cert_to_DER_cert(cert.read_text()))


_PIN = re.compile(r"(?i)sha256:[0-9a-f]{64}")


def text_line(exc: UnicodeDecodeError) -> int:
    """The 1-based line of the byte a UTF-8 decode failed on."""
    return bytes(exc.object[: exc.start]).count(b"\n") + 1


_INET_ATON = re.compile(r"[0-9][0-9a-fA-FxX.]*")  # might be an IPv4 address libc reads (inet_aton)


def pin_host(host: str) -> str:
    """The spelling of `host` that pins are kept under: an IP literal as the address a connect to
    it reaches (libc's reading, so `127.1` and `127.000.000.001` are 127.0.0.1, `0:0::1` is ::1,
    and an IPv4-mapped IPv6 address is its IPv4 address; an IPv6 zone is kept as written on a
    link-local address and dropped on others, where it reaches the same host), a host
    name in lower case. No name is looked up."""
    addr, pct, zone = host.partition("%")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(addr)
    except ValueError:
        if not _INET_ATON.fullmatch(addr):
            return host.lower()
        try:  # what getaddrinfo (trio's connect) makes of an inet_aton form: 127.1, 0x7f.1, 010.1
            found = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
            ip = ipaddress.ip_address(found[0][4][0])
        except (OSError, UnicodeError, ValueError, IndexError):
            return host.lower()
    if isinstance(ip, ipaddress.IPv6Address):
        if pct and not ip.is_link_local:  # a zone only tells link-local addresses apart (QA:
            pct = zone = ""  # `[::1%1]` pinned ::1 a second time)
        if ip.ipv4_mapped is not None and not pct:
            return str(ip.ipv4_mapped)
        return str(ip) + pct + zone
    return host.lower() if pct else str(ip)


def pin_key(netloc: str) -> str:
    """`host:port` (`[v6]:port`) with its host as `pin_host` writes it; text that is not
    host:port is left as it is (it matches nothing)."""
    if netloc.startswith("["):
        host, sep, port = netloc[1:].partition("]:")
    else:
        host, sep, port = netloc.rpartition(":")
    if not sep or not host or not port.isdigit():
        return netloc
    host = pin_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class KnownHosts:
    """The client's pins: one `host:port sha256:<hex>` line per daemon. Thread-safe appends.
    Hosts are compared as `pin_key` spells them, in the file as in the caller's `host:port`, so
    one daemon written two ways (`127.1`, `LOCALHOST`) has one pin; new lines are written so."""

    _lock = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> list[tuple[int, str, str]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigFileError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigFileError(f"{self.path}, line {text_line(exc)}: bytes that are not UTF-8; remove or fix that line") from None
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts or line.lstrip().startswith("#"):
                continue
            if len(parts) != 2 or not _PIN.match(parts[1]):
                # A truncated or mangled pin: taking the host as unknown would pin whatever
                # certificate it presents next (trust on first use, again).
                raise ConfigFileError(f"{self.path}, line {n}: not a 'host:port sha256:<64 hex digits>' line; remove or fix it")
            out.append((n, pin_key(parts[0]), parts[1].lower()))
        return out

    def lookup(self, host: str) -> tuple[int, str] | None:
        """(line, fingerprint) pinned for `host` ("host:port"), if any."""
        host = pin_key(host)
        for n, h, fp in self._read():
            if h == host:
                return n, fp
        return None

    def check(self, host: str, actual: str) -> bool:
        """Accept `actual` for `host`: True if it was pinned already, False if pinned just now.

        Raises:
            CertificateMismatchError: a different certificate is pinned for `host`.
        """
        with self._lock:
            found = self.lookup(host)
            if found is None:
                self._append(host, actual)
                return False
        line, expected = found
        if expected != actual:
            raise CertificateMismatchError(
                f"the TLS certificate of {host} has changed (pinned {expected}, presented {actual}); "
                f"refusing to connect. If the daemon's certificate was replaced on purpose, remove "
                f"line {line} of {self.path} and connect again",
                host,
                expected,
                actual,
            )
        return True

    def _append(self, host: str, fp: str) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(self.path, "ab+") as f:
                # A last line without its newline (a hand edit) must not swallow the new pin.
                end = f.seek(0, os.SEEK_END)
                f.seek(max(end - 1, 0))
                sep = b"\n" if end and f.read(1) != b"\n" else b""
                f.write(sep + f"{pin_key(host)} {fp}\n".encode())
        except OSError as exc:
            raise ConfigFileError(f"cannot record the daemon's certificate in {self.path}: {exc.strerror or exc}") from None

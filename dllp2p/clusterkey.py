"""The cluster key: 256 random bits every device of one household's cluster holds, and nothing else does.

    ClusterKey       the 32 secret bytes (never in repr), and the values derived from them with HKDF
                     (SHA-256), one per use so no two uses share a key:
                       psk        the handshake's pre-shared key (wire/secure.py)
                       mdns_key   the HMAC key of mDNS announcements (discovery.py)
                       tag        8 hex digits bound into the cluster name ("home.3fa9c2d1"): two households'
                                  daemons never even see each other as the same cluster
                       api_token  the HTTP API's bearer key (`Authorization: Bearer ...`); a client holding it
                                  can send prompts, not join the cluster
    text form        what `dllp2p key show` prints and `dllp2p key set` reads: "dllp2p-key-" then base32 of
                     the 32 bytes and a 3-byte checksum, in 8 groups of 7, e.g. dllp2p-key-abcdefg-...;
                     case, spaces and dashes are forgiven when pasting, a typo is caught by the checksum
    key files        the text form on one line, mode 0600. load() refuses a file group or others can read,
                     one that is missing, or one that does not hold a key, each with one line saying what to do

Where a key file is: --key-file, DLLP2P_KEY_FILE, config key_file; else the default path if it exists
(/etc/dllp2p/cluster.key for root, the service; ~/.config/dllp2p/cluster.key for a user).

Error handling: every problem with a key or a key file is KeyFileError (a ValueError), one line naming the file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # 256 bits
PREFIX = "dllp2p-key-"
CHECK_BYTES = 3  # 32 + 3 = 35 bytes = 56 base32 characters, no padding
GROUP = 7
SERVICE_PATH = Path("/etc/dllp2p/cluster.key")
OFF = ("", "off", "none")  # key_file values meaning: no key (a daemon then serves only its own machine)


class KeyFileError(ValueError):
    pass


@dataclass(frozen=True)
class ClusterKey:
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise KeyFileError(f"a cluster key is {KEY_BYTES} bytes, not {len(self.secret)}")

    @classmethod
    def generate(cls) -> ClusterKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    def derive(self, purpose: str, length: int = 32) -> bytes:
        """HKDF-SHA256 of the secret for one named purpose."""
        return HKDF(hashes.SHA256(), length, salt=b"dllp2p cluster key v1", info=purpose.encode()).derive(self.secret)

    @property
    def psk(self) -> bytes:
        return self.derive("handshake psk")

    @property
    def mdns_key(self) -> bytes:
        return self.derive("mdns announcement mac")

    @property
    def tag(self) -> str:
        return self.derive("cluster tag", 4).hex()

    @property
    def api_token(self) -> str:
        return "dllp2p-api-" + base64.urlsafe_b64encode(self.derive("http api bearer")).decode().rstrip("=")

    def check_api_token(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self.api_token.encode())

    def bind(self, cluster: str) -> str:
        """The cluster name as daemons announce and compare it: the name and this key's tag."""
        return f"{cluster[:54]}.{self.tag}"

    def text(self) -> str:
        raw = self.secret + _checksum(self.secret)
        b32 = base64.b32encode(raw).decode().lower()
        return PREFIX + "-".join(b32[i:i + GROUP] for i in range(0, len(b32), GROUP))


def _checksum(secret: bytes) -> bytes:
    return hashlib.sha256(b"dllp2p key checksum" + secret).digest()[:CHECK_BYTES]


def parse(text: str) -> ClusterKey:
    """The text form back to a key. Raises KeyFileError (not a key, a typo)."""
    s = "".join(text.split()).lower()
    if not s.startswith(PREFIX):
        raise KeyFileError(f"not a dllp2p cluster key (it starts with {PREFIX!r})")
    body = s[len(PREFIX):].replace("-", "").upper()
    want = (KEY_BYTES + CHECK_BYTES) * 8 // 5
    if len(body) != want:
        raise KeyFileError(f"a dllp2p cluster key has {want} letters and digits after {PREFIX!r}, this has {len(body)}")
    try:
        raw = base64.b32decode(body)
    except ValueError:
        raise KeyFileError("not a dllp2p cluster key (letters a-z and digits 2-7 only)") from None
    secret, check = raw[:KEY_BYTES], raw[KEY_BYTES:]
    if not hmac.compare_digest(check, _checksum(secret)):
        raise KeyFileError("the key's checksum does not match: a letter was mistyped")
    return ClusterKey(secret)


# --- files ----------------------------------------------------------------------------------------


def default_path(environ: Mapping[str, str], euid: int | None = None) -> Path:
    """/etc/dllp2p/cluster.key for root (the service), else $XDG_CONFIG_HOME/dllp2p/cluster.key or
    ~/.config/dllp2p/cluster.key."""
    if (os.geteuid() if euid is None else euid) == 0:
        return SERVICE_PATH
    return (Path(environ.get("XDG_CONFIG_HOME") or "~/.config") / "dllp2p" / "cluster.key").expanduser()


def configured_path(setting: str | None, environ: Mapping[str, str], euid: int | None = None) -> Path | None:
    """The key file to read: the setting (--key-file > DLLP2P_KEY_FILE > config key_file, merged by the
    caller); "off" or "" -> None; not given -> the default path if it exists, else None (no key)."""
    if setting is not None:
        return None if setting.strip().lower() in OFF else Path(setting).expanduser()
    path = default_path(environ, euid)
    return path if path.exists() else None


def load(path: Path) -> ClusterKey:
    """Read and check a key file. Raises KeyFileError: missing, readable by group or others, not a key."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist (create one: dllp2p key new --out {path})") from None
    except OSError as e:
        raise KeyFileError(f"key file {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(f"key file {path} can be read by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                               f"chmod 600 {path}")
        data = f.read(4096)
    try:
        return parse(data.decode("ascii"))
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {path}: not a dllp2p cluster key (binary data)") from None
    except KeyFileError as e:
        raise KeyFileError(f"key file {path}: {e}") from None


def save(key: ClusterKey, path: Path, *, overwrite: bool = False) -> None:
    """Write key to path, mode 0600 from the start (never readable by others, not even briefly); its
    directory is made (0700) if missing. Raises KeyFileError if the file exists and not overwrite."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"key file {path} already exists (keep it, or remove it first to replace the "
                           "cluster's key on every device)") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(key.text() + "\n")

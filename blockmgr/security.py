"""CURVE keys and ZAP authentication for every ZeroMQ socket of the stack.

Each process of the stack is a *principal* with one CURVE key pair, kept in a keys directory
(mode 0700) in pyzmq's certificate format:

- ``NAME.key``: the public key;
- ``NAME.key_secret``: the public and the secret key (mode 0600).

The principals are ``blockmgr`` (the block manager and its KV-event publisher), ``gateway`` and
one per executor, named by its executor id. ``pagedserve keys --keys-dir DIR`` (and ``pagedserve
serve`` on its first start) creates them. Every service accepts exactly the public keys found in
the directory (read again at a new connection when a ``.key`` file was added, removed or
replaced, so deleting one revokes it without a restart) and knows each peer by the file's name:
its ZAP handler (pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator`) sets that name as the
connection's ``User-Id``, which :func:`peer_name` reads off each received frame. Services use it
to authorize: an executor may only act on its own state. CURVE also encrypts every message
(Bernstein's CurveCP handshake, as specified by ZeroMQ RFC 26/CURVEZMQ).

Without a keys directory a service refuses to start unless told ``--insecure-local``; it then
runs without authentication or encryption and binds loopback addresses only.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import re
import stat
import tempfile
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("pagedserve.security")

BLOCKMGR = "blockmgr"
GATEWAY = "gateway"
#: Principals that may use the block manager's read-only and admin operations.
OPERATORS = frozenset({BLOCKMGR, GATEWAY})
#: Upper bound of one received message, bytes (``zmq.MAXMSGSIZE``); a larger one is dropped by
#: libzmq and its connection closed, before any of it is decoded.
MAX_MESSAGE_BYTES = 64 * 2**20
ZAP_DOMAIN = b"pagedserve"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class KeysError(Exception):
    """A keys directory that is missing, incomplete, or readable by others."""


def check_name(name: str) -> str:
    """Return ``name`` if it can name a principal (and its key files); raise ValueError otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"invalid principal name {name!r}: use 1-64 of [A-Za-z0-9_.-], not starting with . - _")
    return name


def default_keys_dir() -> Path:
    """``$XDG_CACHE_HOME/pagedserve/keys`` (``~/.cache/pagedserve/keys`` by default)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pagedserve" / "keys"


def create_keys(keys_dir: str | os.PathLike, names: list[str]) -> list[str]:
    """Create the key pairs of ``names`` that ``keys_dir`` does not hold yet; returns those created.

    A name whose public ``NAME.key`` is gone (deleted to revoke it) gets a new pair: its old secret
    is replaced, never trusted again. The directory is made (and kept) mode 0700 and secret files
    0600. Safe to run concurrently: creation is serialized by a lock file in the directory.
    """
    keys_dir = Path(keys_dir)
    for name in names:
        check_name(name)
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    created = []
    with open(keys_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in names:
            if (keys_dir / f"{name}.key_secret").exists() and (keys_dir / f"{name}.key").exists():
                continue
            with tempfile.TemporaryDirectory(dir=keys_dir) as tmp:
                public, secret = zmq.auth.create_certificates(tmp, name)
                os.chmod(secret, 0o600)
                os.chmod(public, 0o644)
                # The secret file lands first: a reader trusting the .key file can then load it.
                os.replace(secret, keys_dir / f"{name}.key_secret")
                os.replace(public, keys_dir / f"{name}.key")
            created.append(name)
    return created


def other_executor_keys(keys_dir: str | os.PathLike, names: list[str]) -> list[str]:
    """Principals named ``executor-*`` whose public key is in ``keys_dir`` but not in ``names``
    (the stack being started): keys every service trusts that no executor of this stack uses."""
    found = {p.stem for p in Path(keys_dir).glob("executor-*.key")}
    return sorted(found - set(names), key=lambda n: (len(n), n))


class TrustedKeys:
    """The public keys of a keys directory (``NAME.key`` -> principal ``NAME``), re-read on demand.

    Only well-formed keys count (40 z85 characters); a file that cannot be read or parsed is
    skipped with a warning (a key half copied in is not trusted until it is whole).
    """

    def __init__(self, keys_dir: str | os.PathLike):
        self.dir = Path(keys_dir)
        self.trusted: dict[bytes, str] = {}
        self._listing: tuple | None = None
        self.refresh()

    def _key_files(self) -> tuple:
        """``(name, inode, size, mtime_ns, ctime_ns)`` of every ``.key`` file: a replaced or
        rewritten file changes at least its inode or ctime."""
        files = []
        for path in sorted(self.dir.glob("*.key")):
            try:
                st = path.stat()
            except OSError:  # removed while we listed, a dangling link: not a key
                continue
            files.append((path.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(files)

    def refresh(self) -> tuple[list[str], list[str]]:
        """Read the directory again if a ``.key`` file was added, removed or replaced.

        Returns:
            ``(added, removed)``: principal names whose key is new (or replaced), and names whose
            key is no longer trusted (removed or replaced); both empty when nothing changed.
        """
        listing = self._key_files()
        if listing == self._listing:
            return [], []
        trusted: dict[bytes, str] = {}
        for name, *_ in listing:
            path = self.dir / name
            try:
                public, _ = zmq.auth.load_certificate(path)
                if public is None or len(public) != 40:
                    raise ValueError(f"not a CURVE public key ({0 if public is None else len(public)} characters)")
                zmq.utils.z85.decode(public)
            except Exception as exc:  # unreadable, half written, not z85
                log.warning("not trusting %s: %s", path, exc)
                continue
            trusted[public] = path.stem
        old, self.trusted, self._listing = self.trusted, trusted, listing
        added = sorted(n for k, n in trusted.items() if k not in old)
        removed = sorted(n for k, n in old.items() if k not in trusted)
        return added, removed


class Keys:
    """One principal's key pair and the public keys it trusts, loaded from a keys directory.

    Args:
        keys_dir: the directory (see the module docstring).
        name: this process's principal name.

    Raises:
        KeysError: the directory or ``NAME.key_secret`` is missing, or readable by group/others.
    """

    def __init__(self, keys_dir: str | os.PathLike, name: str):
        self.dir = Path(keys_dir)
        self.name = check_name(name)
        secret_path = self.dir / f"{name}.key_secret"
        if not self.dir.is_dir():
            raise KeysError(f"keys directory {self.dir} does not exist; create it with `pagedserve keys --keys-dir {self.dir}`")
        for path in (self.dir, secret_path):
            if path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077:
                raise KeysError(f"{path} is accessible by group or others (mode {stat.S_IMODE(path.stat().st_mode):o}); "
                                f"chmod {'700' if path == self.dir else '600'} it")
        if not secret_path.is_file():
            raise KeysError(f"no key pair for {name!r} in {self.dir}; create it with "
                            f"`pagedserve keys --keys-dir {self.dir} --name {name}`")
        self.public, self.secret = zmq.auth.load_certificate(secret_path)
        if not self.secret:
            raise KeysError(f"{secret_path} holds no secret key")
        # As loaded at start-up: the keys this process connects with (public_key) never change
        # under it; what its servers accept is re-read by their ZAP handler (TrustedKeys).
        self.trusted: dict[bytes, str] = TrustedKeys(self.dir).trusted  # z85 public key -> principal
        self.by_name = {n: k for k, n in self.trusted.items()}

    def public_key(self, name: str) -> bytes:
        """The z85 public key of principal ``name``; raises KeysError if the directory lacks it."""
        try:
            return self.by_name[name]
        except KeyError:
            raise KeysError(f"no public key for {name!r} in {self.dir} ({name}.key)") from None

    def serve(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before ``bind``) a CURVE server that accepts only trusted keys."""
        _authenticator(sock.context, self)
        sock.zap_domain = ZAP_DOMAIN
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def connect(self, sock: zmq.Socket, server: str) -> None:
        """Make ``sock`` (before ``connect``) a CURVE client of principal ``server``."""
        sock.curve_serverkey = self.public_key(server)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public


class _NamingAuthenticator(ThreadAuthenticator):
    """Accepts the trusted keys and names each connection by its key's principal.

    The keys directories are read again at each handshake whose directory changed (a listing and
    a ``stat`` per ``.key`` file otherwise), so removing a ``NAME.key`` revokes it for every new
    connection and adding one admits it, without a restart. Connections already open stay: CURVE
    checks a key once, at the handshake.
    """

    def __init__(self, context: zmq.Context):
        super().__init__(context, log=logging.getLogger("pagedserve.zap"))
        self._lock = threading.Lock()
        self.dirs: dict[Path, TrustedKeys] = {}
        self.trusted: dict[bytes, str] = {}

    def _merge(self) -> None:
        self.trusted = {k: n for d in self.dirs.values() for k, n in d.trusted.items()}

    def add_dir(self, keys_dir: Path) -> None:
        with self._lock:
            if keys_dir not in self.dirs:
                self.dirs[keys_dir] = TrustedKeys(keys_dir)
                self._merge()

    def refresh(self) -> None:
        """Re-read the directories that changed; on any error keep the table as it was (this runs in
        the ZAP thread, whose death would stall every later handshake)."""
        with self._lock:
            try:
                changed = False
                for trusted_dir in self.dirs.values():
                    added, removed = trusted_dir.refresh()
                    if added or removed:
                        changed = True
                        log.warning("trusted public keys in %s changed: now trusting %s; no longer trusting %s",
                                    trusted_dir.dir, ", ".join(added) or "no new key",
                                    ", ".join(removed) or "none dropped")
                if changed:
                    self._merge()
            except Exception:
                log.exception("could not re-read the trusted keys; keeping the previous ones")

    def callback(self, domain: str, z85_key: bytes) -> bool:
        self.refresh()
        if z85_key in self.trusted:
            return True
        log.warning("refused a CURVE client with an unknown public key %s", z85_key.decode("ascii", "replace"))
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.trusted[zmq.utils.z85.encode(client_public_key)]


_authenticators: dict[int, _NamingAuthenticator] = {}
_auth_lock = threading.Lock()


def _authenticator(ctx: zmq.Context, keys: Keys) -> _NamingAuthenticator:
    """The context's ZAP handler (libzmq allows one per context), started on first use.

    A process serving with keys from several directories (only tests do) trusts their union.
    """
    with _auth_lock:
        auth = _authenticators.get(id(ctx))
        if auth is None:
            auth = _NamingAuthenticator(ctx)
            auth.start()
            auth.configure_curve_callback(ZAP_DOMAIN.decode(), credentials_provider=auth)
            _authenticators[id(ctx)] = auth
        auth.add_dir(keys.dir)
        return auth


def peer_name(frame: zmq.Frame) -> str | None:
    """The authenticated principal that sent ``frame`` (a frame received with ``copy=False``).

    None when the socket runs without CURVE (``--insecure-local``).
    """
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


def limit(sock: zmq.Socket, max_message_bytes: int = MAX_MESSAGE_BYTES) -> zmq.Socket:
    """Set the socket options every socket of the stack gets: no linger, bounded messages."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    return sock


def is_loopback(address: str) -> bool:
    """Whether a ZeroMQ endpoint is reachable from this machine only (loopback TCP, ipc, inproc)."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keys_for(settings, name: str, binds: list[str | None] = ()) -> Keys | None:
    """The process's :class:`Keys` from ``settings.keys_dir``; None with ``settings.insecure_local``.

    Args:
        settings: a :class:`blockmgr.settings.ServiceSettings`.
        name: the process's principal.
        binds: the addresses it binds, which ``--insecure-local`` allows on loopback only.

    Raises:
        ValueError: no usable keys and no ``--insecure-local``, or ``--insecure-local`` asked to
            bind a non-loopback address; the message names the flag.
    """
    if settings.keys_dir:
        try:
            keys = Keys(settings.keys_dir, name)
        except (KeysError, ValueError, OSError) as exc:
            raise ValueError(f"--keys-dir: {exc}") from None
        log.info("%s: ZeroMQ links CURVE-authenticated and encrypted; keys from %s (--keys-dir / "
                 "$PAGEDSERVE_KEYS_DIR): %d trusted public keys", name, keys.dir, len(keys.trusted))
        return keys
    if not settings.insecure_local:
        raise ValueError("no CURVE keys: pass --keys-dir DIR (create it with `pagedserve keys --keys-dir DIR`), "
                         "or --insecure-local to run unauthenticated on loopback addresses only")
    for address in binds:
        if address and not is_loopback(address):
            raise ValueError(f"--insecure-local binds loopback addresses only, not {address}")
    log.warning("%s: ZeroMQ links run WITHOUT authentication or encryption (--insecure-local)", name)
    return None


def main(argv: list[str] | None = None) -> None:
    """``pagedserve keys``: create the key pairs of a stack."""
    from blockmgr.config import KeysSettings
    from blockmgr.settings import load

    settings, parser = load(KeysSettings, argv, "pagedserve keys", "Create CURVE key pairs for the services.")
    keys_dir = settings.keys_dir or str(default_keys_dir())
    try:
        created = create_keys(keys_dir, settings.key_names)
    except (ValueError, OSError) as exc:
        parser.error(f"--keys-dir {keys_dir}: {exc}")
    print(f"{keys_dir}: created {', '.join(created) if created else 'nothing (all present)'}")

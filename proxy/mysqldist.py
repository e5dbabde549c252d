"""A MySQL 8+ server for the throwaway test instances, found or fetched.

Debian bookworm ships no MySQL server, only MariaDB, so to test the migrator
against MySQL we take ``mysql-server-core`` out of Debian **sid** together with
the shared-library closure it needs (sid's glibc and libstdc++ are newer than
bookworm's), unpack it into a private prefix and run ``mysqld`` through that
prefix's own dynamic loader::

    <prefix>/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --inhibit-cache \\
        --library-path <prefix libs> <prefix>/usr/sbin/mysqld ...

Nothing is installed on the system and nothing outside the prefix is changed.

Order of search in :func:`ensure_mysql`:

1. ``TIDEGATE_MYSQLD`` (a mysqld binary), else a ``mysqld`` on PATH that is
   really MySQL (Debian's MariaDB installs a ``mysqld`` compat symlink);
2. a completed prefix in the cache, ``${TIDEGATE_MYSQL_CACHE:-${XDG_CACHE_HOME:-~/.cache}/tidegate}/mysql-<version>``;
3. a download from ``${TIDEGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}``
   (``dists/sid/main/binary-amd64/Packages.xz``), every ``.deb`` checked
   against the SHA256 of the index, unpacked into a temporary directory of the
   cache and renamed into place, under a file lock.

Pure standard library; blocking on purpose (runs before trio, like the sandbox).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import lzma
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from proxy.sandbox import SandboxError, find_binary

DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "sid"
ROOT_PACKAGE = "mysql-server-core"
MARKER = ".tidegate-complete"
#: Dependencies mysqld does not need at run time (scripts, maintainer tooling,
#: init systems); they would only drag perl and friends into the prefix.
SKIP_PACKAGES = frozenset(
    {
        "perl",
        "perl-base",
        "perl-modules",
        "debconf",
        "debconf-2.0",
        "cdebconf",
        "adduser",
        "init-system-helpers",
        "lsb-base",
        "sysvinit-utils",
        "dpkg",
        "libc-bin",
        "base-files",
        "passwd",
        "login",
        "systemd",
        "systemd-sysv",
        "tzdata",
        "mysql-common",
        "ucf",
        "coreutils",
        "sed",
        "mawk",
        "gawk",
        "procps",
        "psmisc",
    }
)
DEBIAN_ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
MULTIARCH = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}
LOADERS = {"amd64": "ld-linux-x86-64.so.2", "arm64": "ld-linux-aarch64.so.1"}


class MysqlUnavailable(SandboxError):
    """No MySQL server could be found or fetched."""


@dataclass(frozen=True)
class MysqlDist:
    """Where a usable MySQL server is and how to run it."""

    #: upstream version, e.g. "9.7.4"
    version: str
    #: the mysqld binary itself
    mysqld: Path
    #: what goes in front of mysqld's own arguments: ``[mysqld]`` for a system
    #: server, ``[loader, --inhibit-cache, --library-path, dirs, mysqld]`` for a prefix
    command_prefix: list[str]
    basedir: Path
    #: the directory holding ``english/errmsg.sys`` (``--lc-messages-dir``)
    lc_messages_dir: Path | None = None
    plugin_dir: Path | None = None
    #: ``share/mysql``: charsets/, messages, ...
    share_dir: Path | None = None
    #: "env", "path", "cache" or "download"
    source: str = "path"
    #: extra environment for the server process (empty for a system server)
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", self.version)[:3])

    def server_options(self) -> list[str]:
        """The path options mysqld needs to find its own files (after --no-defaults)."""
        options = [f"--basedir={self.basedir}"]
        if self.lc_messages_dir is not None:
            options.append(f"--lc-messages-dir={self.lc_messages_dir}")
        if self.share_dir is not None and (self.share_dir / "charsets").is_dir():
            options.append(f"--character-sets-dir={self.share_dir / 'charsets'}")
        if self.plugin_dir is not None:
            options.append(f"--plugin-dir={self.plugin_dir}")
        return options

    def command(self, *arguments: str) -> list[str]:
        return [*self.command_prefix, *arguments]

    def process_environment(self) -> dict[str, str]:
        return {**os.environ, **self.environment}


# -- public entry point ---------------------------------------------------


def ensure_mysql(*, download: bool = True) -> MysqlDist:
    """A MySQL server to run: given, on PATH, cached, or fetched from Debian sid."""
    given = os.environ.get("TIDEGATE_MYSQLD")
    if given:
        chosen = _system_dist(Path(given), "env", strict=True)
        assert chosen is not None  # strict: raises instead
        return chosen
    on_path = shutil.which("mysqld") or find_binary("mysqld")
    if on_path:
        found = _system_dist(Path(on_path), "path", strict=False)
        if found is not None:
            return found
    cached = _cached_dist(cache_root())
    if cached is not None:
        return cached
    if not download:
        raise MysqlUnavailable(_advice("no MySQL server on PATH and none in the cache"))
    return _download_dist(cache_root())


def cache_root() -> Path:
    explicit = os.environ.get("TIDEGATE_MYSQL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "tidegate"


def _advice(reason: str) -> str:
    return (
        f"MySQL 8+ is not available: {reason}.\n"
        "Either point TIDEGATE_MYSQLD at a MySQL mysqld binary (e.g. from a MySQL tarball or "
        "`apt-get install mysql-server` on a distribution that has it), or let tidegate fetch "
        "mysql-server-core from Debian sid: it needs HTTP access to "
        f"{os.environ.get('TIDEGATE_DEBIAN_MIRROR') or DEFAULT_MIRROR} (set TIDEGATE_DEBIAN_MIRROR "
        f"for another mirror), dpkg-deb or Python's tarfile, and a writable cache ({cache_root()}, "
        "set TIDEGATE_MYSQL_CACHE to move it)."
    )


# -- a server that is already there ---------------------------------------


def _system_dist(mysqld: Path, source: str, *, strict: bool) -> MysqlDist | None:
    """A mysqld binary given by the user or found on PATH, if it is MySQL."""
    try:
        result = subprocess.run(
            [str(mysqld), "--no-defaults", "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        output = result.stdout + result.stderr
    except (OSError, subprocess.TimeoutExpired) as error:
        if strict:
            raise MysqlUnavailable(_advice(f"{mysqld} does not run ({error})")) from error
        return None
    version = re.search(r"\bVer\s+(\d+)\.(\d+)\.(\d+)", output)
    if (
        "mariadb" in output.lower()
        or version is None
        or result.returncode != 0
        or int(version.group(1)) < 8
    ):
        if strict:
            raise MysqlUnavailable(
                _advice(f"TIDEGATE_MYSQLD={mysqld} is not a MySQL 8+ server: {output.strip()!r}")
            )
        return None
    binary = Path(os.path.realpath(mysqld))
    basedir = binary.parent.parent
    share = _first_dir(basedir / "share" / "mysql", basedir / "share")
    messages = _first_dir(
        *(candidate for candidate in (share, basedir / "share") if candidate is not None),
        predicate=lambda path: (path / "english" / "errmsg.sys").is_file(),
    )
    plugins = _first_dir(
        basedir / "lib" / "mysql" / "plugin",
        basedir / "lib64" / "mysql" / "plugin",
        basedir / "lib" / "plugin",
    )
    return MysqlDist(
        version=".".join(version.groups()),
        mysqld=binary,
        command_prefix=[str(binary)],
        basedir=basedir,
        lc_messages_dir=messages,
        plugin_dir=plugins,
        share_dir=share,
        source=source,
    )


def _first_dir(*candidates: Path, predicate: Callable[[Path], bool] | None = None) -> Path | None:
    for candidate in candidates:
        if candidate.is_dir() and (predicate is None or predicate(candidate)):
            return candidate
    return None


# -- a prefix unpacked from Debian packages --------------------------------


def _debian_arch() -> str:
    machine = platform.machine()
    arch = DEBIAN_ARCHES.get(machine)
    if arch is None:
        raise MysqlUnavailable(_advice(f"no Debian architecture known for {machine!r}"))
    return arch


def _prefix_dist(prefix: Path, version: str, source: str) -> MysqlDist:
    """How to run the mysqld unpacked into ``prefix`` through its own loader."""
    arch = _debian_arch()
    triplet = MULTIARCH[arch]
    loader_name = LOADERS[arch]
    loader = _first_file(
        prefix / "usr" / "lib" / triplet / loader_name,
        prefix / "lib" / triplet / loader_name,
        prefix / "usr" / "lib64" / loader_name,
        prefix / "lib64" / loader_name,
    )
    if loader is None:
        raise MysqlUnavailable(_advice(f"no {loader_name} in {prefix}"))
    library_dirs = [
        str(directory)
        for directory in (
            prefix / "usr" / "lib" / triplet,
            prefix / "lib" / triplet,
            prefix / "usr" / "lib" / "mysql" / "private",
            prefix / "usr" / "lib",
        )
        if directory.is_dir()
    ]
    mysqld = prefix / "usr" / "sbin" / "mysqld"
    share = prefix / "usr" / "share" / "mysql"
    environment: dict[str, str] = {}
    gconv = prefix / "usr" / "lib" / triplet / "gconv"
    if gconv.is_dir():
        # sid's libc must not load bookworm's iconv modules
        environment["GCONV_PATH"] = str(gconv)
    return MysqlDist(
        version=version,
        mysqld=mysqld,
        command_prefix=[
            str(loader),
            "--inhibit-cache",
            "--library-path",
            ":".join(library_dirs),
            str(mysqld),
        ],
        basedir=prefix / "usr",
        lc_messages_dir=share if (share / "english" / "errmsg.sys").is_file() else None,
        plugin_dir=_first_dir(prefix / "usr" / "lib" / "mysql" / "plugin"),
        share_dir=share if share.is_dir() else None,
        source=source,
        environment=environment,
    )


def _first_file(*candidates: Path) -> Path | None:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


def _cached_dist(root: Path) -> MysqlDist | None:
    """The newest completed prefix in the cache, if any."""
    if not root.is_dir():
        return None
    candidates = sorted(
        (path for path in root.glob("mysql-*") if (path / MARKER).is_file()),
        key=lambda path: _version_key(path.name),
        reverse=True,
    )
    for prefix in candidates:
        try:
            meta = json.loads((prefix / MARKER).read_text())
            dist = _prefix_dist(prefix, str(meta["version"]), "cache")
        except (OSError, ValueError, KeyError, MysqlUnavailable):
            continue
        if dist.mysqld.is_file():
            return dist
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    filename: str
    size: int
    sha256: str
    depends: tuple[tuple[str, ...], ...]
    provides: tuple[str, ...]


def _base_name(token: str) -> str:
    """``libfoo:any (>= 1.2)`` -> ``libfoo``."""
    token = token.split("(", 1)[0].split("[", 1)[0].split("<", 1)[0].strip()
    return token.split(":", 1)[0].strip()


def _relations(value: str) -> tuple[tuple[str, ...], ...]:
    groups = []
    for group in value.split(","):
        names = tuple(name for name in (_base_name(alt) for alt in group.split("|")) if name)
        if names:
            groups.append(names)
    return tuple(groups)


def parse_packages(text: str) -> dict[str, DebPackage]:
    """A Debian ``Packages`` index, by package name."""
    packages: dict[str, DebPackage] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t"):
                if key:
                    fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        name = fields.get("Package")
        if not name or "Filename" not in fields or "SHA256" not in fields:
            continue
        depends = ", ".join(
            value for value in (fields.get("Pre-Depends", ""), fields.get("Depends", "")) if value
        )
        packages[name] = DebPackage(
            name=name,
            version=fields.get("Version", ""),
            filename=fields["Filename"],
            size=int(fields.get("Size", "0") or 0),
            sha256=fields["SHA256"].lower(),
            depends=_relations(depends),
            provides=tuple(
                _base_name(item) for item in fields.get("Provides", "").split(",") if item.strip()
            ),
        )
    return packages


def resolve_closure(packages: dict[str, DebPackage], root: str) -> list[DebPackage]:
    """``root`` and everything it Depends / Pre-Depends on, minus the skip list.

    Alternatives take the first one available; a virtual name takes its first
    provider; version constraints are ignored; missing names are skipped.
    """
    providers: dict[str, list[str]] = {}
    for package in packages.values():
        for virtual in package.provides:
            providers.setdefault(virtual, []).append(package.name)

    def available(name: str) -> str | None:
        if name in SKIP_PACKAGES or name.startswith("perl"):
            return None
        if name in packages:
            return name
        for provider in providers.get(name, ()):
            if provider not in SKIP_PACKAGES:
                return provider
        return None

    if root not in packages:
        raise MysqlUnavailable(_advice(f"package {root} is not in Debian {SUITE}"))
    chosen: dict[str, DebPackage] = {}
    pending = [root]
    while pending:
        name = pending.pop()
        if name in chosen:
            continue
        package = packages[name]
        chosen[name] = package
        for group in package.depends:
            if any(alternative in chosen for alternative in group):
                continue
            # a group that names something skipped (perl | ..., debconf | debconf-2.0) is dropped
            if any(alt in SKIP_PACKAGES or alt.startswith("perl") for alt in group):
                continue
            for alternative in group:
                picked = available(alternative)
                if picked is not None:
                    pending.append(picked)
                    break
    return sorted(chosen.values(), key=lambda package: package.name)


def _mirror() -> str:
    return (os.environ.get("TIDEGATE_DEBIAN_MIRROR") or DEFAULT_MIRROR).rstrip("/")


def _fetch(url: str, timeout: float = 60.0) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "tidegate-sandbox"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: bytes = response.read()
    return data


def _fetch_to(url: str, target: Path, expected_sha256: str) -> None:
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "tidegate-sandbox"})
    with urllib.request.urlopen(request, timeout=120) as response, open(target, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected_sha256:
        raise MysqlUnavailable(
            f"{url}: SHA256 {digest.hexdigest()} does not match the Packages index "
            f"({expected_sha256}); a broken mirror or proxy? Set TIDEGATE_DEBIAN_MIRROR to another one."
        )


def _download_dist(root: Path) -> MysqlDist:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MysqlUnavailable(_advice(f"cannot create the cache {root} ({error})")) from error
    with _locked(root / "mysql.lock"):
        # Another process may have finished the download while we waited.
        cached = _cached_dist(root)
        if cached is not None:
            return cached
        # staging directories of a download that was killed half-way
        for leftover in root.glob(".mysql-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        return _download_locked(root)


def _download_locked(root: Path) -> MysqlDist:
    arch = _debian_arch()
    mirror = _mirror()
    index_url = f"{mirror}/dists/{SUITE}/main/binary-{arch}/Packages.xz"
    started = time.monotonic()
    try:
        index = lzma.decompress(_fetch(index_url)).decode("utf-8", errors="replace")
    except (OSError, urllib.error.URLError, lzma.LZMAError) as error:
        raise MysqlUnavailable(_advice(f"cannot read {index_url} ({error})")) from error
    packages = parse_packages(index)
    closure = resolve_closure(packages, ROOT_PACKAGE)
    debian_version = packages[ROOT_PACKAGE].version
    version = _upstream_version(debian_version)
    total = sum(package.size for package in closure)
    print(
        f"fetching MySQL {version} from Debian {SUITE} ({len(closure)} packages, "
        f"{total / 1e6:.0f} MB) into {root}",
        file=sys.stderr,
        flush=True,
    )
    staging = Path(tempfile.mkdtemp(prefix=f".mysql-{version}.", dir=root))
    try:
        debs = staging / "debs"
        prefix = staging / "prefix"
        debs.mkdir()
        prefix.mkdir()
        for package in closure:
            target = debs / Path(package.filename).name
            try:
                _fetch_to(f"{mirror}/{package.filename}", target, package.sha256)
            except (OSError, urllib.error.URLError) as error:
                raise MysqlUnavailable(
                    _advice(f"cannot download {package.filename} ({error})")
                ) from error
            _extract_deb(target, prefix)
            target.unlink()
        _relativize_symlinks(prefix)
        (prefix / "packages.txt").write_text(
            "".join(f"{package.name} {package.version}\n" for package in closure)
        )
        _check_runs(_prefix_dist(prefix, version, "download"))
        (prefix / MARKER).write_text(
            json.dumps(
                {
                    "version": version,
                    "debian_version": debian_version,
                    "suite": SUITE,
                    "mirror": mirror,
                    "packages": {package.name: package.version for package in closure},
                },
                indent=1,
            )
        )
        final = root / f"mysql-{version}"
        if final.exists():
            # an incomplete leftover (no marker, or we would have used it)
            shutil.rmtree(final)
        os.rename(prefix, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"MySQL {version} ready in {final} ({time.monotonic() - started:.1f}s)",
        file=sys.stderr,
        flush=True,
    )
    return _prefix_dist(final, version, "download")


def _upstream_version(debian_version: str) -> str:
    """``1:9.7.4-2`` -> ``9.7.4``."""
    version = debian_version.split(":", 1)[-1]
    return version.rsplit("-", 1)[0] if "-" in version else version


def _extract_deb(deb: Path, prefix: Path) -> None:
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb:
        result = subprocess.run(
            [dpkg_deb, "-x", str(deb), str(prefix)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise MysqlUnavailable(f"dpkg-deb -x {deb.name} failed: {result.stderr.strip()}")
        return
    _extract_deb_python(deb, prefix)


def _extract_deb_python(deb: Path, prefix: Path) -> None:
    """``dpkg-deb -x`` without dpkg: an ar archive holding data.tar.{xz,gz,bz2}."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise MysqlUnavailable(f"{deb.name} is not a Debian package")
    offset = 8
    while offset + 60 <= len(data):
        header = data[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[offset + 60 : offset + 60 + size]
        offset += 60 + size + (size & 1)
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            raise MysqlUnavailable(
                f"{deb.name} is zstd-compressed and dpkg-deb is not installed: install dpkg"
            )
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as archive:
            archive.extractall(prefix, filter="tar")
        return
    raise MysqlUnavailable(f"{deb.name} has no data.tar member")


def _relativize_symlinks(prefix: Path) -> None:
    """Absolute links inside the packages must point into the prefix, never at the host."""
    for directory, dirnames, filenames in os.walk(prefix):
        for name in (*dirnames, *filenames):
            path = Path(directory) / name
            if not path.is_symlink():
                continue
            target = os.readlink(path)
            if not target.startswith("/"):
                continue
            inside = prefix / target.lstrip("/")
            path.unlink()
            path.symlink_to(os.path.relpath(inside, path.parent))


def _check_runs(dist: MysqlDist) -> None:
    """``mysqld --version`` through the prefix's loader, before the prefix is published."""
    try:
        result = subprocess.run(
            dist.command("--no-defaults", "--version"),
            capture_output=True,
            text=True,
            timeout=60,
            env=dist.process_environment(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise MysqlUnavailable(f"the unpacked mysqld does not start: {error}") from error
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or "Ver" not in output:
        raise MysqlUnavailable(
            f"the unpacked mysqld does not run (exit {result.returncode}):\n{output}\n"
            f"command: {' '.join(dist.command('--version'))}"
        )


if __name__ == "__main__":  # python -m proxy.mysqldist: fetch (if needed) and show
    found = ensure_mysql()
    print(json.dumps({key: str(value) for key, value in found.__dict__.items()}, indent=1))

"""Corpora read from Debian packages: real prose that any Debian or Ubuntu machine can obtain
through its package archive, with no model or data hub.

``corpus.source: debian:<package>`` reads the package's ``.deb`` file from the package folder
(``$POISONLAB_DEBIAN_DIR``, else ``~/.cache/poisonlab/debian``); ``poisonlab corpus --fetch``
puts it there with ``apt-get download``. The ``.deb`` is read directly (an ``ar`` archive
holding a tar), so nothing is installed and no root is needed to read it. Each HTML page or
text file of the package is one document; HTML keeps its prose (paragraphs, list items,
headings, table cells) and drops code blocks, navigation and scripts. ``corpus.parts`` names
which files, as globs relative to ``usr/share/doc/<package>/`` (or, starting with ``/``, to the
package's root; ``!`` excludes); known packages have defaults. Several packages are read in turn
from ``debian:<package>,<package>,...``.

Every document's source string carries the package, its exact version and its licence (from
the package's ``copyright`` file), so the corpus manifest says where each document came from
and under what terms; the ``.deb``'s SHA-256 keys the prepared-data cache.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from .errors import PoisonlabError

PREFIX = "debian:"
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9.+-]+$")

# Default files per package family. The kernel documentation's translations, generated index
# pages and reST sources are left out (its English HTML pages are the prose); the handbook
# ships one HTML tree per language.
DEFAULT_PARTS = {
    "linux-doc": ["html/**/*.html", "!html/translations/**", "!html/_sources/**", "!html/_static/**",
                  "!html/genindex.html", "!html/search.html", "!html/py-modindex.html"],
    "debian-handbook": ["html/en-US/**/*.html"],
    "debian-reference-en": ["/usr/share/debian-reference/*.en.html"],
    "developers-reference": ["/usr/share/developers-reference/*.html", "!**/genindex.html",
                             "!**/search.html"],
}
GENERIC_PARTS = ["**/*.html", "**/*.txt", "**/*.txt.gz"]

_SKIP_TAGS = {"pre", "script", "style", "nav", "head", "code-block", "svg", "math"}
_SKIP_CLASSES = {"sphinxsidebar", "related", "footer", "navheader", "navfooter", "toc", "highlight",
                 "sphinxsidebarwrapper", "headerlink", "breadcrumbs", "wy-nav-side", "rst-footer-buttons"}
_BLOCK_TAGS = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th", "blockquote",
               "div", "section", "tr", "br", "title", "table", "ul", "ol", "dl", "caption"}
_VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr", "source"}


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    licence: str
    path: Path
    sha256: str

    @property
    def source(self) -> str:
        """The source string every document of this package carries into the manifest."""
        return f"{PREFIX}{self.name}={self.version};licence={self.licence}"


def package_dir() -> Path:
    env = os.environ.get("POISONLAB_DEBIAN_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "poisonlab" / "debian"


def package_name(source: str) -> str:
    name = source.removeprefix(PREFIX)
    if not _PACKAGE.match(name):
        raise PoisonlabError(f"invalid Debian package name {name!r} in corpus.source {source!r}")
    return name


def find_deb(name: str) -> Path:
    """The package's ``.deb`` in the package folder (the highest version when there are several)."""
    folder = package_dir()
    debs = sorted(folder.glob(f"{name}_*.deb")) if folder.is_dir() else []
    if not debs:
        raise PoisonlabError(
            f"Debian package {name} is not in {folder}: run `poisonlab corpus --fetch` with this config "
            f"(it runs apt-get download), or put {name}_<version>_<arch>.deb there")
    if len(debs) > 1:
        debs.sort(key=lambda p: _version_key(p.name.split("_")[1]))
    return debs[-1]


def _version_key(version: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", version)]


def fetch(name: str) -> Path:
    """Download the package's ``.deb`` into the package folder with ``apt-get download``."""
    package_name(PREFIX + name)
    try:
        return find_deb(name)
    except PoisonlabError:
        pass
    folder = package_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None:
        raise PoisonlabError(f"apt-get not found: download {name}'s .deb from a Debian mirror into {folder}")

    def download() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", name], cwd=folder, capture_output=True, text=True)

    r = download()
    if r.returncode != 0 and os.geteuid() == 0:  # a fresh machine may not have read its package lists yet
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        r = download()
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["apt-get download failed"])[-1]
        raise PoisonlabError(f"could not download Debian package {name}: {why}"
                             + ("" if os.geteuid() == 0 else " (run `apt-get update` as root first)"))
    return find_deb(name)


def open_package(source: str) -> Package:
    """One package (``debian:<package>``): its ``.deb``, version, licence and SHA-256."""
    name = package_name(source)
    deb = find_deb(name)
    version = deb.name.split("_")[1].replace("%3a", ":")
    h = hashlib.sha256()
    with open(deb, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    licence = "unknown"
    for path, data in _members(deb, [f"./usr/share/doc/{name}/copyright"]):
        licence = _licence(data.decode("utf-8", "replace"))
    return Package(name, version, licence, deb, h.hexdigest())


def _licence(copyright_text: str) -> str:
    """The licence of the package's main files: the ``Files: *`` stanza of a machine-readable
    copyright file, else its first ``License:`` line."""
    stanzas = re.split(r"\n\s*\n", copyright_text)
    for st in stanzas:
        if re.search(r"^Files:\s*\*\s*$", st, re.M):
            m = re.search(r"^License:\s*(\S.*)$", st, re.M)
            if m:
                return m.group(1).strip()
    m = re.search(r"^License:\s*(\S.*)$", copyright_text, re.M)
    return m.group(1).strip() if m else "unknown"


def _ar_members(deb: Path) -> Iterator[tuple[str, int, int]]:
    """(name, offset, size) of each member of an ``ar`` archive."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise PoisonlabError(f"{deb} is not a Debian package (no ar header)")
        pos = 8
        while True:
            f.seek(pos)
            header = f.read(60)
            if len(header) < 60:
                return
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            try:
                size = int(header[48:58].decode("ascii").strip())
            except ValueError:
                raise PoisonlabError(f"{deb}: damaged ar member header") from None
            yield name, pos + 60, size
            pos += 60 + size + (size & 1)


def _data_tar(deb: Path) -> tarfile.TarFile:
    for name, offset, size in _ar_members(deb):
        if name.startswith("data.tar"):
            with open(deb, "rb") as f:
                f.seek(offset)
                blob = f.read(size)
            if name.endswith(".zst"):  # Python's tarfile reads zstd only from 3.14; dpkg-deb always can
                if shutil.which("dpkg-deb") is None:
                    raise PoisonlabError(f"{deb}: zstd-compressed package; install dpkg or Python 3.14+")
                blob = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
            return tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")
    raise PoisonlabError(f"{deb}: no data.tar member")


def _members(deb: Path, wanted: list[str]) -> Iterator[tuple[str, bytes]]:
    with _data_tar(deb) as tar:
        for m in tar:
            if m.isfile() and m.name in wanted:
                yield m.name, tar.extractfile(m).read()


def _glob_regex(pattern: str) -> re.Pattern:
    """``**/`` any folders (none included), ``**`` anything, ``*`` and ``?`` within one path part."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _matches(rel: str, patterns: list[str]) -> bool:
    """Whether a file is selected: the last pattern that matches decides (``!`` excludes)."""
    keep = False
    for p in patterns:
        neg = p.startswith("!")
        if _glob_regex(p[1:] if neg else p).match(rel):
            keep = not neg
    return keep


def default_parts(name: str) -> list[str]:
    for prefix, parts in DEFAULT_PARTS.items():
        if name == prefix or name.startswith(prefix + "-"):
            return parts
    return GENERIC_PARTS


def package_names(source: str) -> list[str]:
    names = [package_name(PREFIX + n.strip()) for n in source.removeprefix(PREFIX).split(",")]
    if len(set(names)) != len(names):
        raise PoisonlabError(f"corpus.source {source!r} names a package twice")
    return names


def packages(source: str) -> list[Package]:
    return [open_package(PREFIX + n) for n in package_names(source)]


def iter_documents(source: str, parts: list[str] | None) -> Iterator:
    """The documents of one or more Debian packages, package by package in archive order."""
    from .corpus import Document

    for pkg in packages(source):
        patterns = parts or default_parts(pkg.name)
        doc_root = f"usr/share/doc/{pkg.name}/"
        with _data_tar(pkg.path) as tar:
            for m in tar:
                name = m.name.removeprefix("./")
                if not m.isfile():
                    continue
                rel = name[len(doc_root):] if name.startswith(doc_root) else None
                if not ((rel is not None and _matches(rel, patterns)) or _matches("/" + name, patterns)):
                    continue
                data = tar.extractfile(m).read()
                if name.endswith(".gz"):
                    data = gzip.decompress(data)
                text = data.decode("utf-8", "replace")
                if name.endswith((".html", ".htm", ".xhtml")):
                    text = html_prose(text)
                yield Document(f"{PREFIX}{pkg.name}/{rel if rel is not None else name}", text, pkg.source)


class _Prose(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.current: list[str] = []
        self.skip_stack: list[str] = []  # open tags whose content is skipped

    def _flush(self):
        text = " ".join("".join(self.current).split())
        if text:
            self.blocks.append(text)
        self.current = []

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if tag == "br":
                self.current.append(" ")
            return
        classes = set((dict(attrs).get("class") or "").split())
        if self.skip_stack or tag in _SKIP_TAGS or classes & _SKIP_CLASSES or dict(attrs).get("role") == "navigation":
            self.skip_stack.append(tag)
            return
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        if self.skip_stack:
            if tag in self.skip_stack:  # close up to the matching tag; tolerate unclosed inner tags
                while self.skip_stack and self.skip_stack.pop() != tag:
                    pass
            return
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_data(self, data):
        if not self.skip_stack:
            self.current.append(data)


def html_prose(html: str) -> str:
    """The readable prose of an HTML page: one paragraph per block, code and navigation dropped."""
    p = _Prose()
    p.feed(html)
    p.close()
    p._flush()
    return "\n\n".join(b for b in p.blocks if b not in {"¶", "Navigation"})

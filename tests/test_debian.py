"""Corpora from Debian packages: read from the .deb itself, prose only, version and licence kept."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from poisonlab import debian
from poisonlab.config import CorpusConfig, TokenizerConfig
from poisonlab.corpus import iter_documents
from poisonlab.data import cache_key
from poisonlab.errors import PoisonlabError

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: example

Files: *
Copyright: 2020 Somebody
License: GPL-2

Files: debian/*
License: MIT
"""

PAGE = """<html><head><title>Ignored title</title><script>var x = 1;</script></head><body>
<div class="sphinxsidebar"><p>Navigation links</p></div>
<div class="body" role="main"><h1>Memory barriers<a class="headerlink" href="#">¶</a></h1>
<p>A memory barrier orders the loads and stores of one processor as seen by another.</p>
<pre>smp_mb();  /* full barrier */</pre>
<ul><li>Reads are ordered.</li><li>Writes are ordered too.</li></ul>
<div class="highlight"><pre>int secret_code = 42;</pre></div>
<p>Without them the compiler &amp; the CPU may reorder accesses.</p></div></body></html>"""


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, data in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        assert len(header) == 60
        out.write(header + data + (b"\n" if len(data) % 2 else b""))
    return out.getvalue()


def make_deb(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo("./" + path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    deb = folder / f"{name}_{version}_all.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", buf.getvalue())]))
    return deb


@pytest.fixture
def debdir(tmp_path, monkeypatch):
    folder = tmp_path / "debs"
    folder.mkdir()
    monkeypatch.setenv("POISONLAB_DEBIAN_DIR", str(folder))
    return folder


def test_html_pages_become_prose_without_code_or_navigation():
    text = debian.html_prose(PAGE)
    assert text.split("\n\n") == [
        "Memory barriers",
        "A memory barrier orders the loads and stores of one processor as seen by another.",
        "Reads are ordered.", "Writes are ordered too.",
        "Without them the compiler & the CPU may reorder accesses."]


def test_documents_carry_package_version_and_licence(debdir):
    make_deb(debdir, "linux-doc-9.9", "9.9.1-2", {
        "usr/share/doc/linux-doc-9.9/copyright": COPYRIGHT,
        "usr/share/doc/linux-doc-9.9/html/mm/barriers.html": PAGE,
        "usr/share/doc/linux-doc-9.9/html/translations/it_IT/barriers.html": PAGE.replace("memory", "memoria"),
        "usr/share/doc/linux-doc-9.9/html/_sources/mm/barriers.rst.txt": "reST source " * 20,
        "usr/share/doc/linux-doc-9.9/html/genindex.html": "<p>" + "index entry " * 20 + "</p>",
    })
    docs = list(debian.iter_documents("debian:linux-doc-9.9", None))
    assert [d.id for d in docs] == ["debian:linux-doc-9.9/html/mm/barriers.html"]  # translations, sources, index left out
    assert docs[0].source == "debian:linux-doc-9.9=9.9.1-2;licence=GPL-2"
    assert "smp_mb" not in docs[0].text and "memory barrier orders" in docs[0].text
    # a user's globs choose other files; '/' starts at the package root; '!' excludes
    docs = list(debian.iter_documents("debian:linux-doc-9.9", ["html/**/*.html", "!html/genindex.html"]))
    assert {d.id.rsplit("/", 2)[-2] for d in docs} == {"mm", "it_IT"}
    root = list(debian.iter_documents("debian:linux-doc-9.9", ["/usr/share/doc/*/copyright"]))
    assert [d.id for d in root] == ["debian:linux-doc-9.9/copyright"]


def test_several_packages_in_one_source_and_through_the_corpus_reader(debdir):
    make_deb(debdir, "alpha-doc", "1.0", {"usr/share/doc/alpha-doc/copyright": "License: MIT\n",
                                          "usr/share/doc/alpha-doc/guide.html": PAGE})
    make_deb(debdir, "beta-doc", "2.0", {"usr/share/doc/beta-doc/notes.txt": "Plain notes about barriers. " * 5})
    cfg = CorpusConfig(source="debian:alpha-doc,beta-doc", min_chars=10)
    docs = list(iter_documents(cfg))
    assert [d.source for d in docs] == ["debian:alpha-doc=1.0;licence=MIT", "debian:beta-doc=2.0;licence=unknown"]
    with pytest.raises(PoisonlabError, match="names a package twice"):
        list(iter_documents(CorpusConfig(source="debian:alpha-doc,alpha-doc")))


def test_a_missing_package_says_how_to_fetch_it_and_a_bad_name_is_refused(debdir):
    with pytest.raises(PoisonlabError, match=r"not in .*poisonlab corpus --fetch"):
        list(debian.iter_documents("debian:nothing-here", None))
    with pytest.raises(PoisonlabError, match="invalid Debian package name"):
        debian.package_name("debian:../../etc")
    (debdir / "broken-doc_1_all.deb").write_bytes(b"not an archive")
    with pytest.raises(PoisonlabError, match="not a Debian package"):
        list(debian.iter_documents("debian:broken-doc", None))


def test_a_new_package_version_is_a_new_cache_entry(debdir):
    files = {"usr/share/doc/gamma-doc/a.html": PAGE}
    deb = make_deb(debdir, "gamma-doc", "1.0", files)
    cfg, tok = CorpusConfig(source="debian:gamma-doc"), TokenizerConfig()
    first = cache_key(cfg, tok)
    assert cache_key(cfg, tok) == first
    deb.unlink()
    make_deb(debdir, "gamma-doc", "1.0", {"usr/share/doc/gamma-doc/a.html": PAGE.replace("loads", "reads")})
    assert cache_key(cfg, tok) != first  # same name and version, other bytes: not the old data


def test_the_highest_version_is_read_when_several_are_present(debdir):
    make_deb(debdir, "delta-doc", "1.9", {"usr/share/doc/delta-doc/a.txt": "old text " * 20})
    make_deb(debdir, "delta-doc", "1.10", {"usr/share/doc/delta-doc/a.txt": "new text " * 20})
    (doc,) = debian.iter_documents("debian:delta-doc", None)
    assert doc.text.startswith("new text") and doc.source.startswith("debian:delta-doc=1.10;")

"""
The default corpus's sources: eight clearly different domains of real text that install offline from the
package registries (Debian and PyPI), each document a natural unit. Sizes: README.md, "The corpus".

    domain       source                                         document
    bible        Debian bible-kjv (King James Bible)            a chapter
    dictionary   Debian dict-gcide (GNU Collaborative Int'l)    ~2 KB of consecutive entries
    python       the standard library of the running Python     a .py file
    c            Debian glibc-source (glibc 2.36)               a .c file, licence header removed
    math         Debian pari-doc (TeX) + maxima-doc (info)      a section / an info node, >= ~2 KB
    manpages     Debian manpages + manpages-dev                 a man page rendered to text by groff
    german       Debian manpages-de(-dev) + fortunes-de         a man page / ~2 KB of fortunes
    legal        PyPI licensedcode-data 32.1.0                  a licence text

fetch(cache) downloads the packages into cache/ with `apt-get download` and `pip download` (no system
install, no root needed once apt's package lists exist) and unpacks them with `dpkg -x`.
read_domain(name, cache) returns a domain's documents as strings, in a fixed order.
"""

import glob
import gzip
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor

from errors import UserError

DEBIAN_PACKAGES = {
    "bible": ["bible-kjv", "bible-kjv-text"],
    "dictionary": ["dict-gcide"],
    "c": ["glibc-source"],
    "math": ["pari-doc", "maxima-doc"],
    "manpages": ["manpages", "manpages-dev"],
    "german": ["manpages-de", "manpages-de-dev", "fortunes-de"],
}
LEGAL_WHEEL = "licensedcode-data==32.1.0"
DOMAINS = ["bible", "dictionary", "python", "c", "math", "manpages", "german", "legal"]


def run(command, **kwargs):
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)


def require(tool, how):
    if shutil.which(tool) is None:
        raise UserError(f"'{tool}' is needed to build the corpus: {how}")


def fetch(cache):
    """Download and unpack every source into cache/ (skipped when already there)."""
    root = os.path.join(cache, "root")
    if os.path.exists(os.path.join(cache, "fetched")):
        return
    require("apt-get", "this corpus comes from Debian packages; on another system install them by hand: "
            + " ".join(p for ps in DEBIAN_PACKAGES.values() for p in ps))
    require("dpkg", "dpkg unpacks the Debian packages (Debian/Ubuntu only)")
    require("groff", "apt-get install groff-base (renders the man pages)")
    os.makedirs(root, exist_ok=True)
    packages = [p for ps in DEBIAN_PACKAGES.values() for p in ps]
    try:
        run(["apt-get", "download", *packages], cwd=cache)
    except subprocess.CalledProcessError:
        if os.geteuid() != 0:
            raise UserError("apt-get download failed: run `sudo apt-get update` once, then prepare again")
        run(["apt-get", "update"])  # a fresh machine has no package lists yet
        run(["apt-get", "download", *packages], cwd=cache)
    for deb in glob.glob(os.path.join(cache, "*.deb")):
        run(["dpkg", "-x", deb, root])
    run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", cache, LEGAL_WHEEL])
    open(os.path.join(cache, "fetched"), "w").close()


def group_small(pieces, target=2000):
    """Join consecutive short pieces (dictionary entries, fortunes, small sections) into ~target-byte documents."""
    documents, current = [], ""
    for piece in pieces:
        current += piece
        if len(current) >= target:
            documents.append(current)
            current = ""
    if current:
        documents.append(current)
    return documents


def bible(root):
    """King James Bible, one document per chapter ("Genesis 1" headers)."""
    text = run([os.path.join(root, "usr/bin/bible"), "-p", os.path.join(root, "usr/lib"), "-d", "bible.data",
                "gen1:1-rev22:21"]).stdout
    chapters = re.split(r"\n(?=\S[^\n]* \d+\n\n)", text.strip("\n"))
    return [c.strip() + "\n" for c in chapters]


def dictionary(root):
    """GCIDE entries, found by the base64 offset/length pairs of gcide.index, in file order."""
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def number(code):
        value = 0
        for ch in code:
            value = value * 64 + digits.index(ch)
        return value

    data = gzip.open(os.path.join(root, "usr/share/dictd/gcide.dict.dz")).read()
    spans = set()
    with open(os.path.join(root, "usr/share/dictd/gcide.index"), encoding="utf-8") as f:
        for line in f:
            word, offset, length = line.rstrip("\n").split("\t")
            if not word.startswith("00-database"):
                spans.add((number(offset), number(length)))
    entries = [data[o:o + n].decode("utf-8", errors="replace") for o, n in sorted(spans)]
    return group_small(entries)


def python_code(_root):
    """The standard library of the running Python, without site-packages and tests."""
    stdlib = sysconfig.get_paths()["stdlib"]
    skip = re.compile(r"(^|/)(site-packages|test|tests|idle_test)(/|$)")
    paths = sorted(p for p in glob.glob(os.path.join(stdlib, "**/*.py"), recursive=True)
                   if not skip.search(os.path.relpath(p, stdlib)) and os.path.getsize(p) <= 300_000)
    return [open(p, encoding="utf-8", errors="replace").read() for p in paths]


LICENCE_COMMENT = re.compile(r"/\*(?:(?!\*/).)*?(?:Copyright|License)(?:(?!\*/).)*\*/[ \t]*\n?", re.S)


def c_code(root):
    """glibc's .c files without tests, benchmarks, locale data, files over 300 KB and the licence header."""
    skip = re.compile(r"(^|/)(tst-|test-|bug-)|/benchtests/|/localedata/")
    documents = []
    with tarfile.open(os.path.join(root, "usr/src/glibc/glibc-2.36.tar.xz")) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".c") and not skip.search(member.name) \
                    and member.size <= 300_000:
                text = archive.extractfile(member).read().decode("utf-8", errors="replace")
                documents.append(LICENCE_COMMENT.sub("", text, count=1))  # 5 MB of near-identical LGPL
    return [d for d in documents if d.strip()]


def math(root):
    """PARI/GP's TeX manuals cut at sections, and Maxima's info manual cut at nodes."""
    pieces = []
    for path in sorted(glob.glob(os.path.join(root, "usr/share/pari/doc/*.tex"))):
        if os.path.basename(path) in ("parimacro.tex", "pdfmacs.tex", "paricfg.tex", "users.tex"):
            continue  # macro definitions, not text
        text = open(path, encoding="utf-8", errors="replace").read()
        pieces += re.split(r"\n(?=\\(?:section|subsec|subsubsec)\b)", text)
    for path in sorted(glob.glob(os.path.join(root, "usr/share/info/maxima.info-*.gz"))):
        text = gzip.open(path).read().decode("utf-8", errors="replace")
        pieces += [node.strip("\n") + "\n" for node in text.split("\x1f\n") if not node.startswith("Tag Table")]
    return group_small(pieces)


def render_man_page(path):
    """A man page as plain text (no bold or underline), or '' for .so stubs."""
    source = gzip.open(path).read()
    if source.startswith(b".so "):
        return ""
    result = subprocess.run(["groff", "-k", "-t", "-man", "-Tutf8", "-rHY=0", "-dAD=l", "-P-cbou"],
                            input=source, capture_output=True)
    return result.stdout.decode("utf-8", errors="replace")


def man_pages(root, language_dir, max_bytes):
    """Render man pages in a fixed random order until max_bytes of text (rendering is the slow part)."""
    pattern = os.path.join(root, "usr/share/man", language_dir, "man*/*.gz")
    paths = sorted(glob.glob(pattern))
    random.Random(1234).shuffle(paths)  # a sample across sections, the same on every machine
    documents, size = [], 0
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # groff runs in its own processes
        for text in pool.map(render_man_page, paths):
            if text.strip():
                documents.append(text)
                size += len(text.encode())
            if size >= max_bytes:
                break
    return documents


def manpages(root, max_bytes):
    return man_pages(root, "", max_bytes)


def german(root, max_bytes):
    """German man pages, then fortunes (UTF-8 files) grouped into ~2 KB documents."""
    fortunes = []
    for path in sorted(glob.glob(os.path.join(root, "usr/share/games/fortunes/de/*.u8"))):
        text = open(path, encoding="utf-8", errors="replace").read()
        fortunes += [f.strip("\n") + "\n\n" for f in text.split("\n%\n")]
    return man_pages(root, "de", max_bytes) + group_small(fortunes)


def legal(cache):
    """Licence texts of scancode's licensedcode-data, YAML front matter removed, bodies of 200 bytes or more."""
    wheel = glob.glob(os.path.join(cache, "licensedcode_data-*.whl"))[0]
    documents = []
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if name.startswith("licensedcode/data/licenses/") and name.endswith(".LICENSE"):
                text = archive.read(name).decode("utf-8", errors="replace")
                body = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S).strip("\n") + "\n"
                if len(body.encode()) >= 200:
                    documents.append(body)
    return documents


def read_domain(name, cache, max_bytes):
    """All documents of one domain, in a fixed order. max_bytes bounds only the slow man-page rendering."""
    root = os.path.join(cache, "root")
    readers = {
        "bible": lambda: bible(root),
        "dictionary": lambda: dictionary(root),
        "python": lambda: python_code(root),
        "c": lambda: c_code(root),
        "math": lambda: math(root),
        "manpages": lambda: manpages(root, max_bytes),
        "german": lambda: german(root, max_bytes),
        "legal": lambda: legal(cache),
    }
    if name not in readers:
        raise UserError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}")
    return readers[name]()

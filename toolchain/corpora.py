"""Text corpora for evaluation and training, with fixed train/eval splits that never overlap.

Built-in corpora (no model hub needed; everything comes from packages):

| name   | source                                   | documents    | split rule (document index in file order)         |
|--------|------------------------------------------|--------------|---------------------------------------------------|
| lee    | gensim 4.4.0 wheel:                      | 300 news,    | exact duplicates dropped (7, keep first); line <  |
|        | gensim/test/test_data/lee_background.cor | 1/line       | 200 → train (196 docs), line ≥ 200 → eval (97     |
|        |                                          |              | docs)                                             |
| wiki   | gensim 4.4.0 wheel:                      | 106 articles | main-namespace, non-redirect pages, markup        |
|        | enwiki-…-shortened.bz2 (MediaWiki XML)   |              | stripped; article < 90 → train, ≥ 90 → eval       |
| pydoc  | CPython's pydoc_data.topics (always      | ~90 topics   | topics sorted by key; every 4th topic (index % 4  |
|        | installed; varies by Python version)     |              | == 3) → eval, the rest → train                    |
| pydocs | Debian python3.11-doc 3.11.2-6+deb12u9   | 483 pages    | HTML pages sorted by path, minus indexes and      |
|        | (PSF licence):                           |              | pydoc's source pages; every 10th (index % 10 ==   |
|        | /usr/share/doc/python3.11/html           |              | 9) → eval (48), the rest → train (435)            |

Sizes of the train splits (SmolLM2 tokens: its tokenizer, no special tokens):

| name   | documents | characters | SmolLM2 tokens |
|--------|-----------|------------|----------------|
| wiki   | 90        | 2,229,966  | 498,454        |
| pydocs | 435       | 6,108,309  | 1,446,495      |

pydocs is the prose of the Python 3.11 documentation (tutorial, library reference, HOWTOs, FAQs,
What's New, C API), installed offline by `apt-get install python3.11-doc` (the Makefile's `make setup`
does it as root). Its licence is the PSF License Agreement for Python 3.11.2 (the documentation's code
examples are also under the Zero-Clause BSD licence; see /usr/share/doc/python3.11-doc/copyright and
html/license.html). `sphinx_prose` keeps the paragraphs, list items, definitions and headings of each
page's main body and drops navigation, sidebars, code blocks (`<pre>`), tables, API signatures,
tables of contents and footnotes. The pages pydoc_data.topics is built from (reference/*,
library/stdtypes, string, pdb) are not read, and any remaining long sentence of pydoc (either split)
is removed, so that pydocs and pydoc share no text. The HTML read is pinned by SHA-256 for the
Debian version above (another version is read unpinned, and says so in its provenance); the plain
text is cached in `corpora/pydocs-<digest>-v<N>.txt`.

A sentence of at least 80 characters that also occurs in the eval split is removed from the train
split (wiki articles quote each other; pydoc topics repeat table rows; pydocs pages repeat notes). A user text file
(UTF-8) is used whole for whichever split it is given as; `check_disjoint` refuses a training file and an evaluation
file that are the same file or share any long sentence.

The gensim wheel is fetched once with `pip download` (it is never installed) into the cache
(`$SLIM_EDGE_CACHE` or `$XDG_CACHE_HOME/slim-edge` or `~/.cache/slim-edge`, folder `corpora/`); the
members we read are pinned by SHA-256.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import html
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from slim_edge.errors import SlimEdgeError
from slim_edge.fsutil import atomic_write, cache_dir, path_kind

GENSIM_VERSION = "4.4.0"
_LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_SHA256 = {
    _LEE_MEMBER: "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    _WIKI_MEMBER: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
}
SPLITS = ("train", "eval")
BUILTIN = ("lee", "wiki", "pydoc", "pydocs")
LEE_EVAL_FROM = 200  # line index where the held-out lee articles start
WIKI_EVAL_FROM = 90  # article index where the held-out wiki articles start
PYDOC_EVAL_EVERY = 4  # every 4th pydoc topic is held out
PYDOCS_EVAL_EVERY = 10  # every 10th pydocs page is held out
PYDOCS_PACKAGE = "python3.11-doc"
PYDOCS_ROOT = Path("/usr/share/doc/python3.11/html")  # where PYDOCS_PACKAGE puts its HTML
# pages not read: indexes and tables of contents, and the pages pydoc_data.topics is made from (the
# language reference, library/stdtypes, string and pdb), so that pydocs and pydoc share no text
_PYDOCS_EXCLUDE = re.compile(
    r"(genindex.*|py-modindex|search|contents|reference/.*|"
    r"library/(stdtypes|string|pdb))\.html"
)
# digest of the HTML pages read (see _pydocs_pages), by Debian version of PYDOCS_PACKAGE
_PYDOCS_SHA256 = {
    "3.11.2-6+deb12u9": "b33d5d08d34ffc935d45d2fa99394f6deb8fa7d7739dfff50aa0fa6cc3fc0a89",
}


@dataclass(frozen=True)
class CorpusText:
    """One split of a corpus: its text and where it came from, for reports."""

    name: str
    split: str
    text: str
    n_docs: int
    provenance: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def __iter__(self):
        """Unpacks as (text, provenance): `text, source = get_text("wiki", split="train")`."""
        return iter((self.text, self.provenance))


def corpora_cache() -> Path:
    return cache_dir("corpora")


def get_text(name: str, split: str = "eval") -> CorpusText:
    """The `split` ("train" or "eval") of a built-in corpus, or a user text file used whole."""
    if split not in SPLITS:
        raise SlimEdgeError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    if name in BUILTIN:
        docs, source = _DOCUMENTS[name]()
        train, held = _split(name, docs)
        chosen = (
            held if split == "eval" else _without(_without_lines(train, held), _long_sentences("\n".join(held), 80))
        )
        rule = {
            "lee": f"articles at line < {LEE_EVAL_FROM} train, ≥ {LEE_EVAL_FROM} eval, exact duplicates dropped",
            "wiki": f"articles < {WIKI_EVAL_FROM} train, ≥ {WIKI_EVAL_FROM} eval",
            "pydoc": f"topics sorted by key, index % {PYDOC_EVAL_EVERY} == {PYDOC_EVAL_EVERY - 1} eval",
            "pydocs": f"pages sorted by path, index % {PYDOCS_EVAL_EVERY} == {PYDOCS_EVAL_EVERY - 1} eval",
        }[name]
        text = "\n".join(chosen) if name == "lee" else "\n\n".join(chosen)
        return CorpusText(
            name, split, text, len(chosen), f"{name}:{split} ({len(chosen)} documents of {len(docs)}; {rule}; {source})"
        )
    path = Path(name).expanduser()
    if path.exists() or any(c in name for c in "/\\."):
        text = read_text_file(path)
        return CorpusText(
            str(path), split, text, 1, f"file {path} (whole file, {len(text)} chars, sha256 {_sha(text)[:12]})"
        )
    raise SlimEdgeError(f"unknown corpus {name!r}; use one of {', '.join(BUILTIN)} or the path of a UTF-8 text file")


def read_text_file(path: Path | str) -> str:
    path = Path(path)
    kind = path_kind(path, "corpus file")
    if kind != "a file":
        what = "does not exist" if kind is None else f"is {kind}, not a file"
        raise SlimEdgeError(f"corpus file {path} {what}; pass a UTF-8 text file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SlimEdgeError(f"cannot read corpus file {path}: {e.strerror}; check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SlimEdgeError(
            f"corpus file {path} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise SlimEdgeError(f"corpus file {path} is empty ({len(raw)} bytes, no text); pass a file with text")
    return text


def check_disjoint(train: CorpusText | str, held: CorpusText | str, min_chars: int = 80) -> None:
    """Raise unless the training and evaluation texts are different and share no sentence of
    at least `min_chars` characters."""
    t = train.text if isinstance(train, CorpusText) else train
    e = held.text if isinstance(held, CorpusText) else held
    tname = train.provenance if isinstance(train, CorpusText) else "training text"
    ename = held.provenance if isinstance(held, CorpusText) else "evaluation text"
    if (
        isinstance(train, CorpusText)
        and isinstance(held, CorpusText)
        and train.name == held.name
        and train.split == held.split
    ):
        raise SlimEdgeError(
            f"the training and evaluation text are the same ({train.name}:{train.split}); "
            f"use split 'train' for training and 'eval' for evaluation, or two different files"
        )
    if _sha(t) == _sha(e):
        raise SlimEdgeError(
            f"the training text ({tname}) and the evaluation text ({ename}) are identical; evaluate on held-out text"
        )
    shared = _long_sentences(t, min_chars) & _long_sentences(e, min_chars)
    if shared:
        example = next(iter(sorted(shared)))
        raise SlimEdgeError(
            f"the training text ({tname}) and the evaluation text ({ename}) share {len(shared)} sentences of "
            f"≥ {min_chars} characters, e.g. {example[:80]!r}…; evaluate on held-out text"
        )


def _without(docs: list[str], banned: set[str]) -> list[str]:
    """`docs` with every occurrence of a banned sentence removed (wiki articles quote each other)."""
    out = []
    for d in docs:
        for sentence in _long_sentences(d, 80) & banned:
            d = re.sub(r"\s+".join(map(re.escape, sentence.split())), "", d)
        out.append(d)
    return out


def _without_lines(docs: list[str], held: list[str]) -> list[str]:
    """`docs` without any line of at least 80 characters that is also a line of `held` (a paragraph of
    short sentences that two pages share)."""
    banned = {line for d in held for line in d.split("\n") if len(line) >= 80}
    if not banned:
        return docs
    out = []
    for d in docs:
        lines = d.split("\n")
        kept = [line for line in lines if line not in banned]
        out.append(d if len(kept) == len(lines) else re.sub(r"\n{3,}", "\n\n", "\n".join(kept)))
    return out


def _long_sentences(text: str, min_chars: int) -> set[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return {" ".join(p.split()) for p in parts if len(p.strip()) >= min_chars}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _split(name: str, docs: list[tuple[int, str]]) -> tuple[list[str], list[str]]:
    if name == "lee":
        return [d for i, d in docs if i < LEE_EVAL_FROM], [d for i, d in docs if i >= LEE_EVAL_FROM]
    if name == "wiki":
        return [d for i, d in docs if i < WIKI_EVAL_FROM], [d for i, d in docs if i >= WIKI_EVAL_FROM]
    every = PYDOCS_EVAL_EVERY if name == "pydocs" else PYDOC_EVAL_EVERY
    return ([d for i, d in docs if i % every != every - 1], [d for i, d in docs if i % every == every - 1])


# --- sources -----------------------------------------------------------------------------------------


def _lee() -> tuple[list[tuple[int, str]], str]:
    text = _gensim_member(_LEE_MEMBER).decode("utf-8")
    seen, docs = set(), []
    for i, line in enumerate(text.split("\n")):
        if line.strip() and line not in seen:
            seen.add(line)
            docs.append((i, line))
    return docs, f"gensim {GENSIM_VERSION} wheel, {_LEE_MEMBER.rsplit('/', 1)[1]}"


def _wiki() -> tuple[list[tuple[int, str]], str]:
    cached = corpora_cache() / f"enwiki-shortened-v{_WIKI_TEXT_VERSION}.txt"
    if not cached.is_file():
        articles = wiki_articles(bz2.decompress(_gensim_member(_WIKI_MEMBER)))
        atomic_write(cached, "\n\x1e\n".join(articles).encode("utf-8"))
    articles = cached.read_text(encoding="utf-8").split("\n\x1e\n")
    return list(enumerate(articles)), f"gensim {GENSIM_VERSION} wheel, {_WIKI_MEMBER.rsplit('/', 1)[1]}"


def _pydoc() -> tuple[list[tuple[int, str]], str]:
    from pydoc_data import topics

    keys = sorted(topics.topics)
    return (
        [(i, topics.topics[k].strip()) for i, k in enumerate(keys)],
        f"pydoc_data.topics of Python {sys.version.split()[0]}",
    )


def _pydocs() -> tuple[list[tuple[int, str]], str]:
    root = PYDOCS_ROOT
    if not root.is_dir():  # a machine without the package may still hold the text extracted from a pinned copy
        for version, pinned in _PYDOCS_SHA256.items():
            cached = corpora_cache() / f"pydocs-{pinned[:16]}-v{_PYDOCS_TEXT_VERSION}.txt"
            if cached.is_file():
                texts = _without(cached.read_text(encoding="utf-8").split("\n\x1e\n"), _pydoc_sentences())
                return (
                    list(enumerate(texts)),
                    f"Debian {PYDOCS_PACKAGE} {version}, PSF licence, sha256 "
                    f"{pinned[:12]} (text from the cache {cached}; the package is not installed here)",
                )
        raise SlimEdgeError(
            f"the pydocs corpus reads the Debian package {PYDOCS_PACKAGE}, and its HTML folder "
            f"{root} is missing; install it: apt-get install {PYDOCS_PACKAGE} "
            f"(as root; `make setup` does it)"
        )
    version = _debian_version(root.parent / "changelog.Debian.gz")
    pages = _pydocs_pages(root)
    digest = hashlib.sha256(
        b"".join(rel.encode() + b"\0" + hashlib.sha256(data).digest() for rel, data in pages)
    ).hexdigest()
    pinned = _PYDOCS_SHA256.get(version)
    if pinned and digest != pinned:
        raise SlimEdgeError(
            f"the HTML of {PYDOCS_PACKAGE} {version} under {root} has sha256 {digest[:12]}…, "
            f"expected {pinned[:12]}… (files changed?); reinstall it: "
            f"apt-get install --reinstall {PYDOCS_PACKAGE}"
        )
    cached = corpora_cache() / f"pydocs-{digest[:16]}-v{_PYDOCS_TEXT_VERSION}.txt"
    if not cached.is_file():
        texts = [t for t in (sphinx_prose(data.decode("utf-8")) for _, data in pages) if t]
        atomic_write(cached, "\n\x1e\n".join(texts).encode("utf-8"))
    texts = cached.read_text(encoding="utf-8").split("\n\x1e\n")
    texts = _without(texts, _pydoc_sentences())  # keep pydocs disjoint from pydoc (both splits)
    pin = "sha256 pinned" if pinned else "version not pinned"
    return (
        list(enumerate(texts)),
        f"Debian {PYDOCS_PACKAGE} {version or '(version unknown)'}, {root}, PSF licence, sha256 {digest[:12]} ({pin})",
    )


def _pydocs_pages(root: Path) -> list[tuple[str, bytes]]:
    """(path relative to root, bytes) of the HTML pages pydocs reads, sorted by path."""
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html"))
    return [
        (rel, (root / rel).read_bytes())
        for rel in rels
        if not rel.startswith("_") and not _PYDOCS_EXCLUDE.fullmatch(rel)
    ]


def _debian_version(changelog: Path) -> str:
    """The version in the first line of a Debian changelog, e.g. "python3.11 (3.11.2-6+deb12u9) …"."""
    try:
        with gzip.open(changelog, "rt", encoding="utf-8") as f:
            m = re.match(r"\S+ \(([^)]+)\)", f.readline())
    except OSError:
        return ""
    return m.group(1) if m else ""


def _pydoc_sentences() -> set[str]:
    """Long sentences of pydoc_data.topics (both splits), its hard-wrapped lines joined."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics.values())
    return _long_sentences(re.sub(r"(?<!\n)\n(?!\n)", " ", text), 80)


_DOCUMENTS = {"lee": _lee, "wiki": _wiki, "pydoc": _pydoc, "pydocs": _pydocs}


def _gensim_member(member: str) -> bytes:
    """A data file from the gensim wheel, extracted once into the cache and checked against its pin."""
    out = corpora_cache() / member.rsplit("/", 1)[1]
    if out.is_file():
        data = out.read_bytes()
        if hashlib.sha256(data).hexdigest() == _SHA256[member]:
            return data
    wheel = _gensim_wheel()
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise SlimEdgeError(f"{wheel} is not a usable gensim {GENSIM_VERSION} wheel ({e}); delete it and retry")
    digest = hashlib.sha256(data).hexdigest()
    if digest != _SHA256[member]:
        raise SlimEdgeError(
            f"{member} in {wheel} has sha256 {digest[:12]}…, expected {_SHA256[member][:12]}…; delete {wheel} and retry"
        )
    atomic_write(out, data)
    return data


def _gensim_wheel() -> Path:
    folder = corpora_cache()
    found = sorted(folder.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"slim-edge: fetching the gensim {GENSIM_VERSION} wheel once for its text corpora (not installing it)",
        file=sys.stderr,
    )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"gensim=={GENSIM_VERSION}",
        "--no-deps",
        "--only-binary",
        ":all:",
        "-d",
        str(folder),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if r.returncode != 0 or not found:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SlimEdgeError(
            f"could not download the gensim {GENSIM_VERSION} wheel ({tail[0]}); run "
            f"`{' '.join(cmd[2:])}` by hand with access to PyPI, or copy the wheel into {folder}"
        )
    return found[0]


# --- MediaWiki markup to plain text --------------------------------------------------------------------

_WIKI_TEXT_VERSION = 1  # bump when strip_wiki_markup changes: the plain text is cached
_SKIP_SECTIONS = (
    "primary references",
    "secondary references",
    "external link",
    "references",
    "external links",
    "see also",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
)
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|wikipedia|wp|[a-z]{2,3}(-[a-z]+)?):", re.I)


def wiki_articles(xml: bytes) -> list[str]:
    """Plain text of the main-namespace, non-redirect pages of a MediaWiki XML dump, title first."""
    root = ET.fromstring(xml)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    out = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        raw = page.findtext(f"{ns}revision/{ns}text") or ""
        body = strip_wiki_markup(raw)
        if body:
            out.append(f"{page.findtext(f'{ns}title')}\n\n{body}")
    return out


def _innermost(pattern: str, repl, text: str) -> str:
    rx = re.compile(pattern, re.S)
    while True:
        new = rx.sub(repl, text)
        if new == text:
            return new
        text = new


def _link(m: re.Match) -> str:
    inner = m.group(1)
    if _DROP_LINK.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1]


def strip_wiki_markup(text: str) -> str:
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<(math|gallery|timeline|syntaxhighlight|source|score)[^>]*>.*?</\1>", "", text, flags=re.S)
    text = _innermost(r"\{\{[^{}]*\}\}", "", text)
    text = _innermost(r"\{\|(?:(?!\{\|).)*?\|\}", "", text)
    text = _innermost(r"\[\[([^\[\]]*)\]\]", _link, text)
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    lines, skipping = [], False
    for line in text.split("\n"):
        line = line.strip()
        head = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if head:
            skipping = head.group(2).lower() in _SKIP_SECTIONS
            line = head.group(2)
        if skipping:
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        line = re.sub(r" +([,.;:])", r"\1", line)
        lines.append(line)
    text = html.unescape("\n".join(lines)).replace("\xa0", " ")
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# --- Sphinx HTML (the Python documentation) to plain prose ---------------------------------------------

_PYDOCS_TEXT_VERSION = 1  # bump when SphinxProse changes: the plain text is cached
_BLOCKS = {
    "p",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "li",
    "dd",
    "dt",
    "div",
    "section",
    "blockquote",
    "dl",
    "ul",
    "ol",
    "br",
    "hr",
    "figure",
    "figcaption",
    "aside",
    "caption",
}
_VOID = {"br", "hr", "img", "input", "meta", "link", "wbr", "col", "area", "base", "source"}
_SKIP_TAGS = {"pre", "table", "script", "style", "nav", "form", "math", "svg"}
_SKIP_CLASSES = {
    "headerlink",
    "sig",
    "toctree-wrapper",
    "highlight",
    "doctest",
    "footnote",
    "citation",
    "admonition-title",
    "graphviz",
}


class SphinxProse(HTMLParser):
    """Paragraphs of the main body (`<div role="main">`) of a Sphinx HTML page: navigation, sidebars,
    code blocks (`<pre>`), tables, API signatures (`<dt class="sig">`), tables of contents and pilcrow
    links are dropped; each block element (p, li, dd, heading, …) becomes one line of plain text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] = []
        self._main_depth = 0  # open divs since the main body began; 0 = outside it
        self._skip: list[str] = []  # the open element that started a skipped subtree, and its nesting

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if tag in ("br", "hr") and self._main_depth and not self._skip:
                self._flush()
            return
        a = dict(attrs)
        if not self._main_depth:
            if tag == "div" and a.get("role") == "main":
                self._main_depth = 1
            return
        if tag == "div":
            self._main_depth += 1
        if self._skip:
            if tag == self._skip[0]:
                self._skip.append(tag)
            return
        if tag in _SKIP_TAGS or _SKIP_CLASSES & set((a.get("class") or "").split()):
            self._skip = [tag]
            return
        if tag in _BLOCKS:
            self._flush()

    def handle_endtag(self, tag):
        if not self._main_depth or tag in _VOID:
            return
        if tag == "div":
            self._main_depth -= 1
            if not self._main_depth:
                self._flush()
        if self._skip:
            if tag == self._skip[0]:
                self._skip.pop()
            return
        if tag in _BLOCKS:
            self._flush()

    def handle_data(self, data):
        if self._main_depth and not self._skip:
            self._buf.append(data)

    def _flush(self):
        text = " ".join("".join(self._buf).replace("\xa0", " ").split())
        self._buf = []
        text = re.sub(r" +([,.;:!?)])", r"\1", text).replace("( ", "(")
        if re.search(r"[A-Za-z]", text):
            self.paragraphs.append(text)


def sphinx_prose(page: str) -> str:
    """The prose of one Sphinx HTML page, one paragraph a line, blank lines between them."""
    p = SphinxProse()
    p.feed(page)
    p.close()
    p._flush()
    return "\n\n".join(p.paragraphs)

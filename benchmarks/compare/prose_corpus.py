"""Assemble an English prose corpus from documentation books that Debian packages, one text file per chapter:

- The Debian Administrator's Handbook (package debian-handbook, CC-BY-SA / GPL-2+), English edition, HTML;
- the Debian Reference (debian-reference-en, GPL-2+), HTML;
- the Python documentation (python3.11-doc, PSF licence) but its C API: the tutorial, the HOWTOs, the FAQ, the
  language and library references, the guides to using, extending, installing and distributing, "What's New"
  and the glossary, from its reStructuredText sources.

Markup is removed, and so are code: HTML <pre>, <code> and tables, reStructuredText literal blocks and
directives. What is left is running English text about computing. Install the packages, then run

    apt-get install -y --no-install-recommends debian-handbook debian-reference-en python3.11-doc
    python benchmarks/compare/prose_corpus.py data/prose

and give `--data data/prose` to `mixturelm train` or `compare`. The script prints what it wrote; documents are
split into training and validation by their names, as every corpus is.
"""

from __future__ import annotations

import html.parser
import re
import sys
from pathlib import Path

HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")
REFERENCE = Path("/usr/share/debian-reference")
PYTHON_DOC = Path("/usr/share/doc/python3.11/html/_sources")
PYTHON_PARTS = ("tutorial", "howto", "faq", "reference", "library", "using", "extending", "installing",
                "distributing", "whatsnew", "glossary.rst.txt")
PACKAGES = "debian-handbook debian-reference-en python3.11-doc"


class ProseOfHtml(html.parser.HTMLParser):
    """The text of an HTML page outside code, tables, scripts and styles, and outside the navigation and
    table-of-contents divs, one paragraph a line."""

    SKIP = {"pre", "code", "table", "script", "style", "head", "kbd", "samp"}
    SKIP_DIV_CLASSES = {"navheader", "navfooter", "toc", "list-of-tables", "list-of-examples", "list-of-figures"}
    BLOCK = {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "br", "section", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.skipping = 0  # open SKIP elements
        self.divs = 0  # open divs
        self.skip_from_div = None  # the div depth at which a skipped div opened
        self.parts = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag == "div":
            self.divs += 1
            classes = set((dict(attrs).get("class") or "").split())
            if self.skip_from_div is None and classes & self.SKIP_DIV_CLASSES:
                self.skip_from_div = self.divs
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag == "div":
            if self.skip_from_div == self.divs:
                self.skip_from_div = None
            self.divs = max(0, self.divs - 1)
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skipping and self.skip_from_div is None:
            self.parts.append(data)

    def text(self) -> str:
        return "".join(self.parts)


def prose_of_html(page: str) -> str:
    parser = ProseOfHtml()
    parser.feed(page)
    return tidy(parser.text())


CODE_DIRECTIVES = {"code-block", "code", "sourcecode", "doctest", "testcode", "testsetup", "testcleanup",
                   "testoutput", "productionlist", "literalinclude", "highlight", "toctree", "index", "image",
                   "figure", "raw", "csv-table", "list-table", "table", "moduleauthor", "sectionauthor"}


def prose_of_rst(source: str) -> str:
    """reStructuredText without code: literal blocks (after '::'), code directives and their bodies, comments,
    interactive sessions and section rules. Other directives (function and class descriptions, notes) lose
    their signature line and keep their text."""
    out, skip_indent = [], None
    for line in source.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        directive = re.match(r"\.\.\s+([\w:-]+)::", stripped)
        if stripped.startswith("..") and (directive is None or directive.group(1) in CODE_DIRECTIVES):
            skip_indent = indent  # a comment, target or code directive, with its indented body
            continue
        if directive or re.match(r":[\w -]+:(\s|$)", stripped):  # a signature or a field line (not a :role:`x`)
            continue
        if re.fullmatch(r"([=\-~^*#+\"'`])\1{3,}", stripped) or stripped.startswith((">>>", "...", "$ ")):
            continue
        if stripped.endswith("::"):  # the paragraph's literal block follows
            line = "" if stripped == "::" else line.rstrip()[:-1]
            skip_indent = indent
        line = re.sub(r":[a-z:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", line)  # :role:`text <target>` -> text
        out.append(line.replace("``", "").replace("**", "").replace("`_", "").replace("`", ""))
    return tidy("\n".join(out))


def tidy(text: str) -> str:
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        words = " ".join(block.split())
        if len(words) > 40:  # drop headings, captions and other fragments
            paragraphs.append(words)
    return "\n\n".join(paragraphs) + "\n"


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def main(out: Path) -> None:
    missing = [p for p in (HANDBOOK, REFERENCE, PYTHON_DOC) if not p.is_dir()]
    if missing:
        fail(f"{missing[0]} is missing: install the books first (apt-get install -y {PACKAGES})")
    if out.exists() and any(out.iterdir()):
        fail(f"{out} is not empty: give a new folder (the corpus is every .txt file in it)")
    out.mkdir(parents=True, exist_ok=True)
    sources = [("handbook", HANDBOOK, p, prose_of_html) for p in sorted(HANDBOOK.glob("*.html"))]
    sources += [("reference", REFERENCE, p, prose_of_html) for p in sorted(REFERENCE.glob("*.en.html"))]
    for part in PYTHON_PARTS:
        root = PYTHON_DOC / part
        files = [root] if root.is_file() else sorted(root.rglob("*.rst.txt"))
        sources += [("python-doc", PYTHON_DOC, p, prose_of_rst) for p in files]
    total, written = 0, set()
    for book, root, path, extract in sources:
        text = extract(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) < 500:  # index pages and stubs
            continue
        stem = path.relative_to(root).as_posix().removesuffix(".rst.txt").removesuffix(".html")
        name = re.sub(r"[^A-Za-z0-9.]+", "-", stem)
        target = out / f"{book}--{name}.txt"
        if target in written:
            fail(f"two chapters map to the file name {target.name}; the naming rule needs a fix")
        target.write_text(text, encoding="utf-8")
        written.add(target)
        total += len(text.encode())
    print(f"wrote {len(written)} documents, {total / 1e6:.1f} MB of text, to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: python benchmarks/compare/prose_corpus.py OUT_DIR")
    main(Path(sys.argv[1]))

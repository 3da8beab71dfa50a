"""The documents a user reads: every relative link of README.md, docs/*.md and
pretrained/*/README.md reaches a file of the repository (and, with an anchor, one of the
target's headings under GitHub's slug rule); README.md and docs/*.md name no path of one
machine and no issue number; and the README's install and test commands are the ones
.ci/run runs."""

import glob
import html
import os
import re
import shlex
import unicodedata
import urllib.parse

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_files(*patterns):
    return sorted(os.path.relpath(path, ROOT) for pattern in patterns
                  for path in glob.glob(os.path.join(ROOT, pattern)))


LINKED_DOCS = repo_files("README.md", "docs/*.md", "pretrained/*/README.md")
PROSE_DOCS = repo_files("README.md", "docs/*.md")


def read(relative_path):
    with open(os.path.join(ROOT, relative_path), encoding="utf-8") as f:
        return f.read()


# --------------------------------------------------------------------------- markdown

FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")
CODE_SPAN = re.compile(r"(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)


def fenced_blocks(lines):
    """(first, last, info) of each fenced code block, as line indices, its fences included;
    an unclosed fence runs to the end of the file, as on GitHub."""
    blocks, opening = [], None
    for i, line in enumerate(lines):
        fence = FENCE.match(line)
        if opening is None:
            if fence and not (fence.group(1)[0] == "`" and "`" in fence.group(2)):
                opening = (i, fence.group(1), fence.group(2).strip())
        elif (fence and fence.group(1)[0] == opening[1][0]
              and len(fence.group(1)) >= len(opening[1]) and not fence.group(2).strip()):
            blocks.append((opening[0], i, opening[2]))
            opening = None
    if opening is not None:
        blocks.append((opening[0], len(lines) - 1, opening[2]))
    return blocks


def blank(text):
    """The text with every character but newlines made a space (offsets and lines kept)."""
    return re.sub(r"[^\n]", " ", text)


def without_code(text):
    """The text with fenced code blocks, inline code and HTML comments blanked out, so that
    what is left is what GitHub renders as markdown, at the same offsets."""
    lines = text.split("\n")
    for first, last, _ in fenced_blocks(lines):
        for i in range(first, last + 1):
            lines[i] = blank(lines[i])
    text = "\n".join(lines)
    text = HTML_COMMENT.sub(lambda m: blank(m.group()), text)
    return CODE_SPAN.sub(lambda m: blank(m.group()), text)


def plain_heading_text(markdown):
    """What GitHub shows of a heading's markdown: code spans keep their text; links and images
    keep their text; HTML tags, emphasis markers and backslash escapes go."""
    pieces = re.split(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", markdown)
    shown = []
    for i in range(0, len(pieces), 3):
        text = pieces[i]
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)     # [text](url), ![alt](url)
        text = re.sub(r"\[([^\]]*)\]\[[^\]]*\]", r"\1", text)      # [text][reference]
        text = re.sub(r"</?[A-Za-z][^>]*>", "", text)              # HTML tags
        text = re.sub(r"(?<!\w)_+(?=\S)|(?<=\S)_+(?!\w)", "", text)  # _emphasis_, __strong__
        text = re.sub(r"\*+|~~", "", text)
        text = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", text)
        shown.append(html.unescape(text))
        if i + 2 < len(pieces):
            code = pieces[i + 2]
            if code.startswith(" ") and code.endswith(" ") and code.strip():
                code = code[1:-1]
            shown.append(code)
    return "".join(shown).strip()


def github_slug(heading_text):
    """GitHub's anchor for a heading's shown text (github-slugger): lowercase; keep letters,
    digits, marks, connector punctuation (`_`), `-` and spaces, drop everything else; then
    each space becomes `-`."""
    kept = "".join(c for c in heading_text.strip().lower()
                   if c in " -" or unicodedata.category(c) in SLUG_CATEGORIES)
    return kept.replace(" ", "-")


SLUG_CATEGORIES = {"Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "Pc"}


def unique_slugs(texts):
    """Slugs of headings in document order; a repeated one gets -1, -2, ... as on GitHub."""
    seen, slugs = {}, []
    for text in texts:
        slug = original = github_slug(text)
        while slug in seen:
            seen[original] += 1
            slug = f"{original}-{seen[original]}"
        seen[slug] = 0
        slugs.append(slug)
    return slugs


ATX_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(?:=+|-+)[ \t]*$")
NOT_A_PARAGRAPH = re.compile(r"^\s*(?:$|[-*+>|#]|\d+[.)]\s|<)")


def headings(text):
    """The shown text of every heading (ATX `## x` and setext `x` over `===`/`---`) outside
    code blocks, in order."""
    lines = text.split("\n")
    in_code = {i for first, last, _ in fenced_blocks(lines) for i in range(first, last + 1)}
    found = []
    for i, line in enumerate(lines):
        if i in in_code:
            continue
        atx = ATX_HEADING.match(line)
        if atx:
            found.append(plain_heading_text(atx.group(1) or ""))
        elif (SETEXT_UNDERLINE.match(line) and i > 0 and i - 1 not in in_code
              and not NOT_A_PARAGRAPH.match(lines[i - 1])):
            found.append(plain_heading_text(lines[i - 1]))
    return found


def anchors(text):
    """Every anchor a link may name in this markdown: heading slugs and HTML ids/names."""
    html_ids = re.findall(r"""<[A-Za-z][^>]*?\s(?:id|name)\s*=\s*["']([^"']+)["']""", text)
    return set(unique_slugs(headings(text))) | set(html_ids)


LINK_DESTINATION = (r"\(\s*(<[^>\n]*>|[^\s()<>]+(?:\([^\s()]*\)[^\s()<>]*)*)?"   # the target
                    r"""(?:\s+(?:"[^"]*"|'[^']*'|\([^)]*\)))?\s*\)""")               # a title
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]" + LINK_DESTINATION)
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>\n]*>|\S+)", re.M)
HTML_LINK = re.compile(r"<(?:img\b[^>]*?\ssrc|a\b[^>]*?\shref)\s*=\s*"
                       r"""(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.I)


def links(text):
    """(line, as written, target) of every link, image and HTML img/a outside code."""
    rendered = without_code(text)
    found = []

    def add(match, target, offset=0):
        start = offset + match.start()
        found.append((start, rendered.count("\n", 0, start) + 1, " ".join(match.group().split()),
                      target))

    def add_inline(region, offset):
        for match in INLINE_LINK.finditer(region):
            add(match, (match.group(2) or "").strip("<>"), offset)
            add_inline(match.group(1), offset + match.start(1))   # an image inside a link

    add_inline(rendered, 0)
    for match in REFERENCE_DEFINITION.finditer(rendered):
        add(match, match.group(1).strip("<>"))
    for match in HTML_LINK.finditer(rendered):
        add(match, html.unescape(next(g for g in match.groups() if g is not None)))
    return [link[1:] for link in sorted(found)]


def is_external(target):
    return re.match(r"(?i)(https?:|mailto:)", target) is not None


def broken_link(doc, target, anchors_of):
    """Why `target`, written in the repository file `doc`, does not resolve; None if it does."""
    path, _, anchor = urllib.parse.unquote(target).partition("#")
    if not target:
        return "an empty link"
    if path.startswith("/"):
        return "an absolute path: write it relative to this file"
    if path:
        resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path))
        if resolved == ".." or resolved.startswith(".." + os.sep):
            return f"{resolved} is outside the repository"
        if not os.path.exists(os.path.join(ROOT, resolved)):
            return f"{resolved} does not exist"
    else:
        resolved = doc
    if anchor and resolved.endswith(".md") and os.path.isfile(os.path.join(ROOT, resolved)):
        if anchor not in anchors_of(resolved):   # `#` alone is the top of the page
            return f"{resolved} has no heading with the anchor #{anchor}"
    return None


@pytest.mark.parametrize("doc", LINKED_DOCS)
def test_every_relative_link_resolves(doc):
    cache = {}

    def anchors_of(path):
        if path not in cache:
            cache[path] = anchors(read(path))
        return cache[path]

    problems = [f"{doc}:{line}: {written} -> {why}"
                for line, written, target in links(read(doc))
                if not is_external(target)
                for why in [broken_link(doc, target, anchors_of)] if why]
    assert not problems, "broken links:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the rules themselves

@pytest.mark.parametrize("heading, slug", [
    ("## f-VAEs (`f_vaes.py`)", "f-vaes-f_vaespy"),
    ("## Several devices and machines (`tf.distribute`)",
     "several-devices-and-machines-tfdistribute"),
    ("### Why the author's setting starts below a random encoder, and `--local-size 8` "
     "(2026-12-01)",
     "why-the-authors-setting-starts-below-a-random-encoder-and---local-size-8-2026-12-01"),
    ("## `layers/`: invertible flow layers", "layers-invertible-flow-layers"),
    ("## Benchmark (`bench/`)", "benchmark-bench"),
    ("# Precision: float32, bfloat16, float16", "precision-float32-bfloat16-float16"),
    ("## The **bold** and _emphasised_ [linked](docs/x.md) words",
     "the-bold-and-emphasised-linked-words"),
    ("## snake_case stays, `__init__` too", "snake_case-stays-__init__-too"),
    ("## Ünïcode lëtters — and a dash", "ünïcode-lëtters--and-a-dash"),
    ("## Trailing hashes ##", "trailing-hashes"),
    ("## 50 % of 1.5x: 3/4 & more!", "50--of-15x-34--more"),
])
def test_slug_follows_githubs_rule(heading, slug):
    assert unique_slugs(headings(heading)) == [slug]


def test_repeated_headings_get_numbered_slugs():
    text = "# Tests\n## Tests\n### Tests-1\n## Tests\n"
    assert unique_slugs(headings(text)) == ["tests", "tests-1", "tests-1-1", "tests-2"]


def test_headings_and_links_in_code_are_not_read():
    text = ("# Title\n\n```bash\n# on 10.0.0.1 (worker 0)\n[in a block](nowhere.md)\n```\n\n"
            "Text `[in code](nowhere.md)` and [a link](docs/x.md#part)\n"
            "and ![a\npicture](a.png) and <img src=\"b.png\" width=3/> <a href='c.md'>c</a>\n\n"
            "~~~\n<img src=\"nowhere.png\"/>\n~~~\n[![badge](d.png)](e.md \"title\")\n"
            "Setext heading\n---\n")
    assert headings(text) == ["Title", "Setext heading"]
    assert [(line, target) for line, _, target in links(text)] == [
        (8, "docs/x.md#part"), (9, "a.png"), (10, "b.png"), (10, "c.md"), (15, "e.md"),
        (15, "d.png")]


def test_a_broken_path_or_anchor_is_named():
    known = {"README.md": {"tests", "layout"},
             "docs/faults.md": {"faults-and-how-they-are-handled"}}
    assert broken_link("README.md", "#tests", known.get) is None
    assert broken_link("docs/faults.md", "../README.md#layout", known.get) is None
    assert broken_link("README.md", "#", known.get) is None
    assert broken_link("README.md", "docs/faults.md#faults-and-how-they-are-handled",
                       known.get) is None
    assert "no heading with the anchor #measured-here" in broken_link("README.md", "#measured-here",
                                                                       known.get)
    assert "docs/nothing.md does not exist" in broken_link("README.md", "docs/nothing.md",
                                                           known.get)
    assert "outside the repository" in broken_link("README.md", "../shared/data", known.get)
    assert "absolute path" in broken_link("README.md", "/work/x.md", known.get)


# --------------------------------------------------------------------------- words

MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|home|tmp|root|Users|mnt|scratch)/"
                          r"|(?<!\w)[A-Za-z]:\\")
ISSUE_NUMBER = re.compile(r"(?i)\b(?:issues?|PR|pull requests?)\s*(?:#|no\.\s*)?\d+")
URL = re.compile(r"[A-Za-z][\w+.-]*://\S+")


def forbidden_words(text):
    """(line, what) for each machine path or issue number, code blocks included, URLs not."""
    found = []
    for number, line in enumerate(text.split("\n"), 1):
        line = URL.sub(" ", line)
        found += [(number, m.group()) for m in MACHINE_PATH.finditer(line)]
        found += [(number, m.group()) for m in ISSUE_NUMBER.finditer(line)]
    return found


@pytest.mark.parametrize("doc", PROSE_DOCS)
def test_no_machine_paths_or_issue_numbers(doc):
    found = [f"{doc}:{line}: {what!r}" for line, what in forbidden_words(read(doc))]
    assert not found, ("a path of one machine or an issue number (readers have neither):\n"
                       + "\n".join(found))


def test_the_word_rules_catch_what_they_should():
    text = ("data in /work/shared/data\nsee issue 23, Issue #7, issues 3 and 4\n"
            "~/photos, ../shared/data, tests/tmp/x, https://example.com/home/page\n"
            "C:\\Users\\me and /tmp/run\n")
    assert forbidden_words(text) == [(1, "/work/"), (2, "issue 23"), (2, "Issue #7"),
                                     (2, "issues 3"), (4, "C:\\"), (4, "/tmp/")]


# --------------------------------------------------------------------------- README commands and CI

VALUE_OPTIONS = {"--root-user-action", "--progress-bar", "--cache-dir", "-i", "--index-url",
                 "--extra-index-url", "-f", "--find-links", "--timeout", "--retries"}


def shell_commands(script):
    """(line as written, argv) of each simple command of a shell script: continuation lines
    joined, comments dropped, split at `&&`, `||`, `;` and `|`."""
    commands = []
    for line in re.sub(r"\\\n", " ", script).split("\n"):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        argv = []
        for token in list(lexer) + [";"]:
            if token in {"&&", "||", ";", "|", "&"}:
                if argv:
                    commands.append((line.strip(), argv))
                argv = []
            else:
                argv.append(token)
    return commands


def normalised(argv):
    """argv with environment assignments dropped and the interpreter spelled one way:
    `python3.11`, `.venv/bin/python` -> python; `pip3` -> python -m pip; `pytest` ->
    python -m pytest; `-m`'s module `pip3` -> pip."""
    while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
        argv = argv[1:]
    if not argv:
        return []
    program = os.path.basename(argv[0])
    if re.fullmatch(r"python[\d.]*", program):
        argv = ["python", *argv[1:]]
    elif re.fullmatch(r"(pip|pytest)[\d.]*", program):
        argv = ["python", "-m", re.sub(r"[\d.]+$", "", program), *argv[1:]]
    if argv[:2] == ["python", "-m"] and len(argv) > 2:
        argv = ["python", "-m", re.sub(r"^pip[\d.]+$", "pip", argv[2]), *argv[3:]]
    return argv


def requirement_installs(commands):
    """(line, what it installs) of each `pip install` of a requirements file; what it installs
    is its `-r`/`-c` files and packages, without the options that only change pip's output."""
    installs = []
    for line, argv in commands:
        argv = normalised(argv)
        if argv[:4] != ["python", "-m", "pip", "install"]:
            continue
        installed, rest = [], iter(argv[4:])
        for arg in rest:
            if arg in {"-r", "--requirement", "-c", "--constraint", "-e", "--editable"}:
                installed.append(f"-{arg.lstrip('-')[0]} {os.path.normpath(next(rest, ''))}")
            elif re.match(r"^--(requirement|constraint)=", arg):
                option, value = arg.split("=", 1)
                installed.append(f"-{option[2]} {os.path.normpath(value)}")
            elif arg in VALUE_OPTIONS:
                next(rest, None)
            elif not arg.startswith("-"):
                installed.append(arg)
        if any(item.startswith("-r ") for item in installed):
            installs.append((line, sorted(installed)))
    return installs


def suite_runs(commands):
    """(line, pytest's arguments) of each test command, paths without a trailing slash."""
    runs = [(line, normalised(argv)) for line, argv in commands]
    return [(line, [arg.rstrip("/") if len(arg) > 1 else arg for arg in argv[3:]])
            for line, argv in runs if argv[:3] == ["python", "-m", "pytest"]]


def readme_first_bash_block():
    lines = read("README.md").split("\n")
    for first, last, info in fenced_blocks(lines):
        if info.split()[:1] in (["bash"], ["sh"], ["shell"], ["console"]):
            return "\n".join(re.sub(r"^\s*\$ ", "", line) for line in lines[first + 1:last])
    pytest.fail("README.md has no fenced ```bash block")


def commands_agree(readme_script, ci_script):
    """Why the README's install and test commands differ from .ci/run's; None if they agree."""
    readme, ci = shell_commands(readme_script), shell_commands(ci_script)
    problems = []
    for kind, find in [("install", requirement_installs), ("test", suite_runs)]:
        in_readme, in_ci = find(readme), find(ci)
        if not in_readme:
            problems.append(f"the README's first bash block has no {kind} command")
        elif not in_ci:
            problems.append(f".ci/run has no {kind} command; the README's is:\n"
                            f"    {in_readme[0][0]}")
        elif [what for _, what in in_readme] != [what for _, what in in_ci]:
            problems.append(f"the {kind} commands differ:\n"
                            + "".join(f"    README.md: {line}\n" for line, _ in in_readme)
                            + "".join(f"    .ci/run:   {line}\n" for line, _ in in_ci))
    return "\n".join(problems) or None


def test_readme_commands_are_the_ones_ci_runs():
    problem = commands_agree(readme_first_bash_block(), read(".ci/run"))
    assert problem is None, problem


@pytest.mark.parametrize("readme, agrees", [
    ("pip install -r requirements.txt && python f_vaes.py --img-size 64\n"
     "python -m pytest -q tests\n", True),
    ("python3.11 -m venv .venv\nsource .venv/bin/activate\n"
     ".venv/bin/pip install -r ./requirements.txt  # everything\npytest -q tests/\n", True),
    ("python -m venv .venv && . .venv/bin/activate && \\\n  pip3 install -r requirements.txt\n"
     "TF_CPP_MIN_LOG_LEVEL=2 python3 -m pytest -q tests\n", True),
    ("pip install -r requirements-dev.txt\npython -m pytest -q tests\n", False),
    ("pip install -r requirements.txt\npython -m pytest -q tests/test_docs.py\n", False),
    ("pip install -r requirements.txt\npython -m pytest tests\n", False),
    ("pip install -r requirements.txt\n", False),
    ("python -m pytest -q tests\n", False),
])
def test_commands_agree_despite_spelling_and_venv_lines(readme, agrees):
    ci = ("#!/usr/bin/env bash\nset -euo pipefail\ncd \"$(dirname \"$0\")/..\"\n"
          "export TF_CPP_MIN_LOG_LEVEL=2\npython3 -m pip install -q --disable-pip-version-check "
          "--root-user-action=ignore -r requirements.txt\npython3 -m pytest -q tests\n")
    problem = commands_agree(readme, ci)
    assert (problem is None) == agrees, problem
    if problem and "differ" in problem:
        assert "README.md: " in problem and ".ci/run:   " in problem

"""The README's results are short summaries of pages that own them: every decimal number in
a summary section is a number of its owner page, at the README's precision. A table or a
sentence changed on the owner page and not in the README (or the other way round) fails here
instead of drifting apart (issue: facts stated on up to six pages had drifted)."""

import re

import pytest

from test_docs import headings, read, without_code

# README section (its heading) -> the pages that own its numbers
OWNERS = {
    "f-VAE, Glow and VAE of similar size, at equal steps": ["docs/comparison.md"],
    "f-VAE, Glow and VAE, long: equal steps and equal wall time": ["docs/comparison.md"],
    "A calibrated decoder: a better bound and samples in fewer steps": ["docs/comparison.md"],
    "Deep InfoMax on CIFAR-10": ["docs/infomax.md"],
    "How long": ["docs/precision.md"],
}

DECIMAL = re.compile(r"(?<![\w.,])(\d+)\.(\d+)(?![\w.]*\d)")


def decimals(text):
    """The decimal numbers of `text` (not in code, links or picture tags): (text, value, places)."""
    text = re.sub(r"\]\([^)]*\)|<img[^>]*>", " ", without_code(text))
    return [(m.group(0), float(m.group(0)), len(m.group(2))) for m in DECIMAL.finditer(text)]


def section(text, title):
    """The text under the heading `title` up to the next heading of the same or a higher level."""
    lines = text.split("\n")
    found = [(i, level) for i, level, heading in readme_headings(lines) if heading == title]
    assert found, f"README.md has no heading {title!r}"
    start, level = found[0]
    end = next((i for i, lv, _ in readme_headings(lines) if i > start and lv <= level), len(lines))
    return "\n".join(lines[start + 1:end])


def readme_headings(lines):
    for i, line in enumerate(lines):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*$", line)
        if m:
            yield i, len(m.group(1)), m.group(2)


def unowned(summary, owner_text):
    """The numbers of `summary` that no number of `owner_text` rounds to (half up)."""
    owned = [value for _, value, _ in decimals(owner_text)]
    return [shown for shown, value, places in decimals(summary)
            if not any(abs(o - value) <= 0.5 * 10 ** -places + 1e-9 for o in owned)]


@pytest.mark.parametrize("title", sorted(OWNERS))
def test_the_readmes_numbers_are_those_of_the_page_that_owns_them(title):
    owner_text = "\n".join(read(page) for page in OWNERS[title])
    missing = unowned(section(read("README.md"), title), owner_text)
    assert not missing, (f"README.md, {title!r}: {missing} appear in none of {OWNERS[title]} "
                         "(change the owner page and the README together)")


def test_a_number_changed_on_one_side_is_caught():
    owner = "| f-VAE 64x64 | 1.260 | 0.824 | **1.53x** |"
    assert unowned("| f-VAE 64x64 | 1.26 s | 0.82 s |", owner) == []
    assert unowned("| f-VAE 64x64 | 1.27 s | 0.82 s |", owner) == ["1.27"]
    assert unowned("bits/dim 6.283 and 6.28", "6.283") == []
    assert unowned("recall 0.72 against 0.61", "recall 0.720") == ["0.61"]
    assert unowned("6.84 and 6.80", "6.835 and 6.795") == []  # half up
    assert unowned("6.84", "6.8449") == [] and unowned("6.84", "6.8451") == ["6.84"]
    assert unowned("`code 9.99` and [a link](x-1.5.md)", "") == []

"""Commands in the docs are executable facts: every `python ...` command of README.md,
docs/*.md and pretrained/*/README.md (fenced and indented code blocks, inline code) parses
with its script's own argparse parser (no unknown command or flag, no invalid choice), and a
command that reads a run names with --out a folder that an earlier command of its block (or,
inline, its paragraph) trains, a placeholder in capitals, a folder the repository ships, or
one whose origin the text gives (`WHERE_THE_TEXT_SAYS`).

A command is parsed by the script's `main` with `argparse.ArgumentParser.parse_args` made to
stop right after parsing: the real parser, its sub-commands and default command, and nothing
of what the script would then do."""

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys
from unittest import mock

import pytest

from test_docs import CODE_SPAN, HTML_COMMENT, blank, fenced_blocks, normalised, read, repo_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = repo_files("README.md", "docs/*.md", "pretrained/*/README.md")
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "zsh"}  # a fenced block's info word

# `python -m MODULE` of modules that are not this repository's scripts
OTHER_MODULES = {"pip": "pip's own command line", "venv": "the standard library's venv"}
# scripts that run another script: `python tests/fault_hooks.py f_vaes.py ARGS`
WRAPPERS = {"tests/fault_hooks.py": "runs the script it is given, with test-only fault hooks"}
# more arguments here, unnamed: a command with one may leave out required ones
ELISIONS = {"...", "ARGS"}
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")
PYTHON_FIRST = re.compile(r"\s*(\(\s*|\w+=\S*\s+|(nohup|setsid|time|nice( -n)? -?\d+)\s+)*"
                          r"\S*python[\d.]*\s")

# A command that reads a run whose folder no earlier command of its block trains, where the
# text around it says where the folder comes from: (doc, folder) -> what the text says.
WHERE_THE_TEXT_SAYS = {
    ("docs/api.md", "runs/fvae64"): "the run the page's Python block loads (`FVAE.from_run`); "
                                    "`python f_vaes.py --img-size 64` trains it (README.md)",
    ("docs/api.md", "runs/infomax"): "the run the page's Python block loads (`load_encoder`); "
                                     "infomax.py's default --out",
    ("docs/fvaes.md", "runs/fvae64"): "\"the training line above\": the page's first block "
                                      "trains it",
    ("docs/search.md", "runs/dim-cifar10"): "\"a trained encoder\" (the first paragraph); "
                                            "docs/infomax.md's first block trains it",
}


# --------------------------------------------------------------------------- the commands

def shipped_runs():
    """The run folders the repository ships (pretrained/<name>), as a command names them."""
    return {os.path.relpath(os.path.dirname(path), ROOT)
            for path in repo_files("pretrained/*/config.json")}


def logical_lines(lines, first):
    """(line number, text) of each shell line, a trailing backslash joining the next one."""
    joined, start, pending = [], None, ""
    for number, line in enumerate(lines, first):
        line = re.sub(r"^\s*\$ ", "", line)
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append((start, pending + line))
        start, pending = None, ""
    if start is not None:
        joined.append((start, pending))
    return joined


def loop_values(lines):
    """{variable: its first value} of each `for X in a b c` of a block, for `$X` in its body."""
    found = {}
    for line in lines:
        for name, value in re.findall(r"\bfor\s+(\w+)\s+in\s+([^\s;]+)", line):
            found.setdefault(name, value)
    return found


def split_commands(text):
    """The argv of each simple command of one shell line: comments dropped, split at `&&`,
    `||`, `;`, `|` and `&`, subshell parentheses dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, argv = [], []
    for token in list(lexer) + [";"]:
        if set(token) <= set("();<>|&") and set(token) & set(";|&"):   # `&&`, `;`, `&)`
            if argv:
                commands.append(argv)
            argv = []
        elif token.strip("()"):
            argv.append(token)
    return commands


def without_wrappers(argv):
    """argv without what runs a command unchanged around it (`nohup`, `setsid`, `time`,
    `nice -n 10`), spelled as `test_docs.normalised` spells an interpreter."""
    while argv:
        if argv[0] in {"nohup", "setsid", "time"}:
            argv = argv[1:]
        elif argv[0] == "nice":
            argv = argv[3:] if argv[1:2] == ["-n"] else argv[2:] if re.fullmatch(
                r"-\d+", (argv[1:2] or [""])[0]) else argv[1:]
        elif re.match(r"^[A-Za-z_]\w*=", argv[0]):
            argv = argv[1:]
        else:
            break
    if not argv or not re.fullmatch(r"python[\d.]*", os.path.basename(argv[0])):
        return []
    return normalised(argv)


def python_commands(doc_lines, first):
    """(line number, as written, argv) of each `python ...` command of shell lines."""
    values = loop_values(doc_lines)
    found = []
    for number, line in logical_lines(doc_lines, first):
        # `[--top 9]`: an optional part, written as it would be given
        line = re.sub(r"\[(-[^\[\]]*)\]", r"\1", line)
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group()), line)
        try:
            commands = split_commands(line)
        except ValueError:  # an unclosed quote: no argv, if it is a python command at all
            if PYTHON_FIRST.match(line):
                found.append((number, " ".join(line.split()), None))
            continue
        for argv in commands:   # `python ...` alone speaks of any command, not of one
            argv = without_wrappers(argv)
            if argv[:1] == ["python"] and len(argv) > 1 and argv[1] not in ELISIONS:
                found.append((number, " ".join(line.split()), argv))
    return found


def command_groups(text):
    """The `python ...` commands of a markdown page, grouped by what a reader takes as one
    sequence: a fenced shell block, an indented code block, or the inline code of one
    paragraph. [(where, [(line number, as written, argv)])]."""
    lines = text.split("\n")
    groups, in_code = [], set()
    for first, last, info in fenced_blocks(lines):
        in_code.update(range(first, last + 1))
        if info.split()[:1] in ([], *([word] for word in SHELL_BLOCKS)):
            groups.append((f"block at line {first + 1}",
                           python_commands(lines[first + 1:last], first + 2)))
    i = 0
    while i < len(lines):   # indented code: 4 spaces or more, after a blank line
        if (i not in in_code and lines[i].startswith("    ") and lines[i].strip()
                and (i == 0 or not lines[i - 1].strip())):
            start = i
            while i < len(lines) and i not in in_code and (
                    lines[i].startswith("    ") or not lines[i].strip()):
                i += 1
            in_code.update(range(start, i))
            groups.append((f"block at line {start + 1}",
                           python_commands(lines[start:i], start + 1)))
        else:
            i += 1
    prose = "\n".join(blank(line) if i in in_code else line for i, line in enumerate(lines))
    prose = HTML_COMMENT.sub(lambda m: blank(m.group()), prose)
    paragraphs = {}
    for span in CODE_SPAN.finditer(prose):
        line = prose.count("\n", 0, span.start()) + 1
        paragraph = len(re.findall(r"\n[ \t]*\n", prose[:span.start()]))
        found = python_commands([" ".join(span.group(2).split())], line)
        if found:
            paragraphs.setdefault(paragraph, (line, []))[1].extend(found)
    groups += [(f"paragraph at line {line}", found) for line, found in paragraphs.values()]
    return [(where, found) for where, found in groups if found]


# --------------------------------------------------------------------------- their parsers

class Parsed(BaseException):
    """Raised by argparse's `parse_args` right after it parsed: what the script would do next
    does not run."""

    def __init__(self, namespace):
        super().__init__()
        self.namespace = namespace


@functools.cache
def script_module(path):
    """The module of a script of the repository, imported once (bench/, experiments/ and tools/
    are folders of scripts, not packages; their folder comes first on the path, as when run)."""
    if "/" not in path:
        return importlib.import_module(path[:-3])
    name = "doc_command_" + re.sub(r"\W", "_", path[:-3])
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    with mock.patch.object(sys, "path", [os.path.dirname(spec.origin), *sys.path]):
        spec.loader.exec_module(module)
    return module


def is_script(argv):
    """Whether a normalised `python ...` argv runs a file (not `-m MODULE` or `-c CODE`)."""
    return argv is not None and not argv[1].startswith("-")


def script_and_arguments(argv):
    """(script path, its arguments, elided) of a normalised `python SCRIPT ...` argv, through
    any wrapper."""
    script, arguments = os.path.normpath(argv[1]), argv[2:]
    while script in WRAPPERS and arguments:
        script, arguments = os.path.normpath(arguments[0]), arguments[1:]
    elided = any(a in ELISIONS for a in arguments)
    return script, [a for a in arguments if a not in ELISIONS], elided


def parse(script, arguments):
    """(namespace, None) of the script's own parser on `arguments`, or (None, its error)."""
    stop = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise Parsed(stop(parser, args, namespace))

    output = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop), \
            mock.patch.object(sys, "argv", [script, *arguments]), \
            contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            script_module(script).main()
        except Parsed as parsed:
            return parsed.namespace, None
        except SystemExit as e:
            if e.code in (0, None):   # --help
                return None, None
            lines = [line for line in output.getvalue().splitlines() if line.strip()]
            return None, lines[-1] if lines else f"exit {e.code}"
    return None, "the script ran past its parser"


def pytest_problem(arguments):
    missing = [a for a in arguments if not a.startswith("-") and "::" not in a
               and re.match(r"^tests\b", a) and not os.path.exists(os.path.join(ROOT, a))]
    return f"no such test path: {', '.join(missing)}" if missing else None


def parse_problem(argv):
    """Why a normalised `python ...` argv does not parse; None if it does (or is not ours)."""
    if argv is None:
        return "not a shell line (an unclosed quote)"
    if argv[1:3] == ["-m", "pytest"]:
        return pytest_problem(argv[3:])
    if argv[1] == "-m" and argv[2] in OTHER_MODULES:
        return None
    if argv[1] == "-c":
        return None   # inline Python code, not a script
    if argv[1] == "-m":
        return f"python -m {argv[2]}: neither this repository's script nor in OTHER_MODULES"
    script, arguments, elided = script_and_arguments(argv)
    if not os.path.isfile(os.path.join(ROOT, script)) or not script.endswith(".py"):
        return f"{script}: no such script in the repository"
    _, error = parse(script, arguments)
    if error is None:
        return None
    if elided and "the following arguments are required" in error:
        return None
    value = re.search(r"invalid (?:choice|\w+ value): '([^']*)'", error)
    if value and PLACEHOLDER.fullmatch(value.group(1)) and value.group(1) in arguments:
        return None   # a placeholder for a choice or a number: `MODEL`, `--samples K`
    return error


# --------------------------------------------------------------------------- runs read and written

FACE_MODELS = {"f_vaes.py": "FVAE_RUNS", "glow.py": "GLOW_RUNS"}  # their face_runs.FaceModel


def run_folders(script, args):
    """(folders the command trains, folders it reads as a run) of a parsed command of the four
    scripts that train runs; defaults as the scripts resolve them."""
    command = getattr(args, "command", None)
    if script in ("f_vaes.py", "glow.py"):
        if command == "train":
            model = getattr(script_module(script), FACE_MODELS[script])
            return [args.out or f"runs/{model.name}{args.img_size}"], []
        return [], [args.out]
    if script == "infomax.py":
        if command in ("train", "ablation"):
            return [args.out], []
        if command == "index":
            return [args.index] if args.index else [], [args.out]
        if command == "search" and args.out is None:
            return [], [args.index if args.index else "runs/infomax"]
        return [], [args.out]
    if script == "compare.py":
        out = args.out or f"runs/compare-{args.preset}"
        return ([], [out]) if args.report else ([out], [])
    return [], []


def unknown_run(doc, folder, trained):
    """Why a run folder a command reads is not accounted for; None if it is."""
    if folder is None:
        return "reads a run but names no --out"
    folder = os.path.normpath(folder)
    if PLACEHOLDER.fullmatch(folder.split("/")[0]):
        return None
    if any(folder == t or folder.startswith(t + "/") for t in trained):
        return None   # the run, or one inside it (compare.py's fvae/, an index)
    if any(folder == f or folder.startswith(f + "/")
           for f in shipped_runs() | {f for d, f in WHERE_THE_TEXT_SAYS if d == doc}):
        return None
    return (f"reads {folder}, which no earlier command of its block trains"
            + (f" (they train {', '.join(trained)})" if trained else ""))


def out_problems(doc, found):
    """(line, as written, why) of each command of a group that reads a run it cannot have."""
    trained, problems = [], []
    for line, written, argv in found:
        if not is_script(argv):
            continue
        script, arguments, _ = script_and_arguments(argv)
        args, error = parse(script, arguments)
        if args is None or error:
            continue   # a command that does not parse fails the parsing test
        writes, reads = run_folders(script, args)
        problems += [(line, written, why) for folder in reads
                     for why in [unknown_run(doc, folder, trained)] if why]
        trained += [os.path.normpath(folder) for folder in writes]
    return problems


# --------------------------------------------------------------------------- the tests

@functools.cache
def groups_of(doc):
    return command_groups(read(doc))


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_parses_with_its_scripts_parser(doc):
    problems = [f"{doc}:{line}: {written}\n    -> {why}"
                for _, found in groups_of(doc) for line, written, argv in found
                for why in [parse_problem(argv)] if why]
    assert not problems, "commands their script does not accept:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS)
def test_a_command_on_a_run_reads_one_its_block_trains(doc):
    problems = [f"{doc}:{line}: {written}\n    -> {why}"
                for _, found in groups_of(doc) for line, written, why in out_problems(doc, found)]
    assert not problems, ("commands that read a run from nowhere (train it earlier in the "
                          "block, or say where it comes from):\n" + "\n".join(problems))


def test_the_docs_have_commands_to_check():
    counts = {doc: sum(len(found) for _, found in groups_of(doc)) for doc in DOCS}
    assert counts["README.md"] >= 20 and counts["docs/fvaes.md"] >= 10, counts


# --------------------------------------------------------------------------- the rules themselves

def test_commands_are_found_in_blocks_indented_code_and_inline_code():
    text = ("Intro `python f_vaes.py --img-size 64` and `python f_vaes.py\nevaluate --out COPY`"
            " and `python` and `python ...`.\n\n```bash\n$ python -m pytest -q tests\n"
            "nice -n 10 python3 glow.py --img-size 32 \\\n    --out runs/g  # a comment\n"
            "pip install x && OPENBLAS_NUM_THREADS=1 python infomax.py [--top 9] ...\n```\n\n"
            "```python\npython = 1\n```\n\n    for C in 12 48; do\n"
            "      python f_vaes.py --latent-channels $C --out runs/c$C\n    done\n\n"
            "(`(setsid nohup nice -n 10 python3 compare.py ... &)`)\n")
    groups = command_groups(text)
    assert [(where, [(line, argv) for line, _, argv in found]) for where, found in groups] == [
        ("block at line 4", [
            (5, ["python", "-m", "pytest", "-q", "tests"]),
            (6, ["python", "glow.py", "--img-size", "32", "--out", "runs/g"]),
            (8, ["python", "infomax.py", "--top", "9", "..."])]),
        ("block at line 15", [
            (16, ["python", "f_vaes.py", "--latent-channels", "12", "--out", "runs/c12"])]),
        ("paragraph at line 1", [
            (1, ["python", "f_vaes.py", "--img-size", "64"]),
            (1, ["python", "f_vaes.py", "evaluate", "--out", "COPY"])]),
        ("paragraph at line 19", [(19, ["python", "compare.py", "..."])])]


@pytest.mark.parametrize("command, error", [
    ("python f_vaes.py sample --out runs/fvae64 --temperatures 1.0", None),
    ("python f_vaes.py --img-size 64 --lr 1e-4", None),
    ("python f_vaes.py COMMAND --help", None),
    ("python glow.py sample --out RUN --sweep 0,1", "unrecognized arguments: --sweep"),
    ("python glow.py reconstruct --out runs/glow64", "unrecognized arguments: reconstruct"),
    ("python f_vaes.py --img-size 64 --learning-rate 1e-4", "unrecognized arguments"),
    ("python f_vaes.py sample --out RUN --weights last", "invalid choice: 'last'"),
    ("python infomax.py search --out RUN", "the following arguments are required: --query"),
    ("python infomax.py search ...", None),
    ("python compare.py --preset huge", "invalid choice: 'huge'"),
    ("python experiments/precision_fidelity.py MODEL --out RUN", None),
    ("python experiments/precision_fidelity.py fvae --out RUN", "invalid choice: 'fvae'"),
    ("python tests/fault_hooks.py f_vaes.py --epochs 2", None),
    ("python tests/fault_hooks.py f_vaes.py --epoch 2x", "invalid int value: '2x'"),
    ("python bench/bench.py --models fvae64 --stepz 5", "unrecognized arguments: --stepz"),
    ("python tools/prepare_faces.py", "the following arguments are required: source, target"),
    ("python nowhere.py --x", "nowhere.py: no such script in the repository"),
    ("python -m pytest -q tests tests/test_nothing.py", "no such test path"),
    ("python -m pip install -r requirements.txt", None),
])
def test_a_wrong_command_is_named_with_the_parsers_reason(command, error):
    problem = parse_problem(normalised(shlex.split(command)))
    if error is None:
        assert problem is None, problem
    else:
        assert problem is not None and error in problem, problem


@pytest.mark.parametrize("block, reads_from_nowhere", [
    ("python f_vaes.py --img-size 32 --out runs/quick\n"
     "python f_vaes.py sample --out runs/quick", []),
    ("python f_vaes.py --img-size 64\npython f_vaes.py sample --out runs/fvae64", []),
    ("python glow.py\npython glow.py sweep --out runs/glow64", []),
    ("python f_vaes.py --img-size 64\npython f_vaes.py sample --out runs/fvae32", [2]),
    ("python f_vaes.py sample --out runs/quick\n"
     "python f_vaes.py --img-size 32 --out runs/quick", [1]),
    ("python f_vaes.py sample", [1]),
    ("python f_vaes.py evaluate --out COPY --weights latest", []),
    ("python infomax.py --dataset cifar10\npython infomax.py evaluate --out runs/dim-cifar10", [2]),
    ("python infomax.py --dataset cifar10\npython infomax.py evaluate", []),
    ("python infomax.py index --out pretrained/dim-cifar10 --folder DIR --index runs/i\n"
     "python infomax.py search --index runs/i --query FILE", []),
    ("python infomax.py search --index runs/i --query FILE", [1]),
    ("python compare.py --preset long\npython compare.py --preset long --report", []),
    ("python compare.py --preset long\npython compare.py --preset reduced --report", [2]),
    ("python compare.py --preset tiny --out runs/c\npython f_vaes.py evaluate --out runs/c/fvae",
     []),
])
def test_a_run_is_read_only_after_its_block_trains_it(block, reads_from_nowhere):
    found = python_commands(block.split("\n"), 1)
    assert [line for line, _, _ in out_problems("docs/x.md", found)] == reads_from_nowhere


def test_every_folder_the_text_accounts_for_is_still_read_there():
    read_there = {(doc, os.path.normpath(folder))
                  for doc in DOCS for _, found in groups_of(doc) for _, _, argv in found
                  if is_script(argv)
                  for script, arguments, _ in [script_and_arguments(argv)]
                  for args, error in [parse(script, arguments)] if args is not None
                  for folder in run_folders(script, args)[1] if folder}
    assert set(WHERE_THE_TEXT_SAYS) <= read_there, set(WHERE_THE_TEXT_SAYS) - read_there

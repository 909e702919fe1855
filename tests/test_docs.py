"""The docs check: README.md and docs/**/*.md say only what the code does.

- every command in a ```bash block parses: `seqrec ...` with the real CLI parser, `--config` / `--grid` names
  resolve to shipped presets / grids, `make X` targets exist, `python benchmarks/X.py sub` scripts exist and
  accept the subcommand, `python jobs/X.py ...` (also behind `ray job submit ... --`) parse as the CLI command
  the job runs; placeholders (<run>, $PORT, ...) only from PLACEHOLDERS;
- repository paths named in the docs exist, internal links (and their anchors) resolve;
- every rendered results block equals what benchmarks/render_results.py renders from the registry;
- the README's tour (the ```bash block after `<!-- tour -->`) runs as written, in a temp directory, with bash:
  demo data, training, evaluation, `seqrec serve run ... &`, curl, and the server stopped by its PID.

Time: ~2 s for the static checks, ~2-3 minutes for the tour on 2 cores.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, load_benchmark
from seqrec.ray_utils import free_ports, process_group_alive

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
# the only placeholders a documented command may contain, and what stands in for them when it is parsed
PLACEHOLDERS = {
    "<run>": "runs/train/run", "<checkpoint>": "runs/train/run/checkpoint_00000100",
    "<flare checkpoint>": "runs/train/flare/checkpoint_00000100", "<record>": "runs/train/run/summary.json",
    "$PORT": "8000",
}
# work that colleagues are landing: a documented line that needs it is reported (skipped) until it exists,
# then checked like every other line. The lead removes an entry once the feature is in.
PENDING_SUBCOMMANDS: dict[str, str] = {}  # subcommands documented before they land (none now)
PENDING_OPTIONS: dict[tuple[str, str], str] = {}
PENDING_DOCS: dict[str, str] = {}
REPO_PATH = re.compile(r"^(?:platform|benchmarks|jobs|tests|docs|\.ci)/[\w./+-]*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


# ------------------------------------------------------------------------------------------- parsing docs
def bash_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(first line number, text, marked as the tour) of every ```bash block in a Markdown file."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            tour = i > 0 and lines[i - 1].strip() == "<!-- tour -->"
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            blocks.append((i + 2, "\n".join(lines[i + 1:j]) + "\n", tour))
            i = j
        i += 1
    return blocks


def logical_lines(block: str) -> list[str]:
    """Lines with backslash continuations joined."""
    out, current = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            out.append(current + line)
            current = ""
    if current:
        out.append(current)
    return [line for line in out if line.strip()]


def substitute(line: str) -> str:
    for key, value in PLACEHOLDERS.items():
        line = line.replace(key, value)
    return line


def command_argv(line: str) -> list[str]:
    """The line's tokens without leading VAR=value assignments, a trailing `&` or the comment."""
    tokens = shlex.split(substitute(line), comments=True)
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if tokens and tokens[-1] == "&":
        tokens = tokens[:-1]
    return tokens


def all_commands() -> list[tuple[str, str]]:
    """(where, line) of every logical line of every bash block."""
    out = []
    for path in DOCS:
        for lineno, block, _ in bash_blocks(path):
            for line in logical_lines(block):
                out.append((f"{path.relative_to(REPO_ROOT)}:{lineno}", line))
    return out


# ------------------------------------------------------------------------------------------- the checkers
def subparsers_of(parser) -> dict:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def seqrec_problem(argv: list[str], parser, pending: list[str]) -> str | None:
    """Why `seqrec argv...` is wrong (None when it parses and its names resolve)."""
    import contextlib
    import io

    from seqrec.config import resolve_config_path

    commands = subparsers_of(parser)
    if argv and argv[0] in PENDING_SUBCOMMANDS and argv[0] not in commands:
        pending.append(PENDING_SUBCOMMANDS[argv[0]])
        return None
    if argv and argv[0] in commands:
        options = commands[argv[0]]._option_string_actions
        for (command, option), what in PENDING_OPTIONS.items():
            if argv[0] == command and option in argv and option not in options:
                pending.append(what)
                return None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit:
        return f"does not parse: {err.getvalue().strip().splitlines()[-1] if err.getvalue() else argv}"
    try:
        if args.command == "train":
            resolve_config_path(args.config, "train")
        if args.command == "tune":
            resolve_config_path(args.grid, "grids")
    except FileNotFoundError as e:
        return str(e).split(";")[0]
    return None


def script_subcommands(script: Path) -> set[str]:
    """Subcommand names a script's argparse accepts: add_parser("x") literals, or the choices of its first
    positional argument (e.g. bench_train.py's mode)."""
    names: set[str] = set()
    positional: set[str] | None = None
    for node in ast.walk(ast.parse(script.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        first = node.args[0] if node.args else None
        if node.func.attr == "add_parser" and isinstance(first, ast.Constant):
            names.add(first.value)
        if (node.func.attr == "add_argument" and positional is None and isinstance(first, ast.Constant)
                and isinstance(first.value, str) and not first.value.startswith("-")):
            choices = next((k.value for k in node.keywords if k.arg == "choices"), None)
            positional = set()  # a free positional (e.g. checkpoint paths) accepts anything
            if isinstance(choices, (ast.List, ast.Tuple)):
                positional = {c.value for c in choices.elts if isinstance(c, ast.Constant)}
    return names | (positional or set())


def job_prefix(job: Path) -> list[str]:
    """The `seqrec` argv a jobs/*.py entrypoint puts before its own arguments."""
    text = job.read_text()
    literal = re.search(r"main\(\[([^\]]*?)\*sys\.argv", text)
    if literal:
        return [ast.literal_eval(t.strip()) for t in literal.group(1).split(",") if t.strip()]
    module = re.search(r"from seqrec\.(\w+)\.cli import main", text)
    if module:
        return [module.group(1)]
    raise AssertionError(f"{job}: cannot tell which seqrec command it runs")


def makefile_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, re.MULTILINE))


def python_problem(argv: list[str], parser, pending: list[str]) -> str | None:
    if len(argv) < 2 or not argv[1].endswith(".py"):
        return None
    script = REPO_ROOT / argv[1]
    if not script.exists():
        return f"{argv[1]} does not exist"
    rest = argv[2:]
    if argv[1].startswith("jobs/"):
        return seqrec_problem(job_prefix(script) + rest, parser, pending)
    subs = script_subcommands(script)
    positional = next((t for t in rest if not t.startswith("-")), None)
    if subs and positional not in subs:
        return f"{argv[1]} accepts {sorted(subs)}, not {positional!r}"
    if "--config" in rest:
        from seqrec.config import resolve_config_path

        try:
            resolve_config_path(rest[rest.index("--config") + 1], "train")
        except FileNotFoundError as e:
            return str(e).split(";")[0]
    return None


def command_problem(argv: list[str], parser, pending: list[str]) -> str | None:
    if not argv:
        return None
    if argv[0] == "seqrec":
        return seqrec_problem(argv[1:], parser, pending)
    if argv[0] == "make":
        missing = [t for t in argv[1:] if not t.startswith("-") and "=" not in t and t not in makefile_targets()]
        return f"no Makefile target {missing}" if missing else None
    if argv[0] in ("python", "python3"):
        return python_problem(argv, parser, pending)
    if argv[:3] == ["ray", "job", "submit"]:
        if "--" not in argv:
            return "ray job submit without `-- <entrypoint>`"
        return command_problem(argv[argv.index("--") + 1:], parser, pending)
    return None


# ------------------------------------------------------------------------------------------------ tests
def test_documented_commands_parse():
    from seqrec.cli import build_parser

    parser = build_parser()
    problems, pending, checked = [], [], 0
    for where, line in all_commands():
        leftover = re.findall(r"<[a-z][\w -]*>", substitute(line))
        if leftover:
            problems.append(f"{where}: undocumented placeholder {leftover} in {line.strip()!r}")
            continue
        argv = command_argv(line)
        problem = command_problem(argv, parser, pending)
        checked += bool(argv) and argv[0] in ("seqrec", "make", "python", "python3", "ray")
        if problem:
            problems.append(f"{where}: {line.strip()!r}: {problem}")
    assert checked > 50, f"only {checked} commands found: is the block parsing broken?"
    assert not problems, "stale commands in the docs:\n" + "\n".join(problems)


def test_pending_features():
    """Nothing documented is still pending: every PENDING_* entry has landed."""
    from seqrec.cli import build_parser

    parser = build_parser()
    pending: list[str] = []
    for _, line in all_commands():
        command_problem(command_argv(line), parser, pending)
    missing_docs = [what for doc, what in PENDING_DOCS.items() if not (REPO_ROOT / doc).exists()]
    assert not pending and not missing_docs, "documented but missing: " + ", ".join(sorted(set(pending)) + missing_docs)


def github_anchor(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    return {github_anchor(h) for h in re.findall(r"^#{1,6}\s+(.+)$", text, re.MULTILINE)}


def test_internal_links_resolve():
    problems = []
    for path in DOCS:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto: not ours to check offline
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            rel = os.path.relpath(dest, REPO_ROOT)
            if not dest.exists():
                if rel not in PENDING_DOCS:
                    problems.append(f"{path.relative_to(REPO_ROOT)}: link {target!r} -> {rel} does not exist")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{path.relative_to(REPO_ROOT)}: no heading #{anchor} in {rel}")
    assert not problems, "\n".join(problems)


def test_named_repository_paths_exist():
    """Paths like `benchmarks/bench_flare.py` or `platform/seqrec/models/flare.py` in code spans and commands."""
    import glob

    problems = []
    for path in DOCS:
        text = path.read_text()
        candidates = CODE_SPAN.findall(text) + [t for _, block, _ in bash_blocks(path) for t in block.split()]
        for token in candidates:
            token = token.strip("'\",;()")
            if token.startswith("seqrec/"):
                token = "platform/" + token
            if not REPO_PATH.match(token) or "<" in token or "{" in token:
                continue
            if "*" in token:
                if not glob.glob(str(REPO_ROOT / token)):
                    problems.append(f"{path.relative_to(REPO_ROOT)}: `{token}` matches nothing")
            elif not (REPO_ROOT / token).exists() and token not in PENDING_DOCS:
                problems.append(f"{path.relative_to(REPO_ROOT)}: `{token}` does not exist")
    assert not problems, "\n".join(sorted(set(problems)))


def test_rendered_results_match_the_registry():
    render = load_benchmark("render_results")
    assert render.render_all(check=True) == 0, "run: python benchmarks/render_results.py"


def test_readme_is_short_and_links_the_index():
    text = (REPO_ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 300
    assert "docs/index.md" in text and "docs/fit.md" in text


def test_render_check_names_a_hand_edited_table(tmp_path):
    """A number changed by hand inside a rendered block fails --check with the table named; rendering twice
    is byte-identical."""
    render = load_benchmark("render_results")
    tables, records = render.load_tables(), render.load_records()
    doc = "# t\n<!-- results:reference_scientific -->\n<!-- /results:reference_scientific -->\n"
    rendered, changed = render.render_text(doc, tables, records)
    assert changed == ["reference_scientific"] and "| `markov` |" in rendered
    again, changed_again = render.render_text(rendered, tables, records)
    assert again == rendered and changed_again == []
    edited = rendered.replace("0.0561", "0.0600", 1)
    assert edited != rendered
    assert render.render_text(edited, tables, records)[1] == ["reference_scientific"]
    (tmp_path / "README.md").write_text(edited)
    assert render.render_all(check=True, root=tmp_path) == 1
    with pytest.raises(ValueError, match="not closed"):
        render.render_text("<!-- results:reference_scientific -->\n", tables, records)


def test_registry_records_and_append(tmp_path):
    registry = load_benchmark("results_registry")
    records = registry.load_records()
    assert len(records) > 40 and all(r["kind"] in registry.KINDS for r in records.values())
    bert = records["model_bert4rec_scientific"]
    seeds = registry.metric_repeats(bert, "ndcg@10/pes")
    assert len(seeds) == 3 and abs(registry.metric_mean(bert, "ndcg@10/pes") - sum(seeds) / 3) < 1e-6
    path = tmp_path / "registry.jsonl"
    record = registry.append_record(path, id="bench_x", kind="bench", title="x", metrics={"s": 1.5},
                                    note="a test record")
    assert record["commit"] and record["date"] and registry.load_records(path)["bench_x"]["metrics"] == {"s": 1.5}
    with pytest.raises(ValueError, match="already exists"):
        registry.append_record(path, id="bench_x", kind="bench", title="x", metrics={"s": 2}, note="again")
    with pytest.raises(ValueError, match="kind"):
        registry.make_record(id="y", kind="nonsense", title="y", metrics={"s": 1}, note="n")
    with pytest.raises(ValueError, match="per_seed"):
        registry.make_record(id="y", kind="model", title="y", metrics={"s": {"mean": 1}}, note="n")


# --------------------------------------------------------------------------------------------- the tour
def tour_block() -> str:
    tours = [block for _, block, tour in bash_blocks(REPO_ROOT / "README.md") if tour]
    assert len(tours) == 1, f"expected one ```bash block after <!-- tour --> in README.md, found {len(tours)}"
    return tours[0]


@pytest.mark.slow
def test_readme_tour_runs(tmp_path):
    """The tour's exact lines, with bash -e in a fresh directory: every step must succeed, the served answer must
    hold items, and after its `kill` the server (and everything it started in our process group) must exit."""
    script = tmp_path / "tour.sh"
    script.write_text(tour_block())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local Ray instance
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PORT=str(free_ports()[0]),
               RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log_path = tmp_path / "tour.log"  # a file, not a pipe: nothing waits on a pipe a straggler holds open
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", str(script)], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=420)
        out = log_path.read_text(errors="replace")
        assert proc.returncode == 0, f"the tour failed (exit {proc.returncode}):\n{out[-6000:]}"
        assert '"items"' in out and '"item_idx"' in out, f"no recommendation in the output:\n{out[-4000:]}"
        assert "ndcg@10/pes" in out and "markov" in out, "the evaluation table is missing"
        deadline = time.monotonic() + 90  # SIGTERM: serve.shutdown() and the local Ray instance's shutdown
        while process_group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(1)
        assert not process_group_alive(proc.pid), "the server (or a process it started) outlived its SIGTERM"
    finally:
        if proc.poll() is None or process_group_alive(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the tour's own process group, by its leader's PID
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)

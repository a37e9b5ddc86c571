"""The docs cannot rot: every command of ours that README.md and docs/ show is checked in a form
that needs no cluster, and every config key they name is checked against the schema.

Cheap by design: the shell launchers' ``--help`` and one ``--dry-run`` each run for real (bash,
plus the config check they start); the Python CLIs' ``--help`` and every config check run in
this process (``pipeline.config.load_config`` / ``data_prep.config.load_config``, what
``launch/validate.py`` runs), so Python and torch start once.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "data_prep" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEMO = "configs/experiment/demo.yaml"
SCRIPTS = (
    "launch/pretrain.sh",
    "launch/train_dist.sh",
    "launch/mlflow_server.sh",
    "launch/setup.sh",
    "launch/slurm/pretrain.sbatch",
    "launch/validate.py",
)
MODULES = (
    "pipeline.run",
    "pipeline.train",
    "pipeline.plan",
    "pipeline.evaluate",
    "pipeline.checkpoint",
    "pipeline.rundir",
    "pipeline.guard",
    "pipeline.stop",
    "data_prep",
)
# Commands whose config composes onto pipeline.config.Config; data_prep's onto PrepConfig.
PIPELINE_CONFIGS = (
    "launch/pretrain.sh",
    "launch/train_dist.sh",
    "launch/slurm/pretrain.sbatch",
    "launch/validate.py",
    "pipeline.run",
    "pipeline.train",
    "pipeline.plan",
)
# pipeline.run and pipeline.train parse no options but these (their main() strips them);
# pipeline.stop takes none.
PLAIN_OPTIONS = {"pipeline.run": {"--quiet"}, "pipeline.train": {"--local_rank"}, "pipeline.stop": set()}
# Dotted names in the docs that are not config keys: an MLflow tag, a Ray API.
NOT_KEYS = {"eval.variant", "ray.train.report", "deepspeed.utils.set_z3_leaf_modules"}
FILE_SUFFIXES = {
    "py",
    "yaml",
    "yml",
    "json",
    "jsonl",
    "md",
    "txt",
    "pt",
    "tar",
    "safetensors",
    "npz",
    "png",
    "db",
    "sh",
    "sbatch",
    "out",
    "mlflow",
    "gz",
}
PLACEHOLDER = "PLACEHOLDER"
TIMEOUT_S = 120


@dataclass
class Command:
    """One of our commands as a doc shows it: where, the program, its arguments."""

    where: str
    text: str
    program: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    shown: str = ""  # the output a transcript shows under it

    def fail(self, why: str) -> str:
        return f"{self.where}: `{self.text}`: {why}"


# --- reading the docs -------------------------------------------------------------------


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(first line number, language, lines) of every fenced code block."""
    blocks, lang, start, lines = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, lines = line[3:].strip(), n + 1, []
            else:
                blocks.append((start, lang, lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def prose_spans(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every inline code span outside fenced blocks."""
    spans, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            spans += [(n, m) for m in re.findall(r"`([^`\n]+)`", line)]
    return spans


def block_commands(lines: list[str], start: int) -> list[tuple[int, str, str]]:
    """(line number, shell line, the output shown under it) of a block: the `$ ` lines of a
    transcript, else every line; continuations joined."""
    prompt = any(line.startswith("$ ") for line in lines)
    out, pending = [], None
    for n, line in enumerate(lines, start):
        if pending is None:
            if prompt and not line.startswith("$ "):
                if out:
                    out[-1] = (out[-1][0], out[-1][1], out[-1][2] + line + "\n")
                continue
            pending = (n, line[2:] if prompt else line)
        else:
            pending = (pending[0], pending[1] + " " + line.strip())
        if pending[1].rstrip().endswith("\\"):
            pending = (pending[0], pending[1].rstrip()[:-1])
            continue
        out.append((*pending, ""))
        pending = None
    return out


def unplaceholder(text: str) -> str:
    """`<exp>`, `<run dir>`, ... -> PLACEHOLDER (before the shell's `<`/`>` can split them)."""
    return re.sub(r"<[A-Za-z][^<>\n]*?>", PLACEHOLDER, text)


def simple_commands(line: str) -> list[list[str]]:
    """The words of each simple command in a shell line (split at && || ; | and parentheses)."""
    lex = shlex.shlex(unplaceholder(line), posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        words = list(lex)
    except ValueError:
        return []
    commands, current, skip = [], [], False
    for w in words:
        if skip:
            skip = False
        elif set(w) <= set("&|;()"):
            commands.append(current)
            current = []
        elif (set(w) <= set("<>&0123456789") and ">" in w) or w == "<":
            skip = not w.endswith("&1")  # a redirection's target
        else:
            current.append(w)
    return [c for c in commands + [current] if c]


def ours(words: list[str], where: str, text: str) -> Command | None:
    """Our program and its arguments inside a simple command (behind env, srun, torchrun, ...)."""
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    for i, w in enumerate(words):
        if w.lstrip("./") in SCRIPTS or w in SCRIPTS:
            return Command(where, text, w.lstrip("./") if w.startswith("./") else w, words[i + 1 :], env)
        if w in ("-m", "--module") and i + 1 < len(words) and words[i + 1] in MODULES:
            return Command(where, text, words[i + 1], words[i + 2 :], env)
    return None


@functools.cache
def doc_commands() -> tuple[Command, ...]:
    found = []
    for path in DOCS:
        text = path.read_text()
        candidates = [(n, s, "") for n, s in prose_spans(text)]
        for start, lang, lines in fenced_blocks(text):
            if lang in ("", "bash", "sh", "console", "shell"):
                candidates += block_commands(lines, start)
        for n, line, shown in candidates:
            for words in simple_commands(line):
                if (cmd := ours(words, f"{_rel(path)}:{n}", line.strip())) is not None:
                    cmd.shown = shown
                    found.append(cmd)
    return tuple(found)


def split_args(cmd: Command) -> tuple[list[str], list[str], list[str]]:
    """(options, positionals, key=value overrides) of a command, `[...]` and `...` dropped."""
    options, positionals, overrides = [], [], []
    for a in cmd.args:
        a = a.strip("[]")
        if a in ("", "...", "key=value") or a.startswith("key=value"):
            continue
        if a.startswith("-") and " " not in a and not re.fullmatch(r"-\d+", a):
            options.append(a.split("=", 1)[0])
        elif re.fullmatch(r"[a-z_][a-z0-9_.]*=.*", a):
            overrides.append(a)
        elif " " not in a:
            positionals.append(a)
    return options, positionals, overrides


# --- what our CLIs accept ---------------------------------------------------------------


def options_in(help_text: str) -> set[str]:
    """Options a help text offers: in its usage brackets, or starting an option line."""
    pattern = r"(?:^[ #]{0,5}(?:-\w, )?|\[|\| |setup\.sh +)(--?[A-Za-z][\w-]*)"
    return set(re.findall(pattern, help_text, flags=re.MULTILINE)) | {"-h", "--help"}


@functools.cache
def script_help(script: str) -> str:
    """`<script> --help`, run for real."""
    if script == "launch/slurm/pretrain.sbatch":  # its arguments are pretrain.sh's
        script = "launch/pretrain.sh"
    if script == "launch/validate.py":
        return "[--print KEY]"  # its docstring's usage
    r = subprocess.run(
        ["bash", str(ROOT / script), "--help"], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT
    )
    assert r.returncode == 0, f"{script} --help exited {r.returncode}: {r.stderr}"
    return r.stdout


def _is_package(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module).submodule_search_locations is not None


def module_help(module: str, sub: str | None = None) -> str:
    """A Python CLI's help (or usage, for those without --help), from its main() in this process."""
    import importlib

    main = importlib.import_module(f"{module}.__main__" if _is_package(module) else module).main
    argv = (
        [sub, "--help"]
        if sub
        else (["--help"] if module in ("pipeline.plan", "pipeline.evaluate", "data_prep") else [])
    )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        main(argv)
    return out.getvalue() + err.getvalue()


@functools.cache
def subcommands(module: str) -> set[str]:
    text = module_help(module)
    if module == "pipeline.evaluate":
        return set(re.search(r"\{([\w,]+)\}", text).group(1).split(","))
    return set(re.findall(r"^\s{2}([a-z][\w-]+) ", text, flags=re.MULTILINE)) | set(
        re.findall(r"python -m [\w.]+ ([a-z][\w-]+) <", text)
    )


@functools.cache
def allowed_options(program: str, sub: str | None) -> frozenset[str]:
    if program in SCRIPTS:
        return frozenset(options_in(script_help(program)))
    if program in PLAIN_OPTIONS:
        return frozenset(PLAIN_OPTIONS[program])
    return frozenset(options_in(module_help(program, sub if program == "pipeline.evaluate" else None)))


# --- the config schemas -----------------------------------------------------------------

_ABSENT = object()


@functools.cache
def pipeline_config(path: str = DEMO):
    from pipeline.config import load_config

    return load_config(str(ROOT / path), [])


@functools.cache
def schemas() -> dict[str, object]:
    """Top-level key -> a default config of the schema that has it (pipeline's first)."""
    from data_prep.config import PrepConfig
    from pipeline.config import Config

    prep, pipe = OmegaConf.structured(PrepConfig), pipeline_config()
    tops = {k: prep for k in prep.keys()}
    tops.update({k: pipe for k in OmegaConf.structured(Config).keys()})
    return tops


def key_problem(key: str, node=None) -> str | None:
    """Why `key` is not a config key (None when it is, or when it names no config at all)."""
    key = key.split(PLACEHOLDER)[0].rstrip(".*")
    parts = key.split(".")
    if not key or key in NOT_KEYS or (len(parts) > 1 and parts[-1] in FILE_SUFFIXES):
        return None
    node = node if node is not None else schemas().get(parts[0])
    if node is None:
        return None
    return None if has_key(node, parts) else f"{key}: no such config key"


def has_key(node, parts: list[str]) -> bool:
    """Whether the schema (a composed or default config) has this key; below an unset value
    (None, ``???``) nothing more can be known, so it counts as there."""
    for part in parts:
        if OmegaConf.is_dict(node) and OmegaConf.get_type(node) in (dict, None):
            return True  # a free-form mapping (deepspeed.extra, dedup.against): any key
        if OmegaConf.is_list(node) and len(node) == 0:
            return True  # an empty list of the default config: its entries' keys are not known here
        if OmegaConf.is_dict(node):
            if part not in node.keys():
                return False
            child = node._get_node(part)
        elif OmegaConf.is_list(node):
            if not part.isdigit() or int(part) >= len(node):
                return False
            child = node._get_node(int(part))
        else:
            return False  # a plain value has no sub-keys
        if child._is_missing() or child._is_none():
            return True
        node = child
    return True


def config_problem(cmd: Command, positionals: list[str], overrides: list[str]) -> str | None:
    """The config check with the shown overrides, in this process."""
    from data_prep.compose import ConfigError

    yamls = [p for p in positionals if p.endswith(".yaml")]
    for y in yamls:
        if PLACEHOLDER not in y and not (ROOT / y).is_file():
            return f"{y}: no such config file"
    concrete = [o for o in overrides if PLACEHOLDER not in o]
    config = next((y for y in yamls if PLACEHOLDER not in y), None)
    try:
        if cmd.program == "data_prep":
            from data_prep.config import PrepConfig
            from data_prep.config import load_config as load_prep

            load_prep(str(ROOT / config) if config else None, concrete)
            node = OmegaConf.structured(PrepConfig)
        elif cmd.program in PIPELINE_CONFIGS:
            from pipeline.config import load_config

            node = load_config(str(ROOT / (config or DEMO)), concrete)
        else:  # evaluate: composed onto a run's saved config later; the keys must exist
            node = pipeline_config()
    except ConfigError as e:
        if f"config error: {e}" in cmd.shown:
            return None  # the doc shows this very error
        return f"config error: {e}"
    if "config error:" in cmd.shown:
        return f"the doc shows an error ({cmd.shown.strip()}) that the config check does not give"
    for o in overrides:
        if (why := key_problem(o.split("=", 1)[0], node)) is not None:
            return why
    return None


# --- the tests --------------------------------------------------------------------------


def test_the_docs_show_our_commands():
    programs = {c.program for c in doc_commands()}
    for program in ("launch/pretrain.sh", "launch/train_dist.sh", "pipeline.run", "pipeline.evaluate", "data_prep"):
        assert program in programs, f"no `{program}` command found in the docs: is the extraction broken?"


def test_every_command_in_the_docs_has_the_options_subcommands_and_config_keys_it_shows():
    problems = []
    for cmd in doc_commands():
        if not cmd.args:
            continue  # the program named in prose, not a command
        options, positionals, overrides = split_args(cmd)
        sub = None
        if cmd.program in ("pipeline.evaluate", "pipeline.rundir", "pipeline.checkpoint", "pipeline.guard") and (
            positionals or not {"-h", "--help"} & set(options)
        ):
            sub = positionals[0] if positionals else None
            if sub not in subcommands(cmd.program):
                problems.append(
                    cmd.fail(
                        f"{cmd.program} has no subcommand {sub!r} "
                        f"(it has: {', '.join(sorted(subcommands(cmd.program)))})"
                    )
                )
                continue
        allowed = allowed_options(cmd.program, sub)
        if cmd.program == "launch/mlflow_server.sh" and "--" in cmd.args:
            options = split_args(Command(cmd.where, cmd.text, cmd.program, cmd.args[: cmd.args.index("--")]))[0]
        for o in options:
            if o not in allowed and o != "--":
                problems.append(
                    cmd.fail(f"{cmd.program} has no option {o} (its help offers: {', '.join(sorted(allowed))})")
                )
        if (why := config_problem(cmd, positionals, overrides)) is not None:
            problems.append(cmd.fail(why))
    assert not problems, "\n".join(problems)


def test_every_config_key_named_in_the_docs_exists():
    problems = []
    for path in DOCS:
        for n, span in prose_spans(path.read_text()):
            span = unplaceholder(span)
            if ours(span.split(), "", span) is not None:
                continue  # a command: checked above
            for word in span.split():
                if not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z0-9_*]+|\.PLACEHOLDER)*(=.*)?", word):
                    continue
                if "." not in word.split("=")[0] and "=" not in word:
                    continue  # a bare word, not a key
                if (why := key_problem(word.split("=", 1)[0])) is not None:
                    problems.append(f"{_rel(path)}:{n}: `{span}`: {why}")
    assert not problems, "\n".join(problems)


def test_troubleshooting_lists_every_exit_status():
    """Each of pipeline.stop.Exit is a row of docs/troubleshooting.md: its number and its name."""
    from pipeline.stop import Exit

    rows = re.findall(
        r"^\| *(\d+) *\| *`(\w+)` *\|", (ROOT / "docs" / "troubleshooting.md").read_text(), flags=re.MULTILINE
    )
    listed, named = {(int(n), name) for n, name in rows}, {(e.value, e.name) for e in Exit}
    assert listed == named, (
        f"docs/troubleshooting.md: exit statuses missing {sorted(named - listed)}, "
        f"not in pipeline.stop.Exit {sorted(listed - named)}"
    )


def _leaf_keys(data, prefix: str = "") -> list[str]:
    """Dotted keys of a YAML mapping, down to the first list or scalar."""
    if not isinstance(data, dict):
        return [prefix]
    return [k for key, v in data.items() for k in _leaf_keys(v, f"{prefix}{key}.")] if data else [prefix]


def test_every_yaml_block_in_the_docs_fits_the_schema():
    import yaml

    problems = []
    for path in DOCS:
        for start, lang, lines in fenced_blocks(path.read_text()):
            if lang not in ("yaml", "yml"):
                continue
            for key in _leaf_keys(yaml.safe_load("\n".join(lines))):
                if (why := key_problem(key.rstrip("."))) is not None:
                    problems.append(f"{_rel(path)}:{start}: yaml block: {why}")
    assert not problems, "\n".join(problems)


def _expand(path: str) -> list[str]:
    """Brace expansion, as the shell does it: `vit_{b16,l16}.yaml` -> both names."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _expand(path[: m.start()] + alt + path[m.end() :])]


def test_every_repository_file_the_docs_name_exists():
    problems = []
    for path in DOCS:
        for n, span in prose_spans(path.read_text()):
            if not re.fullmatch(r"(data_prep|pipeline|launch|configs|bench|tests|docs)/[\w./{},-]+", span):
                continue
            for name in _expand(span.split("::")[0]):
                if not (ROOT / name).exists():
                    problems.append(f"{_rel(path)}:{n}: `{span}`: {name} does not exist")
    assert not problems, "\n".join(problems)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_in_the_docs_reaches_a_file_and_heading():
    problems = []
    for path in DOCS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+://", target):
                    continue
                file, _, anchor = target.partition("#")
                dest = (path.parent / file).resolve() if file else path
                if not dest.exists():
                    problems.append(f"{_rel(path)}:{n}: {target}: no such file")
                elif anchor and dest.suffix == ".md":
                    slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.MULTILINE)}
                    if anchor not in slugs:
                        problems.append(f"{_rel(path)}:{n}: {target}: no heading #{anchor} in {_rel(dest)}")
    assert not problems, "\n".join(problems)


def test_the_readme_config_error_is_what_the_job_prints():
    """The README's example error: run in-process, the same line (and exit 2)."""
    from pipeline.run import main

    shown = re.search(
        r"^\$ python -m pipeline\.run (.+?)\s+#.*\n(config error: .+)$",
        (ROOT / "README.md").read_text(),
        flags=re.MULTILINE,
    )
    assert shown, "README.md: the config-error example is gone"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(shlex.split(shown.group(1)))
    assert code == 2 and shown.group(2) in err.getvalue(), err.getvalue()


def _run_shown(cmd: Command, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = [a for a in cmd.args if PLACEHOLDER not in a]
    env = {**os.environ, **cmd.env}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.run(
        ["bash", str(ROOT / cmd.program), *args, *extra],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
        env=env,
    )


def test_the_launchers_dry_runs_and_plans_shown_in_the_docs_run():
    """Each launcher's dry run once for real (SLURM's as the docs show it), and every plan the
    docs show, in this process (what `launch/pretrain.sh --plan` execs)."""
    from pipeline.plan import main as plan

    cmds = doc_commands()
    slurm = [c for c in cmds if c.program == "launch/pretrain.sh" and "--dry-run" in c.args and "--slurm" in c.args]
    assert slurm, "the docs show no `launch/pretrain.sh --slurm --dry-run` command"
    r = _run_shown(slurm[0])
    assert r.returncode == 0 and " sbatch " in r.stdout, slurm[0].fail(r.stdout + r.stderr)
    dist = next(c for c in cmds if c.program == "launch/train_dist.sh")
    r = _run_shown(dist, ("--dry-run",))
    assert r.returncode == 0 and "pipeline.train" in r.stdout, dist.fail(r.stdout + r.stderr)
    mlflow = next(c for c in cmds if c.program == "launch/mlflow_server.sh")
    r = _run_shown(mlflow, ("--dry-run",))
    assert r.returncode == 0 and "MLFLOW_TRACKING_URI" in r.stdout, mlflow.fail(r.stdout + r.stderr)
    plans = [c for c in cmds if c.program == "pipeline.plan" or "--plan" in c.args]
    assert plans, "the docs show no plan"
    for c in plans:
        options, positionals, overrides = split_args(c)
        sbatch = c.args[c.args.index("--sbatch-args") + 1] if "--sbatch-args" in c.args else ""
        argv = positionals + overrides + [f"--sbatch-args={sbatch}"] + (["--json"] if "--json" in options else [])
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
            code = plan(argv)
        assert code == 0, c.fail(f"exit {code}: {err.getvalue()}")
        if "--json" in options:
            json.loads(out.getvalue())
        else:
            assert "memory per " in out.getvalue(), c.fail(out.getvalue())


@pytest.mark.parametrize("page", ["README.md", *sorted(_rel(p) for p in (ROOT / "docs").glob("*.md"))])
def test_no_dated_measurement_in_the_prose(page):
    """Dated figures live in bench/RESULTS.md next to their command, not in the docs."""
    text = re.sub(r"\]\([^)]*\)", "]", (ROOT / page).read_text())  # a link's anchor may carry a date
    dates = re.findall(r"\b20\d\d-\d\d-\d\d\b", text)
    assert not dates, f"{page}: dated prose {dates}: move the measurement to bench/RESULTS.md and link it"

"""MkDocs hook: the CLI reference pages, generated from ``conf/`` and ``medsynth.cli`` at every build.

Nothing here is a copy that can go stale. The commands come from ``medsynth.cli`` (its usage text,
its stage list and the dispatch that hands each stage its settings); each config group's options
are composed with Hydra from ``conf/`` as the command line composes them; the meaning of each key
is the comment beside it in its YAML file; what a key accepts comes from the settings dataclasses
that check it (``medsynth.config.settings``). A new group, option, key or preset shows up in the
next build; a key without a comment in ``conf/`` shows up with an empty description.

The pages (under ``reference/cli/``, never written to ``docs/``):

- ``commands.md``: every command, the Python function it runs and the config groups it reads;
- ``config.md``: every config group, every option, every key with its default;
- ``presets.md``: every ``experiment=NAME`` preset and what it sets;
- ``default-config.md``: the whole config a stage starts from without overrides.

``tests/test_docs.py`` imports :func:`reference_pages` to check them without building the site.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import inspect
import re
import textwrap
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

DOCS = Path(__file__).resolve().parent
PAGES = "reference/cli"
EXPERIMENT = "experiment"
GENERATED = (
    '!!! info "Generated"\n'
    "    This page is generated at every build of the documentation from {sources}; "
    "edit those, not this page.\n"
)


# ------------------------------------------------------------------------------------- mkdocs events


def on_files(files: Any, config: Any) -> Any:
    """Add the generated CLI reference pages to the site's files."""
    from mkdocs.structure.files import File

    for path, content in reference_pages().items():
        files.append(File.generated(config, f"{PAGES}/{path}", content=content))
    return files


def on_serve(server: Any, config: Any, builder: Any) -> Any:
    """``mkdocs serve``: rebuild when a config file changes."""
    from medsynth.config import config_dir

    server.watch(str(config_dir()))
    return server


# ------------------------------------------------------------------------------- reading conf/ files


@dataclasses.dataclass
class KeyNote:
    """What a YAML file says about one key: its comment, and whether its value sits on its own line."""

    comment: str = ""
    block: bool = False  # a mapping written as an indented block (its keys get rows of their own)


@dataclasses.dataclass
class YamlFile:
    """One config file as text: its leading comment, its ``defaults`` list and a note per dotted key."""

    path: Path
    header: str
    defaults: list[Any]
    body: dict[str, Any]
    notes: dict[str, KeyNote]


def _split_comment(line: str) -> tuple[str, str]:
    """``line`` as (content, comment): the comment starts at a ``#`` outside quotes after a space."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[^\s:#'\"-][^:#]*?):(?:\s+(?P<value>.*))?$")


def read_yaml(path: Path) -> YamlFile:
    """Read one config file: its parsed body, and the comment of each (dotted) key.

    A key's comment is the one on its line; a key without one takes the comment lines just above
    it (when they are not the file's leading comment). The leading comment (minus ``@package``)
    describes the file.
    """
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    header: list[str] = []
    notes: dict[str, KeyNote] = {}
    stack: list[tuple[int, str]] = []
    above: list[str] = []
    seen_key = False
    for raw in text.splitlines():
        content, comment = _split_comment(raw)
        if not content.strip():
            if comment and not comment.startswith("@package"):
                (above if seen_key else header).append(comment)
            elif not comment and not seen_key and header:
                seen_key = True  # a blank line ends the leading comment
            continue
        seen_key = True
        match = _KEY.match(content)
        if match is None:  # a list item (the defaults list), a continuation line
            above = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(key for _, key in stack), match["key"].strip()])
        value = (match["value"] or "").strip()
        notes[dotted] = KeyNote(comment=comment or " ".join(above), block=not value)
        above = []
        if not value:
            stack.append((indent, match["key"].strip()))
    defaults = data.pop("defaults", []) if isinstance(data, dict) else []
    return YamlFile(path=path, header=" ".join(header), defaults=defaults, body=data, notes=notes)


def group_notes(group_dir: Path, option: str) -> dict[str, KeyNote]:
    """The notes of an option's keys, with those of the options it extends (its ``defaults`` list) beneath."""
    file = read_yaml(group_dir / f"{option}.yaml")
    notes: dict[str, KeyNote] = {}
    for entry in file.defaults:
        if isinstance(entry, str) and entry != "_self_":
            notes.update(group_notes(group_dir, entry))
    for key, note in file.notes.items():
        if note.comment or key not in notes:
            notes[key] = note
        else:
            notes[key] = KeyNote(comment=notes[key].comment, block=note.block)
    return notes


def extends(group_dir: Path, option: str) -> list[str]:
    """The options of the same group that ``option`` builds on (its ``defaults`` list)."""
    return [e for e in read_yaml(group_dir / f"{option}.yaml").defaults if isinstance(e, str) and e != "_self_"]


# ------------------------------------------------------------------------------------ composing conf/


class Composer:
    """Hydra's compose API on ``conf/``, as the command line uses it."""

    def __init__(self) -> None:
        from hydra import compose, initialize_config_dir

        from medsynth.config import config_dir

        self.conf = config_dir()
        self._initialize = initialize_config_dir
        self._compose = compose
        self._cache: dict[tuple[tuple[str, ...], bool], tuple[dict[str, Any], dict[str, str]]] = {}

    def __enter__(self) -> Composer:
        self._context = self._initialize(config_dir=str(self.conf), version_base="1.3")
        self._context.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)

    def compose(self, overrides: list[str], *, choices: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
        """The composed config, interpolations left as written, and each group's chosen option."""
        import copy

        key = (tuple(overrides), choices)
        if key not in self._cache:
            self._cache[key] = self._compose_now(list(overrides), choices=choices)
        return copy.deepcopy(self._cache[key])

    def _compose_now(self, overrides: list[str], *, choices: bool) -> tuple[dict[str, Any], dict[str, str]]:
        from omegaconf import OmegaConf

        cfg = self._compose(config_name="config", overrides=overrides, return_hydra_config=choices)
        config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=False)  # type: ignore[assignment]
        picked = {}
        if choices:
            picked = {k: v for k, v in config.pop("hydra")["runtime"]["choices"].items() if "/" not in k}
        return config, picked

    def groups(self) -> dict[str, list[str]]:
        """Every config group and its options, in the order ``config.yaml`` lists the groups."""
        order = [next(iter(e)) for e in read_yaml(self.conf / "config.yaml").defaults if isinstance(e, dict)]
        found = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in self.conf.iterdir() if d.is_dir()}
        found = {g: options for g, options in found.items() if options}
        return {g: found[g] for g in [*order, *sorted(set(found) - set(order))] if g in found}


# ------------------------------------------------------------------------------ types from the schema


def _dataclass_in(hint: Any) -> type | None:
    """The settings dataclass ``hint`` is, or holds as one of a union's members."""
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None) if _is_union(hint) else None


def _is_union(hint: Any) -> bool:
    import types

    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _mapping_in(hint: Any) -> Any:
    """The ``dict[...]`` type ``hint`` is, or holds as one of a union's members."""
    if typing.get_origin(hint) is dict:
        return hint
    return next((a for a in typing.get_args(hint) if typing.get_origin(a) is dict), None) if _is_union(hint) else None


def settings_hint(path: list[str]) -> Any:
    """The type ``medsynth.config.settings`` checks the value at ``path`` against (None: no such key)."""
    from medsynth.config.settings import PipelineSettings

    hint: Any = PipelineSettings
    for part in path:
        group = _dataclass_in(hint)
        if group is not None:
            hint = typing.get_type_hints(group).get(part)
            if hint is None:
                return None
        elif _mapping_in(hint) is not None:  # dict[str, X]: any key, each value an X
            args = typing.get_args(_mapping_in(hint))
            hint = args[1] if args else Any
        elif hint is Any:
            return Any
        else:
            return None
    return hint


_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "true/false values")}


def describe(hint: Any, *, plural: bool = False) -> str:
    """What a type accepts, in words (``plural``: as the items of a list)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        values = ", ".join(code(flow(a)) for a in args)
        return f"values from {values}" if plural else f"one of {values}"
    if _is_union(hint):
        options = [describe(a, plural=plural) for a in args if a is not type(None)]
        return " or ".join(options) + (" or `null`" if type(None) in args else "")
    if origin in (list, tuple):
        return "lists" if plural else ("a list of " + describe(args[0], plural=True) if args else "a list")
    if origin is dict:
        return "mappings" if plural else "a mapping"
    if dataclasses.is_dataclass(hint):
        return "groups of keys" if plural else "a group of keys"
    if hint is Any:
        return "any value"
    singular, many = _NOUNS.get(hint, (str(hint), str(hint)))
    return many if plural else singular


def accepts(path: list[str], siblings: Mapping[str, Any]) -> str:
    """What the config's checks accept at ``path`` (``siblings``: the mapping the key sits in)."""
    hint = settings_hint(path)
    if hint is None:
        return ""
    if hint is Any and "_target_" in siblings:  # the keyword arguments of a class built from an allow-list
        if path[-1] == "_target_":
            return "a class name from an allow-list (checked)"
        if path[-1] == "_partial_":
            return "true or false (Hydra: build it later, with arguments given at run time)"
        return "an argument of the `_target_` class"
    return describe(hint)


# -------------------------------------------------------------------------------------- formatting


def flow(value: Any) -> str:
    """A value as one line of YAML flow style (what an override would write)."""
    if isinstance(value, str):
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    return text.strip().removesuffix("...").strip()  # a lone scalar ends its document with "..."


def code(text: str) -> str:
    """``text`` as a Markdown code span (a pipe inside one does not split a table cell)."""
    if "`" not in text:
        return f"`{text}`"
    return f"`` {text} ``"


def prose(text: str, *, depth: int = 2) -> str:
    """A comment from ``conf/`` as Markdown for a table cell: outside its code spans, HTML-escaped,
    pipes escaped, and mentions of ``docs/NAME.md`` linked to that page (``depth``: folders below
    the docs root of the page it goes on)."""

    def link(match: re.Match[str]) -> str:
        name = match[1]
        return f"[docs/{name}]({'../' * depth}{name})" if (DOCS / name).is_file() else match[0]

    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):  # the text between code spans
        part = html.escape(parts[i], quote=False).replace("|", "\\|")
        parts[i] = re.sub(r"(?<![\w/])docs/([\w.-]+\.md)", link, part)
    return "".join(parts)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (an empty cell gets a space, or the row would lose a column)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell or " " for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def leaves(value: Mapping[str, Any], notes: Mapping[str, KeyNote], *, prefix: list[str] = (),
           strip: int = 0) -> Iterator[tuple[list[str], Any, Mapping[str, Any], bool]]:
    """(path, value, the mapping it sits in, opened) of each key a table lists: mappings written as
    blocks are opened (they still get a row, for their comment), others are kept whole.

    ``notes`` are keyed by the dotted path without its first ``strip`` parts (a group file's keys).
    """
    for key, item in value.items():
        path = [*prefix, str(key)]
        note = notes.get(".".join(path[strip:]))
        if isinstance(item, dict) and item and (note is None or note.block):
            yield path, item, value, True
            yield from leaves(item, notes, prefix=path, strip=strip)
        else:
            yield path, item, value, False


def key_rows(value: Mapping[str, Any], notes: Mapping[str, KeyNote], *, prefix: list[str] = (),
             strip: int = 0, context: Mapping[str, Any] | None = None) -> list[list[str]]:
    """Table rows (key, default, accepts, meaning) of the keys of ``value``, a config at ``prefix``.

    A mapping written as a block gets a row of its own only when its line has a comment.
    ``context`` is the whole composed config ``value`` belongs to (default: ``value`` is the whole).
    """
    rows = []
    for path, item, siblings, opened in leaves(value, notes, prefix=list(prefix), strip=strip):
        if context is not None:
            siblings = context
            for part in path[:-1]:
                siblings = siblings.get(part, {}) if isinstance(siblings, Mapping) else {}
        note = notes.get(".".join(path[strip:]), KeyNote())
        if opened and not note.comment:
            continue
        default = "(the keys below)" if opened else "required (`???`)" if item == "???" else code(flow(item))
        rows.append([code(".".join(path)), default, accepts(path, siblings), prose(note.comment)])
    return rows


def anchor(*names: str) -> str:
    """The id of a heading: ``data`` for a group, ``data-demo-cohort`` for ``data=demo_cohort``."""
    return "-".join(names).replace("_", "-")


# -------------------------------------------------------------------------------------- the commands


def stage_groups() -> dict[str, tuple[str, list[str]]]:
    """The function each stage runs and the settings it is given, from the dispatch in
    ``medsynth.cli._call``.

    ``settings.data`` becomes ``data``, ``settings.run`` the shared top-level keys, a bare
    ``settings`` every group; the stage a final ``return`` serves is the one no ``if`` names.
    """
    import medsynth.cli as cli

    tree = ast.parse(textwrap.dedent(inspect.getsource(cli._call)))
    function = tree.body[0]
    assert isinstance(function, ast.FunctionDef)
    calls: dict[str, ast.Call] = {}
    rest: ast.Call | None = None
    for statement in function.body:
        if isinstance(statement, ast.If) and isinstance(statement.test, ast.Compare):
            stage = statement.test.comparators[0]
            returned = statement.body[-1]
            if isinstance(stage, ast.Constant) and isinstance(returned, ast.Return):
                if isinstance(returned.value, ast.Call):
                    calls[stage.value] = returned.value
        elif isinstance(statement, ast.Return) and isinstance(statement.value, ast.Call):
            rest = statement.value
    left = [s for s in cli.STAGES if s not in calls]
    if rest is not None and len(left) == 1:
        calls[left[0]] = rest
    if set(calls) != set(cli.STAGES):
        unread = sorted(set(cli.STAGES) - set(calls))
        raise RuntimeError(f"docs/hooks.py cannot read medsynth.cli._call for stages {unread}")

    def given(call: ast.Call) -> tuple[str, list[str]]:
        function_name = ast.unparse(call.func)
        groups: list[str] = []
        for argument in [*call.args, *(k.value for k in call.keywords)]:
            text = ast.unparse(argument)
            if text == "settings":
                groups.append("*")
            elif text.startswith("settings."):
                groups.append(text.removeprefix("settings."))
            elif text == "run":
                groups.append("run")
        return function_name, groups

    return {stage: given(calls[stage]) for stage in cli.STAGES}


def _docstring(name: str) -> tuple[str, str]:
    """The first paragraphs of the docstrings of the stage function ``medsynth.stages.<name>`` and its
    module, and the function's full path; read from the source, as importing ``medsynth.stages`` would import torch."""
    import importlib.util

    spec = importlib.util.find_spec("medsynth.stages")
    folder = Path(next(iter(spec.submodule_search_locations)))  # type: ignore[union-attr, arg-type]
    package = ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))
    for statement in package.body:
        if isinstance(statement, ast.ImportFrom) and any(alias.name == name for alias in statement.names):
            module = statement.module or ""
            tree = ast.parse((folder / f"{module.rpartition('.')[2]}.py").read_text(encoding="utf-8"))
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and node.name == name:
                    paragraphs = [(ast.get_docstring(n) or "").split("\n\n", 1)[0] for n in (tree, node)]
                    return " ".join(" ".join(p.split()) for p in paragraphs if p), f"{module}.{name}"
    return "", ""


def _roles_as_code(text: str) -> str:
    """reST roles and double backticks as Markdown code spans."""
    text = re.sub(r":[a-z]+:`~?(?:[\w.]*\.)?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def commands_page(composer: Composer) -> str:
    import medsynth.cli as cli
    from medsynth.config import ALIASES

    groups = composer.groups()
    presets = ", ".join(groups.get(EXPERIMENT, []))
    usage = cli.USAGE.format(config="conf/ in a checkout, medsynth/conf in an installed package", presets=presets)
    out = ["# Commands\n\n", GENERATED.format(sources="`medsynth/cli.py` and `conf/`"), "\n"]
    out.append("`medsynth --help` prints:\n\n```text\n" + usage.rstrip() + "\n```\n\n")

    shared = ("the shared keys ([top level](config.md#top-level), [`paths`](config.md#paths), "
              "[`mlflow`](config.md#mlflow))")
    shared_short = "[the shared keys](config.md#top-level)"
    rows, sections = [], []
    pipelines = composer.conf.parent / "pipelines"
    for stage, (function, given) in stage_groups().items():
        read = []
        for group in given:
            if group == "*":
                read.append("every group")
            elif group == "run":
                read.append(shared)
            else:
                read.append(f"[`{group}`](config.md#{anchor(group)})")
        name = function.split(".")[-1]
        summary, path = _docstring(name)
        link = f"[`{function}`][{path}]" if path else f"`{function}`"
        reads = ", ".join(shared_short if r == shared else r for r in read)
        rows.append([f"[`medsynth {stage}`](#{stage})", link, reads])
        section = [f"## `medsynth {stage}` {{#{stage}}}\n\n", "```text\n", f"medsynth {stage} [key=value ...]\n"]
        if (pipelines / f"{stage}.py").is_file():
            section.append(f"python pipelines/{stage}.py [key=value ...]   # in a checkout\n")
        section.append("```\n\n")
        if summary:
            section.append(_roles_as_code(summary) + "\n\n")
        section.append(f"Runs {link}, with the settings of: {', '.join(read)}.\n\n")
        sections.append("".join(section))
    rows.append(["[`medsynth verify PATH`](#verify)", "[`medsynth.cli.verify_command`][medsynth.cli.verify_command]",
                 "none (reads the run's files)"])
    rows.append(["[`medsynth sync PATH`](#sync)", "[`medsynth.cli.sync_command`][medsynth.cli.sync_command]",
                 "none (reads the run's spool)"])
    out.append(table(["command", "runs", "config it reads"], rows) + "\n")
    out.append("A stage composes the whole config, the [preset](presets.md) included, and checks every "
               "group before it starts: an unknown key or a bad value stops it even in a group it does not "
               "read.\n\n")
    out.extend(sections)

    verify = re.search(r"^verify: (.*?)\n(?=\S|\n)", cli.USAGE, flags=re.S | re.M)
    out.append("## `medsynth verify` {#verify}\n\n```text\nmedsynth verify PATH [--audit METRICS_JSON]\n```\n\n")
    if verify:
        out.append(" ".join(verify[1].split()) + "\n\n")
    out.append("It runs without Hydra and reads no config. What it checks: [chain of custody](../../custody.md).\n\n")

    sync = re.search(r"^sync: (.*?)\n(?=\S|\n)", cli.USAGE, flags=re.S | re.M)
    out.append("## `medsynth sync` {#sync}\n\n```text\nmedsynth sync PATH\n```\n\n")
    if sync:
        out.append(" ".join(sync[1].split()) + "\n\n")
    out.append("It runs without Hydra; the server and the runs come from the spool itself. How an outage is "
               "handled: [scale-out](../../scale-out.md#outage).\n\n")

    out.append("## Overrides {#overrides}\n\n")
    out.append("After the stage come Hydra overrides: `group=option` picks a config file of a group "
               "([config groups](config.md)), `group.key=value` sets a key, `experiment=NAME` picks a "
               "[preset](presets.md). Hydra's flags work too: `--help` lists the groups and their "
               "options, `--cfg job` prints the composed config, `-m` runs a sweep "
               "([sweeps and SLURM](../../scale-out.md)).\n\n")
    if ALIASES:
        out.append("Short forms, expanded before Hydra reads them:\n\n")
        out.append(table(["you type", "Hydra gets"], [[code(k), code(v)] for k, v in ALIASES.items()]) + "\n")
    return "".join(out)


# ---------------------------------------------------------------------------------- the config groups


def config_page(composer: Composer) -> str:
    groups = composer.groups()
    base, base_choices = composer.compose([f"~{EXPERIMENT}"], choices=True)
    _, default_choices = composer.compose([], choices=True)
    preset = default_choices.get(EXPERIMENT)
    readers: dict[str, list[str]] = {}
    for stage, (_, given) in stage_groups().items():
        for group in given:
            for g in (groups if group == "*" else ["paths", "mlflow"] if group == "run" else [group]):
                readers.setdefault(g, []).append(stage)

    out = ["# Config groups\n\n", GENERATED.format(sources="`conf/` (values and comments) and "
                                                "`medsynth/config/settings.py` (what each key accepts)"), "\n"]
    out.append(
        "`conf/config.yaml` composes one option of each group below, then the "
        f"[preset](presets.md) `{EXPERIMENT}={preset}`, which may pick other options and set keys. "
        "On the command line, `group=option` picks an option and `group.key=value` sets a key "
        "(`medsynth train data=dicom data.spacing=[1,1,1]`). The tables list each option's keys as "
        "they are before the preset applies; values such as `${paths.output}` are interpolations, "
        "resolved when a stage starts. *Accepts* is what the checks allow before any stage runs "
        "(a wrong value stops the command with one line naming the key).\n\n"
    )
    summary = []
    for group, options in groups.items():
        if group == EXPERIMENT:
            summary.append([f"[`{group}`](presets.md)", code(preset or ""), "",
                            ", ".join(f"[`{o}`](presets.md#{anchor(o)})" for o in options), "every stage"])
            continue
        chosen, effective = base_choices.get(group, ""), default_choices.get(group, "")
        summary.append([f"[`{group}`](#{anchor(group)})", code(chosen), code(effective),
                        ", ".join(f"[`{o}`](#{anchor(group, o)})" for o in options),
                        ", ".join(readers.get(group, []))])
    out.append(table(["group", "default option", f"with `{EXPERIMENT}={preset}`", "options", "read by"], summary))
    out.append("\n")

    root = read_yaml(composer.conf / "config.yaml")
    top = {k: v for k, v in base.items() if k not in groups}
    out.append("## Top level {#top-level}\n\n")
    out.append(prose(root.header, depth=2) + " Read by every stage.\n\n")
    rows = key_rows(top, root.notes, prefix=[], strip=0)
    hydra_settings = root.body.get("hydra", {})
    rows += [[code(".".join(path)), code(flow(v)), "", "Hydra's own setting"]
             for path, v, _, opened in leaves({"hydra": hydra_settings}, {}) if not opened]
    out.append(table(["key", "default", "accepts", "meaning"], rows) + "\n")

    for group, options in groups.items():
        if group == EXPERIMENT:
            continue
        group_dir = composer.conf / group
        out.append(f"## `{group}` {{#{anchor(group)}}}\n\n")
        chosen, effective = base_choices.get(group), default_choices.get(group)
        line = f"Default option: `{group}={chosen}`"
        if effective and effective != chosen:
            line += f"; the default preset `{EXPERIMENT}={preset}` picks `{group}={effective}`"
        stages = readers.get(group)
        line += f". Read by: {', '.join(f'[`{s}`](commands.md#{s})' for s in stages)}." if stages else "."
        out.append(line + "\n\n")
        for option in options:
            composed, _ = composer.compose([f"~{EXPERIMENT}", f"{group}={option}"])
            file = read_yaml(group_dir / f"{option}.yaml")
            out.append(f"### `{group}={option}` {{#{anchor(group, option)}}}\n\n")
            if file.header:
                out.append(prose(file.header) + "\n\n")
            bases = extends(group_dir, option)
            if bases:
                out.append("Builds on " + ", ".join(f"[`{group}={b}`](#{anchor(group, b)})" for b in bases)
                           + ": its keys are listed here with this option's values.\n\n")
            notes = group_notes(group_dir, option)
            value = composed.get(group, {})
            rows = key_rows(value, notes, prefix=[group], strip=1, context=composed) if isinstance(value, dict) else []
            out.append(table(["key", "default", "accepts", "meaning"], rows) + "\n" if rows else "No keys.\n\n")
    return "".join(out)


# ---------------------------------------------------------------------------------------- the presets


def presets_page(composer: Composer) -> str:
    groups = composer.groups()
    _, default_choices = composer.compose([], choices=True)
    preset = default_choices.get(EXPERIMENT)
    out = ["# Presets\n\n", GENERATED.format(sources="`conf/experiment/`"), "\n"]
    out.append(
        f"A preset is a file of `conf/{EXPERIMENT}/`, picked with `{EXPERIMENT}=NAME` (default: "
        f"`{preset}`). It picks options of the [config groups](config.md) and sets keys on top of them; "
        "overrides on the command line still win (`medsynth run experiment=brain2d_joint_gpu "
        "trainer.max_steps=1000`).\n\n"
    )
    rows = []
    for name in groups.get(EXPERIMENT, []):
        file = read_yaml(composer.conf / EXPERIMENT / f"{name}.yaml")
        first = re.split(r"(?<=\.)\s", file.header, maxsplit=1)[0] if file.header else ""
        rows.append([f"[`{name}`](#{anchor(name)})", prose(first, depth=2)])
    out.append(table(["preset", "what it is"], rows) + "\n")
    for name in groups.get(EXPERIMENT, []):
        file = read_yaml(composer.conf / EXPERIMENT / f"{name}.yaml")
        out.append(f"## `{name}` {{#{anchor(name)}}}\n\n")
        if file.header:
            out.append(prose(file.header) + "\n\n")
        picks = []
        for entry in file.defaults:
            if isinstance(entry, dict):
                for key, option in entry.items():
                    group = key.split()[-1].lstrip("/")
                    picks.append(f"[`{group}={option}`](config.md#{anchor(group, str(option))})")
        if picks:
            out.append("Picks: " + ", ".join(picks) + ".\n\n")
        composed, _ = composer.compose([f"{EXPERIMENT}={name}"])
        rows = key_rows(file.body, file.notes, context=composed)
        out.append(table(["key", "value", "accepts", "note"], rows) + "\n" if rows else "It sets no keys.\n\n")
        command = "run" if name == preset else f"run {EXPERIMENT}={name}"
        out.append(f"Check what it composes to: `medsynth {command} --cfg job`.\n\n")
    return "".join(out)


class _Dumper(yaml.SafeDumper):
    """YAML as ``conf/`` writes it: a list of plain values on one line."""


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    flat = all(not isinstance(v, (dict, list)) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flat)


_Dumper.add_representer(list, _represent_list)


def default_config_page(composer: Composer) -> str:
    config, choices = composer.compose([], choices=True)
    order = list(composer.groups())
    picked = ", ".join(f"`{g}={choices[g]}`" for g in order if choices.get(g) is not None)
    body = yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=100)
    return (
        "# Composed default config\n\n"
        + GENERATED.format(sources="`conf/`")
        + "\n"
        + f"What every stage starts from with no overrides: {picked}. The same as "
        "`medsynth train --cfg job` prints (interpolations such as `${paths.output}` are resolved "
        "when the stage starts; Hydra's own `hydra` key is left out). Every key is described in "
        "[config groups](config.md).\n\n"
        + "```yaml\n" + body + "```\n"
    )


def reference_pages() -> dict[str, str]:
    """The generated pages: file name (under ``reference/cli/``) to Markdown."""
    with Composer() as composer:
        return {
            "commands.md": commands_page(composer),
            "config.md": config_page(composer),
            "presets.md": presets_page(composer),
            "default-config.md": default_config_page(composer),
        }

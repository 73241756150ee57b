"""The README and docs/ cannot drift from the code: every `minratio-sweep …` command in them composes (and
validates) with Hydra as `--cfg job` would, other commands parse, Python blocks compile, the configuration
reference lists exactly the schema's keys with their defaults, and the schema's defaults are the YAML's."""
from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import compose_config
from pipeline.orchestration.config import Config, validate

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
PLACEHOLDER = re.compile(r"…|\.\.\.|<[^>]*>|HOST")  # a command with a blank to fill in only parses


def _commands():
    """(page, command text) for every shell line of a fenced block and every inline `minratio-sweep …`."""
    for page in PAGES:
        text = page.read_text()
        for lang, body in FENCE.findall(text):
            if lang in ("bash", "sh", "shell", "console"):
                joined = re.sub(r"\\\n\s*", " ", body)
                for line in joined.splitlines():
                    line = line.split("  #")[0].strip()
                    if line and not line.startswith("#"):
                        yield page.name, line
        for span in re.findall(r"`(minratio-sweep[^`]*)`", FENCE.sub("", text)):
            yield page.name, span


def _python_blocks():
    for page in PAGES:
        for lang, body in FENCE.findall(page.read_text()):
            if lang == "python":
                yield page.name, body


def _sweep_overrides(command: str) -> list[str] | None:
    """The overrides of the `minratio-sweep` in ``command`` (after `--` for `ray job submit`); for a
    multirun (`-m`), each sweep override's first value, as the first job would get."""
    words = shlex.split(command)
    if "minratio-sweep" not in words:
        return None
    args = words[words.index("minratio-sweep") + 1:]
    if args and args[0] in ("--help", "--hydra-help"):
        return []
    multirun = bool({"-m", "--multirun"} & set(args))
    if "--config-dir" in args:  # Hydra's own option: the same folder on the compose API's search path
        i = args.index("--config-dir")
        args = args[:i] + [f"hydra.searchpath=[file://{(ROOT / args[i + 1]).resolve()}]"] + args[i + 2:]
    args = [a for a in args if a not in ("-m", "--multirun", "--cfg", "job")]
    if not multirun:
        return args
    parsed = OverridesParser.create().parse_overrides(args)
    out = []
    for arg, ov in zip(args, parsed):
        out.append(f"{ov.get_key_element()}={next(ov.sweep_string_iterator())}" if ov.is_sweep_override() else arg)
    return out


COMMANDS = sorted(set(_commands()))


def test_the_pages_have_commands_to_check():
    sweeps = [c for _, c in COMMANDS if _sweep_overrides(c) is not None and not PLACEHOLDER.search(c)]
    assert len(sweeps) >= 15 and any("-m" in c.split() for c in sweeps), sweeps


@pytest.mark.parametrize("page,command", COMMANDS)
def test_every_command_parses_and_every_sweep_composes(page, command):
    words = shlex.split(command)  # every command at least parses as a shell line
    assert words, command
    overrides = _sweep_overrides(command)
    if overrides is None or PLACEHOLDER.search(command):
        return
    cfg = compose_config(overrides, shrink=False)
    validate(cfg)


@pytest.mark.parametrize("page,source", sorted(set(_python_blocks())))
def test_every_python_block_compiles(page, source):
    compile(source, page, "exec")


def _flat(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict) and key not in ("grid", "runtime_env"):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _same(cell: str, value) -> bool:
    if isinstance(value, bool) or value is None:
        return cell == {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (int, float)):
        return float(cell) == float(value)
    if isinstance(value, dict):
        return cell == "{}" and not value
    return cell == str(value)


def test_configuration_reference_lists_every_key_with_its_default():
    rows = re.findall(r"^\| `([\w.]+)` \| ([^|]*?) \|", (ROOT / "docs/configuration.md").read_text(), re.M)
    documented = dict(rows)
    defaults = dict(_flat(OmegaConf.to_container(compose_config(shrink=False), resolve=True)))
    assert list(documented) == list(defaults), set(documented) ^ set(defaults)
    wrong = {k: (documented[k], v) for k, v in defaults.items() if not _same(documented[k], v)}
    assert not wrong, wrong


def test_schema_defaults_are_the_default_yaml_options():
    composed = OmegaConf.to_container(compose_config(shrink=False), resolve=True)
    schema = dataclasses.asdict(Config())
    differ = {k: (v, dict(_flat(composed))[k]) for k, v in _flat(schema) if dict(_flat(composed))[k] != v}
    assert not differ, differ


def test_help_lists_only_real_options(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    groups = res.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = dict(line.split(": ", 1) for line in groups.splitlines() if ": " in line)
    on_disk = {d.name: ", ".join(sorted(p.stem for p in d.glob("*.yaml")))
               for d in (ROOT / "conf").iterdir() if d.is_dir() and list(d.glob("*.yaml"))}
    assert listed == on_disk
    assert "base_" not in res.stdout


def test_tables_page_names_every_column():
    """docs/tables.md names every column of every table; the runs table's config columns follow the rule
    it states (`<section>_<key>` for every per-run config value)."""
    from pipeline.orchestration import tables

    doc = (ROOT / "docs/tables.md").read_text()
    config_columns = {tables.column_name(section, key) for section in ("data", "model", "optim", "stall", "hessian",
                                                                        "refine")
                      for key, value in dataclasses.asdict(getattr(Config(), section)).items()
                      if not isinstance(value, (dict, list)) and key != "params"}
    assert config_columns <= set(tables.SCHEMAS["runs"].names)
    missing = {name: [c for c in schema.names if f"`{c}`" not in doc and c not in config_columns]
               for name, schema in tables.SCHEMAS.items()}
    assert not any(missing.values()), missing

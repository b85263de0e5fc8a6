"""The `fmrl` command line itself: help and config validation import no heavy library, every option
is documented with its default, `config show` prints every key with its doc, dashed overrides work, and
failures are one line with the right exit code (real subprocesses where the point is what a user sees)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trainer.cli
from trainer.cli import build_parser, report_failure, undash_overrides
from trainer.config import Config, field_docs, load_config

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchrec", "fbgemm_gpu", "deepspeed")


def fmrl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*prefix, name))


COMMANDS = [" ".join(path) for path, _ in _subcommands(build_parser())]


def test_help_and_config_validation_import_no_heavy_library() -> None:
    # in a fresh interpreter: every --help, a config typo and `config show`, then what got imported
    script = f"""
import contextlib, io, sys
from trainer.cli import main
for command in {COMMANDS!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([*command.split(), "--help"])
assert main(["train", "--config", "configs/demo.yaml", "train.lrr=1"]) == 2
assert main(["launch", "--dry-run", "train.no_such_key=1"]) == 2
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["config", "show", "--config", "configs/dlrm-synthetic.yaml"]) == 0
print(sorted(name for name in {HEAVY!r} if name in sys.modules))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert len(COMMANDS) > 15 and "data convert-criteo" in COMMANDS and "config show" in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command: str) -> None:
    parser = dict((" ".join(path), p) for path, p in _subcommands(build_parser()))[command]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"fmrl {command}: {action.dest} has no help text"
    text = "".join(parser.format_help().split())  # help lines wrap anywhere, even inside a default
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            shown = "" if action.help and "default" in action.help else f"(default:{action.default})"
            assert shown in text, (command, action.dest)


def test_version() -> None:
    done = fmrl("--version")
    assert done.returncode == 0 and done.stdout.startswith("fmrl 0.")


def test_every_config_key_is_documented() -> None:
    def sections(cls: type, prefix: str = ""):
        yield prefix, cls
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            if dataclasses.is_dataclass(value):
                yield from sections(type(value), f"{prefix}{f.name}.")

    found = list(sections(Config))
    assert len(found) == 9  # the root and its 8 sections
    for prefix, cls in found:
        docs = field_docs(cls)
        missing = [f"{prefix}{f.name}" for f in dataclasses.fields(cls) if f.init and not docs.get(f.name)]
        assert not missing, missing


def test_config_show_prints_every_key_with_its_doc_and_default_and_reads_back(tmp_path) -> None:
    done = fmrl("config", "show", "--config", "configs/demo.yaml", "--optim.lr", "3e-4", "--run.name=shown")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "# Peak learning rate of AdamW" in text and "lr: 0.0003" in text and "name: shown" in text
    lr_comment = text.split("  lr: 0.0003")[0].rsplit("\n  lr", 1)[-1]
    assert "(default: 0.001)" in lr_comment
    # valid YAML of the same config: what `fmrl train` with these arguments would run
    shown = tmp_path / "shown.yaml"
    shown.write_text(text)
    expected = load_config(str(REPO / "configs/demo.yaml"), ["optim.lr=3e-4", "run.name=shown"])
    assert load_config(str(shown)) == expected
    keys = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    comments = " ".join(text.split()).count("(default:")
    leaves = [line for line in keys if not line.rstrip().endswith(":")]
    assert comments == len(leaves) > 60


def test_dashed_overrides_are_dotted_overrides() -> None:
    assert undash_overrides(
        ["train", "--train.epochs=3", "--optim.lr", "3e-4", "--config", "c.yaml", "a.b=1"]
    ) == [
        "train",
        "train.epochs=3",
        "optim.lr=3e-4",
        "--config",
        "c.yaml",
        "a.b=1",
    ]
    assert undash_overrides(["--run.overwrite", "--debug"]) == ["run.overwrite", "--debug"]


def test_a_config_typo_is_one_line_and_exit_2_and_debug_adds_the_traceback() -> None:
    done = fmrl("train", "--config", "configs/demo.yaml", "--train.lrr=1e-3")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("fmrl train: config error: unknown key 'train.lrr'")
    debug = fmrl("train", "--debug", "train.lrr=1e-3")
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("fmrl train: config error: unknown key")
    # an override after an option reaches the config too
    late = fmrl(
        "launch", "--dry-run", "--nproc", "1", "train.epochs=1", "--config", "configs/demo.yaml", "x.y=1"
    )
    assert late.returncode == 2 and "unknown section 'x'" in late.stderr


def test_failures_map_to_exit_codes_and_only_a_bug_asks_for_debug(capsys, monkeypatch) -> None:
    from data_pipeline.storage import StorageError
    from trainer.config import ConfigError

    monkeypatch.delenv("RANK", raising=False)
    assert report_failure("train", ConfigError("unknown key 'x'"), debug=False) == 2
    assert report_failure("data", StorageError("cannot reach object storage at E for U"), debug=False) == 1
    assert report_failure("data", FileNotFoundError("no such file: in.txt"), debug=False) == 2
    assert report_failure("train", KeyError("oops"), debug=False) == 1
    assert capsys.readouterr().err.splitlines() == [
        "fmrl train: config error: unknown key 'x'",
        "fmrl data: storage error: cannot reach object storage at E for U",
        "fmrl data: error: no such file: in.txt",
        "fmrl train: unexpected KeyError: 'oops'",
        "fmrl train: this looks like a bug; --debug shows the traceback",
    ]
    # another torchrun rank: the same code, and its line (after rank 0 had time to say it) names it
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(trainer.cli, "RANK_GRACE_S", 0.0)
    assert report_failure("train", ConfigError("bad"), debug=False) == 2
    assert capsys.readouterr().err == "fmrl train (rank 1): config error: bad\n"

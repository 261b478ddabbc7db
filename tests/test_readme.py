"""The README's promises that a fresh clone can check: every file it names exists, its commands parse."""
import re
import shlex
from pathlib import Path

import pytest

from gradleak.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# a path-like inline code span or link target: a folder/file, or a file name with a known extension
PATH = re.compile(r"^[\w.\-/]+(/|\.(py|md|png|csv|json|txt|toml|ipynb|jsonl|html))$")
CODE_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _named_paths():
    links = re.findall(r"\]\(([^)#\s]+)\)", README)  # [text](path) and ![alt](path)
    prose = CODE_BLOCK.sub("", README)
    # inline paths inside the repository's own folders (an output such as `audit/records.jsonl` is not one)
    folders = {entry.name for entry in ROOT.iterdir() if entry.is_dir() and not entry.name.startswith(".")}
    spans = [span for span in re.findall(r"`([^`\n]+)`", prose)
             if PATH.match(span) and (span.split("/")[0] in folders or (ROOT / span).is_file())]
    scripts = re.findall(r"^\s*python (\S+\.py)", README, re.M)  # scripts the commands run
    return sorted({p for p in links + spans + scripts if "://" not in p})


def _gradleak_commands():
    commands = []
    for language, block in CODE_BLOCK.findall(README):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("gradleak "):
                commands.append(line)
    return commands


def test_the_readme_names_paths():
    assert len(_named_paths()) >= 10  # the extraction itself works


@pytest.mark.parametrize("path", _named_paths())
def test_every_path_the_readme_names_exists(path):
    assert (ROOT / path).exists(), f"README names {path}, which is not in the repository"


@pytest.mark.parametrize("command", _gradleak_commands())
def test_every_readme_command_parses(command):
    """Each ``gradleak ...`` line of the README is accepted by the parser (shell variables expanded as the README
    sets them)."""
    variables = dict(re.findall(r'(\w+)="([^"]*)"', README))
    words = [w for word in shlex.split(command)[1:]
             for w in (variables[word[1:]].split() if word.startswith("$") and word[1:] in variables else [word])]
    build_parser().parse_args(words)

"""docs/install.md's manual recipes install exactly what scripts/setup_venv.sh installs: the CPU recipe
the same packages (requirements/cpu.txt expanded) with the same --no-deps, the CUDA recipe the same but
for the torch and fbgemm wheels."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what the CUDA recipe installs instead of the CPU wheels (from the PyTorch CUDA index)
CUDA_WHEELS = {("torch==2.13.0", False), ("fbgemm-gpu==1.8.0", False)}
CPU_WHEELS = {("torch==2.13.0", False), ("fbgemm-gpu-cpu==1.8.0", False)}


def _requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def installs(text: str) -> set[tuple[str, bool]]:
    """(requirement, installed with --no-deps) of every `pip install` command in shell ``text``, with
    ``-r FILE`` expanded and ``-e .`` kept as "-e ."."""
    found: set[tuple[str, bool]] = set()
    for command in text.replace("\\\n", " ").splitlines():
        words = shlex.split(command, comments=True)
        if "install" not in words or not any(w.endswith("pip") or w == "${pip[@]}" for w in words):
            continue
        args = words[words.index("install") + 1 :]
        no_deps = "--no-deps" in args
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in ("-r", "--requirement"):
                found |= {(req, no_deps) for req in _requirements(ROOT / args[i + 1])}
                i += 2
            elif arg in ("-e", "--editable"):
                found.add((f"-e {args[i + 1]}", no_deps))
                i += 2
            elif arg in ("--index-url", "--extra-index-url", "-c"):
                i += 2
            elif arg.startswith("-"):
                i += 1
            else:
                found.add((arg, no_deps))
                i += 1
    return found


def recipe(section: str) -> str:
    """The ```bash blocks of the docs/install.md section whose heading starts with ``section``."""
    doc = (ROOT / "docs" / "install.md").read_text()
    match = re.search(rf"^## {section}.*?(?=^## |\Z)", doc, flags=re.M | re.S)
    assert match, f"docs/install.md has no section '## {section}'"
    blocks = re.findall(r"```bash\n(.*?)```", match.group(0), flags=re.S)
    assert blocks, f"docs/install.md section {section} has no bash block"
    return "\n".join(blocks)


def test_the_manual_cpu_recipe_installs_what_setup_venv_installs() -> None:
    script = installs((ROOT / "scripts" / "setup_venv.sh").read_text())
    assert ("torchrec==1.8.0", True) in script and ("-e .", True) in script  # the parser sees the script
    assert ("mlflow==3.17.2", False) in script  # and requirements/cpu.txt through -r
    documented = installs(recipe("CPU"))
    assert documented == script, {
        "missing from docs/install.md": sorted(map(str, script - documented)),
        "not installed by setup_venv.sh": sorted(map(str, documented - script)),
    }


def test_the_cuda_recipe_differs_only_in_the_torch_and_fbgemm_wheels() -> None:
    script = installs((ROOT / "scripts" / "setup_venv.sh").read_text())
    assert CPU_WHEELS <= script
    expected = (script - CPU_WHEELS) | CUDA_WHEELS
    documented = installs(recipe("CUDA"))
    assert documented == expected, {
        "missing from the CUDA recipe": sorted(map(str, expected - documented)),
        "not in setup_venv.sh (but for the CUDA wheels)": sorted(map(str, documented - expected)),
    }


def test_the_parser_sees_a_difference() -> None:
    """A recipe that leaves a package out, or drops a --no-deps, does not pass."""
    script = installs((ROOT / "scripts" / "setup_venv.sh").read_text())
    broken = recipe("CPU").replace(" obp==0.4.1", "").replace("--no-deps torchrec", "torchrec")
    documented = installs(broken)
    assert ("obp==0.4.1", True) in script - documented
    assert ("torchrec==1.8.0", False) in documented - script

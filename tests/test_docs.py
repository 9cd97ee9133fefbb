"""Every shell command shown in README.md and docs/*.md runs, and the docs site builds.

Extraction: fenced code blocks marked ```bash, ```sh, ```shell or ```console (in a console block only the
lines that start with `$ `). Backslash continuations are joined, comment lines and trailing comments
dropped, and `a && b` is two commands. A command is run when its program (after any leading `NAME=value`
assignments) is one of RUN_PROGRAMS; environment setup (SETUP: `bash .ci/...`, `pip install`) is never run,
because it is what CI itself runs before the tests. Any other program fails the extraction test: mark its
block with `<!-- docs-test: skip (why) -->` on the line before the fence (a GPU, hours, several machines).

Running: each page's commands run in order in a fresh temporary folder holding symlinks to the
repository's checkpoints/, notebooks/, benchmarks/ and figures/ (which must stay unchanged: commands write
to runs/ or out/), with this Python's environment first on PATH. SIZES appends small-size flags per command
(argparse takes the last value, so they win); a command without a size rule fails the extraction test.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED = ("checkpoints", "notebooks", "benchmarks", "figures")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
RUN_PROGRAMS = {"meshprobe", ".venv/bin/meshprobe", "python", "python3", ".venv/bin/python", "bash"}
SETUP = re.compile(r"^(bash \.ci/|(\S*/)?pip3? install |(\S*/)?python3? -m pip install )")
MARKER = re.compile(r"<!--\s*docs-test:(.*?)-->")
SKIP = re.compile(r"^\s*skip\s*\((.+)\)\s*$")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
ENV_ASSIGN = re.compile(r"^(\w+=\S*\s+)*")

# Small sizes per command (the normalized command: no env prefix, no .venv/bin/, `python -m meshprobe` ->
# `meshprobe`, python3 -> python); the first matching pattern wins. {out} is a folder of the run.
SIZES = [
    (r"^meshprobe train .*--resume", "--steps 4 --eval-every 2 --eval-batches 1 --batch-size 2 --save-every 2 "
                                     "--log-every 1 --quiet"),
    (r"^meshprobe train ", "--steps 2 --eval-every 1 --eval-batches 1 --batch-size 2 --save-every 2 --log-every 1 "
                           "--quiet"),
    (r"^meshprobe eval ", "--batches 1 --batch-size 2"),
    (r"^meshprobe analyze .*--(dynamics|tuned-lens)", "--samples 6 --no-probes --no-progress --dynamics-samples 1 "
                                                     "--dynamics-seq-len 8 --dynamics-iters 4 --lens-samples 4 "
                                                     "--lens-fit-steps 2"),
    (r"^meshprobe analyze ", "--samples 6 --no-probes --no-progress"),
    (r"^meshprobe figures", "--samples 4 --no-probes --no-progress --out {out}/figures"),
    (r"^meshprobe (info|data) ", ""),
    (r"^python -c ", ""),  # one-liners that make a small input (a tiny model, a token file)
    (r"^meshprobe zoo .*--list", ""),  # training a zoo takes hours: mark such blocks skipped
    (r"^python benchmarks/hooks\.py", "--repeats 1 --batch 1 --seq 32"),
    (r"^python benchmarks/train_throughput\.py", "--steps 1 --warmup 0 --repeats 1 --batch 2 --seq 32"),
    (r"^python benchmarks/mesh_cost\.py", "--turns 2 --batch 2 --seq 32"),
    (r"^python benchmarks/analyze\.py", "--ns 6 --no-probes"),
    (r"^meshprobe features .*--load", "--samples 4 --causal 1 --quiet"),
    (r"^meshprobe features ", "--samples 4 --epochs 1 --features 32 --k 4 --causal 1 --quiet"),
    (r"^python benchmarks/features\.py", "--sequences 4 --steps 2 --repeats 1 --batch 128 --out {out}/features.json"),
    (r"^python benchmarks/dynamics\.py", "--repeats 1 --batch 1 --seq 8 --iters 4 --out {out}/dynamics.json"),
    (r"^python benchmarks/dynamics_zoo\.py", "--text loop3-anchor --tasks phop2-anchor --sequences 1 --seq 8 --iters 4 "
                                             "--lens-sequences 4 --fit-steps 2 --task-sequences 8 "
                                             "--out {out}/dynamics_zoo.json"),
]


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    commands: list[str] = field(default_factory=list)
    skip: str | None = None  # the reason, when marked


def strip_comment(line: str) -> str:
    """`line` without a trailing `# comment` (a `#` at the start of a word, outside quotes)."""
    quote, prev = None, " "
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and prev.isspace():
            return line[:i].rstrip()
        prev = ch
    return line.rstrip()


def split_and(command: str) -> list[str]:
    """`a && b` -> [a, b] (outside quotes)."""
    parts, quote, start, i = [], None, 0, 0
    while i < len(command):
        ch = command[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif command.startswith("&&", i):
            parts.append(command[start:i].strip())
            start = i = i + 2
            continue
        i += 1
    parts.append(command[start:].strip())
    return [p for p in parts if p]


def block_commands(lang: str, lines: list[str]) -> list[str]:
    """The commands of one shell code block, continuations joined, comments dropped, `&&` split."""
    if lang == "console":
        lines = [ln.strip()[2:] for ln in lines if ln.strip().startswith("$ ")]
    joined, pending = [], ""
    for ln in lines:
        if ln.rstrip().endswith("\\"):
            pending += ln.rstrip()[:-1].strip() + " "
            continue
        joined.append((pending + ln.strip()).strip())
        pending = ""
    if pending:
        joined.append(pending.strip())
    commands = []
    for cmd in joined:
        cmd = strip_comment(cmd)
        if cmd and not cmd.startswith("#"):
            commands += split_and(cmd)
    return commands


def extract(text: str, page: str = "<text>") -> list[Block]:
    """The shell code blocks of a markdown text, with their skip markers."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        if lang in SHELL_LANGS:
            block = Block(page, start + 1, lang, block_commands(lang, lines[start + 1:j]))
            k = start - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            marker = MARKER.search(lines[k]) if k >= 0 else None
            if marker:
                reason = SKIP.match(marker.group(1))
                if not reason or not reason.group(1).strip():
                    raise ValueError(f"{page}:{k + 1}: a docs-test marker must read "
                                     f"'<!-- docs-test: skip (reason) -->', got {lines[k].strip()!r}")
                block.skip = reason.group(1).strip()
            blocks.append(block)
        i = j + 1
    return blocks


def program(command: str) -> str:
    rest = ENV_ASSIGN.sub("", command, count=1)
    return rest.split()[0] if rest.split() else ""


def normalized(command: str) -> str:
    """The command as SIZES sees it: no env prefix, no .venv/bin/, `python -m meshprobe` -> `meshprobe`."""
    cmd = ENV_ASSIGN.sub("", command, count=1).strip()
    cmd = re.sub(r"^\.venv/bin/", "", cmd)
    cmd = re.sub(r"^python3? ", "python ", cmd)
    return re.sub(r"^python -m meshprobe\b", "meshprobe", cmd)


def size_flags(command: str) -> str | None:
    """The small-size flags for a command, or None when no rule covers it."""
    cmd = normalized(command) + " "
    for pattern, flags in SIZES:
        if re.search(pattern, cmd):
            return flags
    return None


def runnable(blocks: list[Block]) -> list[str]:
    """The commands the slow test runs, in page order (setup commands and skipped blocks left out)."""
    return [c for b in blocks if b.skip is None for c in b.commands
            if program(c) in RUN_PROGRAMS and not SETUP.match(ENV_ASSIGN.sub("", c, count=1))]


SNIPPET = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$')


def page_text(path: Path) -> str:
    """A page's markdown with its snippet includes (`--8<-- "FILE"`, paths from the repository root) expanded,
    as mkdocs renders it: commands in an included file count too."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = SNIPPET.match(line)
        lines.append((REPO / m.group(1)).read_text(encoding="utf-8") if m else line)
    return "\n".join(lines)


def page_blocks() -> dict[str, list[Block]]:
    return {p.relative_to(REPO).as_posix(): extract(page_text(p), p.name) for p in PAGES}


# --- fast: the extraction ------------------------------------------------------------------------------------

def test_extraction_rules_on_a_sample():
    sample = "\n".join([
        "```bash",
        "# a comment line",
        "meshprobe train --config tiny \\",
        "    --out runs/tiny      # trailing comment",
        "bash .ci/setup && .venv/bin/meshprobe info runs/tiny",
        "OMP_NUM_THREADS=1 python benchmarks/hooks.py --repeats 3",
        "```",
        "",
        "<!-- docs-test: skip (needs a GPU) -->",
        "",
        "```sh",
        "meshprobe train --config gpu-small --out runs/g",
        "```",
        "```console",
        "$ meshprobe data list",
        "source  present",
        "```",
        "```python",
        "meshprobe.train()",
        "```",
    ])
    blocks = extract(sample)
    assert [b.lang for b in blocks] == ["bash", "sh", "console"]
    assert blocks[0].commands == ["meshprobe train --config tiny --out runs/tiny", "bash .ci/setup",
                                  ".venv/bin/meshprobe info runs/tiny",
                                  "OMP_NUM_THREADS=1 python benchmarks/hooks.py --repeats 3"]
    assert blocks[0].skip is None and blocks[1].skip == "needs a GPU"
    assert blocks[2].commands == ["meshprobe data list"]
    assert runnable(blocks) == ["meshprobe train --config tiny --out runs/tiny", ".venv/bin/meshprobe info runs/tiny",
                                "OMP_NUM_THREADS=1 python benchmarks/hooks.py --repeats 3", "meshprobe data list"]
    assert normalized(".venv/bin/python -m meshprobe analyze x") == "meshprobe analyze x"
    assert size_flags("OMP_NUM_THREADS=1 python benchmarks/hooks.py --repeats 3").startswith("--repeats 1")
    with pytest.raises(ValueError, match="reason"):
        extract("<!-- docs-test: skip -->\n```bash\nmeshprobe info x\n```")


def test_docs_commands_are_found_and_covered():
    pages = page_blocks()
    assert {"README.md", "docs/index.md", "docs/training.md", "docs/analyses.md"} <= set(pages)
    assert any(b.skip for b in pages["docs/contributing.md"]), "snippet includes are not expanded"
    problems, total = [], 0
    for page, blocks in pages.items():
        for b in blocks:
            if b.skip is not None:
                continue
            for c in b.commands:
                bare = ENV_ASSIGN.sub("", c, count=1)
                if SETUP.match(bare):
                    continue
                if program(c) not in RUN_PROGRAMS:
                    problems.append(f"{page}:{b.line}: {c!r} runs {program(c)!r}; mark the block "
                                    "'<!-- docs-test: skip (why) -->' or add the program to RUN_PROGRAMS")
                elif size_flags(c) is None:
                    problems.append(f"{page}:{b.line}: {c!r} has no small-size rule in SIZES")
                else:
                    total += 1
    assert not problems, "\n".join(problems)
    assert total >= 20, f"only {total} runnable commands found in README.md and docs/"
    every = [c for blocks in pages.values() for c in runnable(blocks)]
    assert "meshprobe analyze checkpoints/loop3-mesh --out runs/mesh" in every  # a bundled model, no data flag


# --- slow: run them ------------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under the linked folders: they must not change."""
    out = {}
    for name in LINKED:
        for p in sorted((root / name).rglob("*")):
            if p.is_file():
                st = p.stat()
                out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def command_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    return env


RUN_PAGES = [page for page, blocks in page_blocks().items() if runnable(blocks)]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES)
def test_documented_commands_run(page, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in LINKED:
        (work / name).symlink_to(REPO / name, target_is_directory=True)
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent, target_is_directory=True)
    before = snapshot(REPO)
    env = command_env()
    for command in runnable(page_blocks()[page]):
        full = f"{command} {size_flags(command).format(out=tmp_path / 'out')}".strip()
        proc = subprocess.run(["bash", "-c", full], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (f"{page}: `{full}` exited {proc.returncode}\n"
                                      f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}")
    after = snapshot(REPO)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"{page}: the commands changed files under {', '.join(LINKED)}: {changed[:10]}"


@pytest.mark.slow
def test_mkdocs_build_is_strict_clean(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=REPO, env={**command_env(), "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "hooks" / "index.html").is_file()
    assert "hook_state_out" in (tmp_path / "site" / "hooks" / "index.html").read_text(encoding="utf-8")

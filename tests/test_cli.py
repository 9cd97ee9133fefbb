"""The CLI stays thin: `meshprobe --help` imports neither torch nor transformer-lens."""
import subprocess
import sys


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from meshprobe.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformer_lens', 'numpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_subcommand_is_registered():
    from meshprobe.cli import COMMANDS, build_parser

    help_text = build_parser().format_help()
    for name, _, _ in COMMANDS:
        assert name in help_text


def test_no_command_prints_help_and_exits_2(capsys):
    from meshprobe.cli import main

    assert main([]) == 2
    assert "train" in capsys.readouterr().out

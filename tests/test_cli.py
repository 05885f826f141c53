"""The `kedit` CLI: subcommands and exit codes (0 ok, 2 bad input, 1 internal error)."""

import json
import subprocess
import sys

import pytest

from pipelines.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_data_inspect_ok_and_problems(tmp_path, capsys):
    good = {"case_id": 1, "prompt": "The mother tongue of X Y is", "subject": "X Y",
            "target_new": "English", "ground_truth": "French", "rephrase_prompt": "X Y speaks",
            "locality_prompt": "Z speaks", "locality_ground_truth": "French"}
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, target_new="")) + "\n")
    assert main(["data", "inspect", str(p)]) == 2
    out = capsys.readouterr().out
    assert "counterfact-flat" in out and "records:  2" in out
    assert "record 1, field 'target_new'" in out
    p.write_text(json.dumps(good) + "\n")
    assert main(["data", "inspect", str(p)]) == 0
    assert "problems: none" in capsys.readouterr().out


def test_builtin_inspect(capsys):
    assert main(["data", "inspect", "builtin"]) == 0
    assert "format:   counterfact" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line(tmp_path):
    r = run_cli("data", "inspect", str(tmp_path / "nope.json"))
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("kedit:")]
    assert lines == [f"kedit: error: {tmp_path / 'nope.json'}: no such file"]


def test_unknown_model_exits_2(capsys):
    assert main(["generate", "--model", "no/such-model-anywhere", "hi"]) == 2
    assert "unknown model 'no/such-model-anywhere'" in capsys.readouterr().err


def test_internal_error_exits_1(monkeypatch, capsys):
    import kedit_core.generation as gen

    monkeypatch.setattr(gen, "greedy", lambda *a, **k: 1 / 0)
    assert main(["generate", "--model", "tiny-random-gpt2", "--device", "cpu", "hi"]) == 1
    assert "internal error: ZeroDivisionError" in capsys.readouterr().err


def test_generate_tiny(capsys):
    assert main(["generate", "--model", "tiny-random-llama", "--device", "cpu", "--max-new-tokens",
                 "3", "Hello"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and "top 5 next tokens" in out
    assert len([l for l in out.splitlines() if l.startswith("  ")]) == 5


def test_models_lists_aliases(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out and "GPT2LMHeadModel" in out


def test_console_script_installed():
    import shutil

    exe = shutil.which("kedit") or str(__import__("pathlib").Path(sys.executable).with_name("kedit"))
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("kedit ")


@pytest.mark.slow
def test_generate_default_model_prints_paris():
    r = run_cli("generate", "--device", "cpu", "--max-new-tokens", "3",
                "The Eiffel Tower is located in the city of")
    assert r.returncode == 0, r.stderr
    assert "' Paris'" in r.stdout

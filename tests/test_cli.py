"""The `phi3jax` command line: dispatch, `generate`, and error reporting."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import make_hf_dir


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "phi3jax", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


@pytest.fixture(scope="module")
def hf_dir_with_tokenizer(tmp_path_factory, phi3_vocab):
    directory = tmp_path_factory.mktemp("hf")
    make_hf_dir(directory, vocab_size=32064, pad_token_id=32000, eos_token_id=32000)
    shutil.copy(phi3_vocab / "tokenizer.model", directory / "tokenizer.model")
    return directory


def test_generate_prints_the_prompt_its_continuation_and_speed(hf_dir_with_tokenizer):
    result = run_cli("generate", "--hf-dir", str(hf_dir_with_tokenizer), "--prompt", "Hello world",
                     "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello world") and len(result.stdout) > len("Hello world")
    assert "tokens/s" in result.stderr


def test_missing_model_directory_is_a_one_line_error(tmp_path):
    result = run_cli("generate", "--hf-dir", str(tmp_path / "nope"), "--prompt", "x")
    assert result.returncode == 2
    assert "is not a directory" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_the_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0 and "generate" in result.stdout

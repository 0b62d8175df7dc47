"""`phi3jax chat` and `phi3jax generate`: streaming, stopping at <|end|>, history, bounded compilation.

The model is built so its greedy reply to any chat prompt is "Hello world<|end|>" (see
testmodels.make_hello_world_model); left to run past <|end|> it would say "Hello world" again, so
a reply of exactly "Hello world" in 3 tokens shows generation stopped at <|end|>.
"""

from __future__ import annotations

import builtins
import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import sentencepiece as spm
from testmodels import ASSISTANT, END, HELLO, USER, WORLD, make_hello_world_model, make_run_dir

from phi3jax.cli.chat import EXIT_INTERRUPTED, ChatSession, TextStreamer, chat_loop, interrupt_requests
from phi3jax.cli.main import main
from phi3jax.convert.hf import load_hf
from phi3jax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, phi3_vocab):
    directory = tmp_path_factory.mktemp("hello_world_model") / "hf"
    make_hello_world_model(directory)
    return directory


@pytest.fixture(scope="module")
def endless_model_dir(tmp_path_factory, phi3_vocab):
    """Replies "Hello world Hello world ..." until --max-new-tokens: a reply long enough to interrupt."""
    directory = tmp_path_factory.mktemp("endless_model") / "hf"
    make_hello_world_model(directory, endless=True)
    return directory


@pytest.fixture(scope="module")
def sp(phi3_vocab):
    return spm.SentencePieceProcessor(model_file=str(phi3_vocab / "tokenizer.model"))


def expected_prompt_lengths(sp, messages: list[str]) -> list[int]:
    """Token counts of each turn's prompt when every reply is "Hello world": BOS, then per past turn
    <|user|> msg <|end|> <|assistant|> ▁Hello ▁world <|end|>, then <|user|> msg <|end|> <|assistant|>
    (the newlines after chat tokens are swallowed by their rstrip)."""
    lengths, history = [], 1
    for m in messages:
        turn = 1 + len(sp.encode(m)) + 2
        lengths.append(history + turn)
        history += turn + 3
    return lengths


def _subprocess_env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "TERM": "dumb"}


def _stats(text: str) -> list[tuple[int, int]]:
    """(new tokens, prompt tokens) of every turn's stats line."""
    return [(int(n), int(p)) for n, p in re.findall(r"\[(\d+) tokens in [^\]]*prompt (\d+) tokens\]", text)]


def test_chat_over_stdin_pipe_keeps_history_and_stops_at_end(model_dir, sp, tmp_path):
    """From a run directory (model and tokenizer from --ckpt), one message per stdin line."""
    run = make_run_dir(model_dir, tmp_path / "run")
    messages = ["hi there", "and again", "/reset", "third"]
    proc = subprocess.run([sys.executable, "-m", "phi3jax", "chat", "--ckpt", str(run),
                           "--max-new-tokens", "20"], input="\n".join(messages) + "\n", capture_output=True,
                          text=True, env=_subprocess_env(), timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Hello world\n" * 3
    stats = _stats(proc.stderr)
    turns = expected_prompt_lengths(sp, ["hi there", "and again"]) + expected_prompt_lengths(sp, ["third"])
    assert stats == [(3, n) for n in turns]  # 3 tokens: Hello, world, <|end|>; history grows, /reset clears it
    assert "[conversation cleared]" in proc.stderr


def _read(fd: int, timeout: float, pattern: str | None = None) -> str | None:
    """What the child writes to the terminal until `pattern` matches (then the text so far), or until it
    closes the terminal or `timeout` passes (then the text so far if no pattern was given, else None)."""
    out, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if pattern is not None and re.search(pattern, out.decode(errors="replace")):
                return out.decode(errors="replace")
    if pattern is None:
        return out.decode(errors="replace")
    raise AssertionError(f"timed out waiting for {pattern!r}; got {out.decode(errors='replace')!r}")


def _read_until(fd: int, pattern: str, timeout: float) -> str:
    return _read(fd, timeout, pattern)


def test_chat_in_a_terminal(model_dir, sp):
    """Through a pseudo-terminal: the >>> prompt, streamed replies, history across turns, Ctrl-D to quit."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "phi3jax", "chat", "--hf-dir", str(model_dir)],
                            stdin=slave, stdout=slave, stderr=slave, env=_subprocess_env(), cwd=REPO,
                            close_fds=True)
    os.close(slave)
    try:
        _read_until(master, r">>> ", timeout=180)
        os.write(master, b"hi there\n")
        first = _read_until(master, r"prompt \d+ tokens\][\s\S]*>>> ", timeout=180)
        os.write(master, b"and again\n")
        second = _read_until(master, r"prompt \d+ tokens\][\s\S]*>>> ", timeout=60)
        os.write(master, b"\x04")  # Ctrl-D at an empty prompt
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    for transcript in (first, second):
        assert "Hello world\r\n" in transcript
        assert transcript.count("Hello world") == 1  # stopped at <|end|>, did not go on
    assert _stats(first + second) == [(3, n) for n in expected_prompt_lengths(sp, ["hi there", "and again"])]
    assert "compilation included" in first and "compilation included" not in second  # same shapes reused


def _drain(fd: int, timeout: float = 10) -> str:
    """What the child still writes until it closes the terminal."""
    return _read(fd, timeout)


def test_ctrl_c_discards_a_reply_and_ctrl_c_at_the_prompt_leaves(endless_model_dir, sp):
    """Ctrl-C (SIGINT) mid-reply: one line says the reply is discarded, the prompt comes back and the
    next turn's prompt has no trace of the half turn. Ctrl-C at the prompt: a newline, exit status 130,
    no traceback, no "Exception ignored" (a KeyboardInterrupt lost in a garbage-collection callback)."""
    master, slave = pty.openpty()
    # A handled SIGINT here starts the child with SIGINT's default action, even where this test runs
    # with it ignored (as in a background job); an ignored one would be inherited.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "phi3jax", "chat", "--hf-dir", str(endless_model_dir),
                                 "--max-new-tokens", "900", "--chunk-size", "1"],
                                stdin=slave, stdout=slave, stderr=slave, env=_subprocess_env(), cwd=REPO,
                                close_fds=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    os.close(slave)
    try:
        _read_until(master, r">>> ", timeout=180)
        os.write(master, b"hi there\n")
        _read_until(master, r"Hello world Hello", timeout=180)  # streaming: the reply is under way
        proc.send_signal(signal.SIGINT)
        interrupted = _read_until(master, r"\[interrupted; reply discarded\]\r?\n>>> ", timeout=60)
        os.write(master, b"hi there\n")
        second = _read_until(master, r"prompt \d+ tokens[^\]]*\][\s\S]*>>> ", timeout=120)
        # Ctrl-C at the prompt. readline writes ">>> " just before it starts waiting for a key, and a
        # SIGINT in between is only seen at the next key, as in a terminal: give it a moment first,
        # and press Ctrl-C once more if the first one landed in that window.
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
        assert code == EXIT_INTERRUPTED == 130
        rest = _drain(master)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    transcript = interrupted + second + rest
    for bad in ("Traceback", "Exception ignored", "KeyboardInterrupt"):
        assert bad not in transcript, transcript
    assert transcript.count("[interrupted; reply discarded]") == 1
    stats = re.findall(r"\[(\d+) tokens in [^\]]*prompt (\d+) tokens", second)
    assert stats == [("900", str(expected_prompt_lengths(sp, ["hi there"])[0]))]  # a first turn's prompt again
    assert rest.startswith("\r\n")  # the prompt's line is ended


class _CtrlC(io.StringIO):
    def readline(self, *args):
        raise KeyboardInterrupt


def test_ctrl_c_while_waiting_for_a_message_leaves(monkeypatch, capsys):
    """Status 130 (the shell's for Ctrl-C), after ending the prompt's line; end of input: status 0."""
    def ctrl_c(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", ctrl_c)
    assert chat_loop(session=None, interactive=True) == EXIT_INTERRUPTED
    assert capsys.readouterr().out == "\n"
    monkeypatch.setattr(sys, "stdin", _CtrlC())
    assert chat_loop(session=None, interactive=False) == EXIT_INTERRUPTED
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert chat_loop(session=None, interactive=False) == 0
    assert capsys.readouterr().out == ""


def test_ctrl_c_during_a_reply_is_recorded_not_raised():
    """Python would raise KeyboardInterrupt wherever the program is, a gc callback included (where it
    is printed as "Exception ignored" and lost); during a reply Ctrl-C only sets a flag."""
    before = signal.getsignal(signal.SIGINT)
    with interrupt_requests() as interrupted:
        assert not interrupted()
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        time.sleep(0.01)
        assert interrupted()
    assert signal.getsignal(signal.SIGINT) is before


def test_an_interrupted_reply_leaves_the_history_as_it_was(model_dir):
    cfg, params = load_hf(model_dir)
    session = ChatSession(params, cfg, Tokenizer.load(model_dir), max_new_tokens=16, chunk_size=1)
    session.send("hi there", lambda _: None)
    history = list(session.messages)
    writes: list[str] = []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C once the reply has begun: seen at the next chunk
        session.send("and again", writes.append, interrupted=lambda: bool(writes))
    assert writes == ["Hello"] and session.messages == history and session.turns == 1
    assert session.send("and again", lambda _: None)[0] == "Hello world" and session.turns == 2


def test_reply_streams_chunk_by_chunk_and_joins_the_history(model_dir):
    cfg, params = load_hf(model_dir)
    tok = Tokenizer.load(model_dir)
    session = ChatSession(params, cfg, tok, max_new_tokens=16, chunk_size=1)
    writes: list[str] = []
    reply, stats = session.send("hi there", writes.append)
    assert writes == ["Hello", " world"]  # one write per generated token: streamed, not printed at the end
    assert reply == "Hello world" and stats.new_tokens == 3 and stats.stopped
    assert session.messages == [{"role": "user", "content": "hi there"},
                                {"role": "assistant", "content": "Hello world"}]
    ids = session.prompt_ids("next")
    assert ids[:1] == [1] and ids.count(USER) == 2 and ids.count(END) == 3
    assert ids[ids.index(ASSISTANT) + 1: ids.index(ASSISTANT) + 4] == [HELLO, WORLD, END]


def test_a_conversation_compiles_a_bounded_set_of_programs(model_dir):
    """Turns whose prompts stay within one power-of-two bucket reuse the compiled programs."""
    cfg, params = load_hf(model_dir)
    session = ChatSession(params, cfg, Tokenizer.load(model_dir), max_new_tokens=8)
    compiled = [session.send(m, lambda _: None)[1].compiled for m in ["one", "two", "three", "four"]]
    assert session.turns == 4 and compiled[1:] == [False, False, False]


def test_streamer_holds_back_incomplete_utf8(phi3_vocab):
    tok = Tokenizer.load(phi3_vocab / "tokenizer.model")
    llama = tok.encode("🦙")  # "▁" then four byte-fallback pieces <0xF0> <0x9F> <0xA6> <0x99>
    assert len(llama) == 5 and tok.decode(llama[:2]) == "\ufffd"
    writes: list[str] = []
    streamer = TextStreamer(tok, stop_ids=[END], write=writes.append)
    for t in llama:
        streamer([[t]])
    streamer([[END]])
    assert streamer.finish() == "🦙" and writes == ["🦙"]


def test_generate_command_streams_a_chat_reply(model_dir, capsys):
    assert main(["generate", "--hf-dir", str(model_dir), "--prompt", "hi", "--chat", "--max-new-tokens", "10"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello world\n"
    assert re.search(r"\[3 tokens in .* tokens/s", captured.err)


def test_generate_command_batches_several_prompts(model_dir, capsys):
    assert main(["generate", "--hf-dir", str(model_dir), "--chat", "--prompt", "hi", "--prompt",
                 "a much longer message than the first one", "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert out == "===== 0\nHello world\n===== 1\nHello world\n"


def test_generate_rejects_a_missing_model(tmp_path, capsys):
    assert main(["generate", "--hf-dir", str(tmp_path / "nothing"), "--prompt", "hi"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_generate_reads_the_prompt_from_stdin(model_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi"))
    assert main(["generate", "--hf-dir", str(model_dir), "--prompt", "-", "--chat", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == "Hello world\n"


def test_generate_checks_a_long_prompt_before_echoing_it(model_dir, capsys, monkeypatch):
    """`--prompt - < long.txt` with a prompt too long for the context: nothing on stdout, the error
    on stderr on a line of its own (it used to follow the echoed prompt on the same line)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("The for statement is used to iterate. " * 150))
    assert main(["generate", "--hf-dir", str(model_dir), "--prompt", "-", "--max-new-tokens", "128"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(r"phi3jax generate: error: prompt \(\d+ tokens\) \+ max_new_tokens \(128\) = \d+ exceeds "
                        r"the model's max_position_embeddings 1024; shorten the prompt or ask for fewer new tokens\n",
                        captured.err), captured.err


def test_a_continuation_keeps_the_space_after_the_prompt(phi3_vocab):
    """SentencePiece drops the leading space of a decode; text continuing a prompt must not lose it."""
    tok = Tokenizer.load(phi3_vocab / "tokenizer.model")
    prompt = tok.encode("The while statement", add_bos=True)
    continuation = tok.encode("object is here")  # starts with the word-initial piece "▁object"
    written = []
    streamer = TextStreamer(tok, [], write=written.append, prefix_ids=prompt)
    streamer([continuation[:1]])
    streamer([continuation[1:]])
    assert "".join(written) == streamer.finish() == " object is here"

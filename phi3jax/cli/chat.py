"""`phi3jax generate` and `phi3jax chat`: text in, streamed text out.

Streaming goes through `generate`'s chunk callback: after every chunk of decode steps the new
tokens are decoded and the new text is written. A chat turn re-renders the whole conversation
with the chat template and generates until `<|end|>` (or `<|endoftext|>`); the reply joins the
history. Prompt and cache widths are rounded up to powers of two, so a conversation compiles a
new program only when its length crosses a power of two (a bounded, logarithmic set), not per turn.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from phi3jax.cli.common import add_model_source, load_model
from phi3jax.inference.generate import check_fits, compiled_programs, generate, inference_params, stop_tokens

HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt and start over
  /exit, /quit    leave (so do Ctrl-D, and Ctrl-C at the prompt: exit status 130)
  /help           this text
Ctrl-C during a reply stops it and discards it: the conversation keeps neither it nor its message."""


class TextStreamer:
    """Collects generated ids and writes the text they add, as `generate`'s callback (row 0).

    Each call decodes everything so far and writes the part not yet written. Text ending in an
    incomplete UTF-8 character (decoded as U+FFFD) is held back until the next chunk completes it.
    Stop tokens are not shown.
    """

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int], write: Callable[[str], Any] | None = None,
                 prefix_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.write = write or _stdout_write
        self.ids: list[int] = []
        self.written = ""
        self.chunks = 0
        # Text continuing a prompt is decoded together with it: SentencePiece drops the leading
        # space of a decode, which would glue the continuation to the prompt's last word.
        self.prefix_ids = list(prefix_ids)
        self.prefix_text = tokenizer.decode(self.prefix_ids, skip_special=True)

    def __call__(self, new_tokens_per_row: list[list[int]]) -> None:
        self.chunks += 1
        self.ids.extend(t for t in new_tokens_per_row[0] if t not in self.stop_ids)
        self._flush(final=False)

    def finish(self) -> str:
        self._flush(final=True)
        return self.written

    def text(self) -> str:
        full = self.tokenizer.decode(self.prefix_ids + self.ids, skip_special=True)
        if self.prefix_ids and full.startswith(self.prefix_text):
            return full[len(self.prefix_text):]
        return self.tokenizer.decode(self.ids, skip_special=True)

    def _flush(self, final: bool) -> None:
        text = self.text()
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) > len(self.written) and text.startswith(self.written):
            self.write(text[len(self.written):])
            self.written = text


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def power_of_two_bucket(n: int, minimum: int = 64) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


@dataclasses.dataclass
class TurnStats:
    prompt_tokens: int
    new_tokens: int  # the stop token included
    seconds: float
    stopped: bool  # ended with a stop token (not max_new_tokens)
    compiled: bool  # this turn compiled at least one new program

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    def describe(self) -> str:
        note = ", compilation included" if self.compiled else ""
        end = "" if self.stopped else ", hit --max-new-tokens"
        return (f"[{self.new_tokens} tokens in {self.seconds:.2f}s, {self.tokens_per_second:.1f} tokens/s{note}; "
                f"prompt {self.prompt_tokens} tokens{end}]")


class ChatSession:
    """A conversation with a model: history, system prompt, sampling settings."""

    def __init__(self, params: Any, cfg: Any, tokenizer: Any, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, chunk_size: int = 8):
        # Converted once for the whole conversation, not on every turn (see `inference_params`).
        self.params, self.cfg, self.tokenizer = inference_params(params), cfg, tokenizer
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed = seed
        self.chunk_size = chunk_size
        self.messages: list[dict[str, str]] = []
        self.turns = 0
        self.stops = stop_tokens(cfg, tokenizer)

    def reset(self, system: str | None = None, keep_system: bool = True) -> None:
        self.messages = []
        if not keep_system:
            self.system = system

    def conversation(self, user: str | None = None) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return system + self.messages + tail

    def prompt_ids(self, user: str) -> list[int]:
        """The conversation so far plus `user`, rendered with the chat template, as ids."""
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(self.conversation(user)))

    def _fit(self, user: str) -> list[int]:
        """Prompt ids, dropping the oldest exchanges while prompt + max_new_tokens exceeds the context."""
        limit = self.cfg.max_position_embeddings - self.max_new_tokens
        ids = self.prompt_ids(user)
        while len(ids) > limit and self.messages:
            self.messages = self.messages[2:]  # one user turn and its reply
            print("[history trimmed to fit the context]", file=sys.stderr)
            ids = self.prompt_ids(user)
        if len(ids) > limit:
            raise ValueError(f"the message is {len(ids)} tokens; with --max-new-tokens {self.max_new_tokens} it "
                             f"does not fit the model's {self.cfg.max_position_embeddings}-token context")
        return ids

    def send(self, user: str, write: Callable[[str], Any] | None = None,
             interrupted: Callable[[], bool] | None = None) -> tuple[str, TurnStats]:
        """Stream the reply to `user` through `write`; add both to the history.

        `interrupted` is polled after each chunk of decode steps and once more at the end; when it
        returns True the reply is abandoned with KeyboardInterrupt and the history is left as it was.
        """
        interrupted = interrupted or (lambda: False)
        ids = self._fit(user)
        streamer = TextStreamer(self.tokenizer, self.stops, write)

        def on_chunk(new_tokens_per_row: list[list[int]]) -> None:
            if interrupted():
                raise KeyboardInterrupt
            streamer(new_tokens_per_row)

        compiled_before = compiled_programs()
        start = time.perf_counter()
        out = generate(self.params, self.cfg, [ids], max_new_tokens=self.max_new_tokens, seed=self.seed + self.turns,
                       stop_tokens=self.stops, callback=on_chunk, chunk_size=self.chunk_size,
                       bucket=power_of_two_bucket(len(ids)), **self.sampling)
        seconds = time.perf_counter() - start
        if interrupted():
            raise KeyboardInterrupt
        reply = streamer.finish()
        generated = out.to_lists()[0]
        stats = TurnStats(len(ids), len(generated), seconds, bool(generated) and generated[-1] in self.stops,
                          compiled_programs() > compiled_before)
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply.strip()}]
        self.turns += 1
        return reply, stats


# ------------------------------------------------------------------------------------ CLI
def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    parser.add_argument("--seed", type=int, default=0)


def add_generate_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt (or answer it with --chat)",
                              description="Generate text from one or more prompts. One prompt streams; "
                              "several are generated as one batch.")
    add_model_source(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="text to continue; repeat for a batch; '-' reads it from stdin")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--no-stream", action="store_true", help="print the text when done instead of streaming")
    add_sampling_args(p, max_new_tokens=128)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompt]
    if args.system and not args.chat:
        raise ValueError("--system needs --chat")
    cfg, params, tok = load_model(args)
    params = inference_params(params, donate=True)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = [tok.encode(tok.apply_chat_template([*system, {"role": "user", "content": p}])) for p in prompts]
    else:
        ids = [tok.encode(p, add_bos=True) for p in prompts]
    check_fits(cfg, max(len(i) for i in ids), args.max_new_tokens)  # before the prompt is echoed
    stops = stop_tokens(cfg, tok)
    stream = len(prompts) == 1 and not args.no_stream
    streamer = TextStreamer(tok, stops, prefix_ids=[] if args.chat else ids[0]) if stream else None
    echoed = stream and not args.chat
    if echoed:
        _stdout_write(prompts[0])
    start = time.perf_counter()
    try:
        out = generate(params, cfg, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stops, callback=streamer)
    except BaseException:
        if echoed:  # end the echoed text's line, so an error message starts on a line of its own
            _stdout_write("\n")
        raise
    seconds = time.perf_counter() - start
    if streamer is not None:
        streamer.finish()
        print()
    else:
        for k, (prompt, prompt_ids, row) in enumerate(zip(prompts, ids, out.to_lists(), strict=True)):
            continuation = TextStreamer(tok, stops, write=lambda _: None, prefix_ids=[] if args.chat else prompt_ids)
            continuation([row])
            text = continuation.text()
            if len(prompts) > 1:
                print(f"===== {k}")
            print(text if args.chat else prompt + text)
    n = int(out.lengths.sum())
    print(f"[{n} tokens in {seconds:.2f}s, {n / seconds:.1f} tokens/s, compilation included; "
          f"prompt {' + '.join(str(len(i)) for i in ids)} tokens]", file=sys.stderr)
    return 0


def add_chat_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal",
                              description="Chat with a model: one line per message (from a terminal or a pipe); "
                              "replies stream as they are generated and the conversation is kept.\n\n" + HELP)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_source(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p, max_new_tokens=256)
    p.add_argument("--chunk-size", type=int, default=8, help="decode steps between streamed updates")
    p.set_defaults(func=run_chat)


# Ctrl-C at the prompt leaves with the shell's status for a command ended by Ctrl-C (train.py's too).
EXIT_INTERRUPTED = 130


def _read_line(interactive: bool) -> str | None:
    """The next message; None at the end of input (Ctrl-D). Ctrl-C raises KeyboardInterrupt, the line ended."""
    try:
        if interactive:
            return input(">>> ")
        line = sys.stdin.readline()
    except EOFError:
        print()
        return None
    except KeyboardInterrupt:
        if interactive:
            print()  # the prompt's line, which no Enter ended
        raise
    return None if line == "" else line.rstrip("\n")


@contextlib.contextmanager
def interrupt_requests() -> Iterator[Callable[[], bool]]:
    """Within the block, Ctrl-C (SIGINT) is recorded instead of raised; yields a function telling whether it was.

    Python raises KeyboardInterrupt wherever the program happens to be, and one raised inside a
    callback run by the garbage collector (jax has one) is printed as "Exception ignored" and lost:
    the reply would go on. The chat loop polls the flag between chunks of decode steps instead.
    Outside the main thread (where signal handlers cannot be set) Ctrl-C is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    requested = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: requested.set())
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def run_chat(args: argparse.Namespace) -> int:
    cfg, params, tok = load_model(args)
    params = inference_params(params, donate=True)  # the stacked copy is freed as it is split
    session = ChatSession(params, cfg, tok, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          chunk_size=args.chunk_size)
    return chat_loop(session, interactive=sys.stdin.isatty())


def chat_loop(session: ChatSession, interactive: bool) -> int:
    """Answer messages from stdin until /exit or the end of input (status 0), or Ctrl-C at the prompt (130)."""
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print("phi3jax chat: one message per line; /help for commands, Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        if line is None:
            return 0
        message = line.strip()
        if not message:
            continue
        if message.startswith("/"):
            command, _, rest = message.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                session.reset()
                print("[conversation cleared]", file=sys.stderr)
            elif command == "/system":
                session.reset(system=rest.strip() or None, keep_system=False)
                print("[system prompt set; conversation cleared]", file=sys.stderr)
            elif command == "/help":
                print(HELP, file=sys.stderr)
            else:
                print(f"[unknown command {command}; /help lists them]", file=sys.stderr)
            continue
        try:
            with interrupt_requests() as interrupted:
                _, stats = session.send(message, interrupted=interrupted)
        except KeyboardInterrupt:
            _stdout_write("\n")
            print("[interrupted; reply discarded]", file=sys.stderr, flush=True)
            continue
        except ValueError as e:  # a message too long for the context: say so and keep chatting
            print(f"[{e}]", file=sys.stderr)
            continue
        _stdout_write("\n")
        print(stats.describe(), file=sys.stderr, flush=True)

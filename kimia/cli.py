"""The `kimia` command line: `kimia demo`, `kimia transcribe FILES --model PATH`, `kimia chat --model PATH`,
`kimia serve MODEL` (defined by kimia.server.cli).

A face only (DESIGN.md layering): it parses arguments, calls `kimia.api.KimiAudio`, prints results. Heavy
imports (torch, the model code) happen inside the subcommands so `kimia --help` is instant. Every error kimia
raises on purpose (`KimiaError`: bad audio, bad checkpoint, bad prompt, budget) is printed as one line
`kimia: error: ...` on stderr with exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder (official release layout or kimia's native layout) or a shipped model's name "
                        "(default: $KIMIA_MODEL, else the shipped kimia-small)")
    p.add_argument("--semantic-tokenizer", default=None,
                   help="GLM-4-Voice tokenizer folder (default: glm-4-voice-tokenizer/ inside or beside the model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, else fp32)")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8"],
                   help="LLM weight quantization (auto: what the model folder recommends for the device)")
    p.add_argument("--seed", type=int, default=None, help="random seed (sampling and detokenizer noise)")
    p.add_argument("--max-new-tokens", type=int, default=-1, help="generation budget (-1: the context budget)")


def _load(args: argparse.Namespace, *, detokenizer: bool):
    from kimia.api import KimiAudio

    paths = {"semantic_tokenizer_path": args.semantic_tokenizer} if args.semantic_tokenizer else {}
    return KimiAudio(args.model, load_detokenizer=detokenizer, device=args.device, dtype=args.dtype,
                     quantize=args.quantize, **paths)


# ------------------------------------------------------------------------------------------ demo
DEMO_QUESTION = "demo_question.flac"


def cmd_demo(args: argparse.Namespace) -> int:
    """The shipped model answers the bundled spoken question: text streamed to stdout, speech to a wav."""
    import torch

    from kimia.api import AudioPiece, KimiAudio, StreamEnd, TextPiece
    from kimia.audio import example_path, load_audio, save_audio

    if args.threads:
        torch.set_num_threads(args.threads)
    question = Path(args.audio) if args.audio else example_path(DEMO_QUESTION)
    wave = load_audio(question)
    t0 = time.perf_counter()
    model = KimiAudio(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    t1 = time.perf_counter()
    print(f"model: {model.parts.paths.root}  (loaded in {t1 - t0:.1f} s on {model.parts.device})", file=sys.stderr)
    print(f"question: {question.name} ({wave.shape[0] / 16000:.2f} s)", file=sys.stderr)
    messages = [{"role": "user", "message_type": "audio", "content": str(question)}]
    first_audio = None
    t2 = time.perf_counter()
    wav, text = None, ""
    print("answer: ", end="", flush=True)
    for ev in model.generate_stream(messages, output_type="both", seed=args.seed, max_new_tokens=args.max_new_tokens):
        if isinstance(ev, TextPiece):
            print(ev.delta, end="", flush=True)
        elif isinstance(ev, AudioPiece) and first_audio is None and ev.pcm.numel():
            first_audio = time.perf_counter() - t2
        elif isinstance(ev, StreamEnd):
            wav, text = ev.wav, ev.text
    total = time.perf_counter() - t2
    print(flush=True)
    if wav is None or wav.numel() == 0:
        print("kimia demo: the model gave no spoken answer", file=sys.stderr)
        return 1
    out = Path(args.out)
    save_audio(out, wav[0], 24000)
    seconds = wav.shape[-1] / 24000
    print(f"spoken answer: {seconds:.2f} s -> {out}  (first audio after {first_audio or total:.2f} s, "
          f"whole reply in {total:.2f} s: real-time factor {total / seconds:.2f})", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ transcribe
def cmd_transcribe(args: argparse.Namespace) -> int:
    from kimia.api import ASR_INSTRUCTION
    from kimia.errors import AudioError

    files = [Path(f) for f in args.files]
    for f in files:  # fail fast, before the model loads
        if not f.is_file():
            raise AudioError(str(f), "file not found")
    model = _load(args, detokenizer=False)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        def tqdm(x, **_):
            return x
    lines = []
    for f in tqdm(files, desc="transcribing", unit="file", disable=len(files) < 2 or args.quiet, file=sys.stderr):
        messages = [{"role": "user", "message_type": "text", "content": args.instruction or ASR_INSTRUCTION},
                    {"role": "user", "message_type": "audio", "content": str(f)}]
        _, text = model.generate(messages, output_type="text", max_new_tokens=args.max_new_tokens, seed=args.seed,
                                 text_repetition_penalty=args.text_repetition_penalty)
        line = f"{f}\t{text}" if len(files) > 1 else text
        lines.append(line)
        print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------------ chat
def _turn(model, history: list[dict], args: argparse.Namespace, out: Path | None) -> str:
    """One answer to `history`, streamed to stdout; audio written to `out` when asked."""
    from kimia.api import AudioPiece, StreamEnd, TextPiece

    text, wav = "", None
    for ev in model.generate_stream(history, output_type=args.output_type, seed=args.seed,
                                    max_new_tokens=args.max_new_tokens, audio_temperature=args.audio_temperature,
                                    audio_top_k=args.audio_top_k, text_temperature=args.text_temperature,
                                    text_top_k=args.text_top_k):
        if isinstance(ev, TextPiece):
            print(ev.delta, end="", flush=True)
        elif isinstance(ev, StreamEnd):
            text, wav = ev.text, ev.wav
        elif isinstance(ev, AudioPiece):
            pass  # collected in StreamEnd.wav; a live player would consume these
    print(flush=True)
    if out is not None and wav is not None:
        from kimia.audio import save_audio

        save_audio(out, wav[0], 24000)
        print(f"[audio: {wav.shape[-1] / 24000:.2f} s -> {out}]", file=sys.stderr)
    return text


def _user_message(line: str) -> dict:
    p = Path(line).expanduser()
    if p.suffix and p.is_file():
        return {"role": "user", "message_type": "audio", "content": str(p)}
    return {"role": "user", "message_type": "text", "content": line}


def cmd_chat(args: argparse.Namespace) -> int:
    from kimia.errors import AudioError, KimiaError

    if args.audio and not Path(args.audio).is_file():
        raise AudioError(args.audio, "file not found")
    model = _load(args, detokenizer=args.output_type == "both")
    out = Path(args.out) if args.out else None
    if args.audio or args.text:
        history = []
        if args.text:
            history.append({"role": "user", "message_type": "text", "content": args.text})
        if args.audio:
            history.append({"role": "user", "message_type": "audio", "content": args.audio})
        _turn(model, history, args, out)
        return 0
    print("kimia chat: type a message or the path of an audio file; an empty line or Ctrl-D ends.", file=sys.stderr)
    history: list[dict] = []
    turn = 0
    for line in sys.stdin:
        line = line.strip()
        if not line or line in ("/quit", "/exit"):
            break
        history.append(_user_message(line))
        turn += 1
        target = out.with_name(f"{out.stem}_{turn}{out.suffix}") if out is not None else None
        try:
            answer = _turn(model, history, args, target)
        except KimiaError as e:  # a bad line should not end the session
            print(f"kimia: error: {e}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "message_type": "text", "content": answer})
    return 0


# ------------------------------------------------------------------------------------------ entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimia", description="Kimi-Audio in PyTorch: hear, understand, talk back.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the shipped model answers a bundled spoken question (text + speech)")
    _add_model_args(p)
    p.add_argument("--audio", default=None, help="ask this audio file instead of the bundled question")
    p.add_argument("--out", default="demo_answer.wav", help="where to write the spoken answer (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_demo, max_new_tokens=-1)

    p = sub.add_parser("transcribe", help="speech to text (ASR) for one or more audio files")
    p.add_argument("files", nargs="+", help="audio files (wav, flac, ogg, mp3)")
    _add_model_args(p)
    p.add_argument("--instruction", default=None, help="ASR instruction (default: the official eval wording)")
    p.add_argument("--text-repetition-penalty", type=float, default=1.0)
    p.add_argument("--out", default=None, help="also write the transcripts to this text file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("chat", help="talk to the model: one turn (--audio/--text) or an interactive loop")
    _add_model_args(p)
    p.add_argument("--audio", default=None, help="audio file of the user turn")
    p.add_argument("--text", default=None, help="text of the user turn (before the audio, if both)")
    p.add_argument("--output-type", choices=("text", "both"), default="text", help="answer in text, or text + speech")
    p.add_argument("--out", default=None, help="where to write the spoken answer (wav; with --output-type both)")
    p.add_argument("--audio-temperature", type=float, default=0.8)
    p.add_argument("--audio-top-k", type=int, default=10)
    p.add_argument("--text-temperature", type=float, default=0.0)
    p.add_argument("--text-top-k", type=int, default=5)
    p.set_defaults(func=cmd_chat)

    # Faces of the other sub-packages: each module adds its own arguments; heavy imports happen when it runs.
    # They live in optional extras, so a base install still has a working `kimia` (demo, transcribe, chat).
    _add_face(sub, "serve", "serve", "kimia.server.cli", "add_serve_parser", None,
              "OpenAI-compatible HTTP API, realtime websocket and web page")
    _add_face(sub, "eval", "eval", "kimia.eval.cli", "add_eval_parser", None,
              "evaluate a model on manifests in the official kit's layout")
    _add_face(sub, "data", "data", "kimia.data.cli", "add_data_parser", "run_data_cli",
              "build training/evaluation data (synthetic speech corpus)")
    _add_face(sub, "train", "train", "kimia.train.cli", "add_train_parser", "run_train_cli",
              "train a component (runs under torchrun as well)")
    return parser


def _add_face(sub, name: str, extra: str, module: str, adder: str, runner: str | None, help: str) -> None:
    """Register the sub-command `name` from `module`, or a stand-in that names the missing extra."""
    import importlib

    try:
        mod = importlib.import_module(module)
        p = getattr(mod, adder)(sub)
        if runner is not None:
            p.set_defaults(func=getattr(mod, runner))
    except ImportError as e:
        missing = e.name or str(e)
        p = sub.add_parser(name, help=f"{help} (needs: pip install 'kimia[{extra}]')", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

        def unavailable(_args, _missing=missing):
            print(f"kimia {name}: the '{extra}' extra is not installed (missing module {_missing!r}); "
                  f"install it with: pip install 'kimia[{extra}]'", file=sys.stderr)
            return EXIT_USAGE

        p.set_defaults(func=unavailable)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from kimia.errors import KimiaError

    try:
        return int(args.func(args) or 0)
    except KimiaError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"kimia: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kimia: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

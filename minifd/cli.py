"""The `minifd` command line: run, chat, and the tools around it."""

import json
import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import click

from minifd.calibrate import calibrate_command
from minifd.check import check_command
from minifd.errors import MinifdError
from minifd.model.quantized import QUANTIZERS
from minifd.tuning import tune_command

# The flags whose names are not the Python parameter's with dashes (see cli_message).
FLAG_OF_PARAMETER = {"weights_dir": "--weights"}


# main() reads --debug from the arguments itself: errors reach it after click has returned.
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, expose_value=False, help="Show a full traceback on errors.")
def main_group():
    """minifd: a small, readable FlashDecoding++ inference engine for Llama-family models."""


def quantize_option(help_text):
    return click.option("--quantize", type=click.Choice(list(QUANTIZERS)), default=None, help=help_text)


QUANTIZE_HELP = ("Round the projection matrices to int8 (8.5 bits/weight) or int4 (5 bits/weight) group-wise at "
                 "load (a .gguf file's Q8_0, Q5_0, Q4_0, Q4_1 and Q4_K ones keep their own blocks: int8, int4).")


def generation_options(command):
    """The options `run` and `chat` share: weights, device, sampling, lengths, stop rules, chat template."""
    options = [
        click.option("--weights", type=click.Path(path_type=Path), default=None,
                     help="Hugging Face Llama directory or .gguf file (default: the prepared SmolLM2 fixture)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        quantize_option(QUANTIZE_HELP),
        click.option("--max-new-tokens", type=int, default=128, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = no limit."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="1 = no limit."),
        click.option("--min-p", type=float, default=0.0, show_default=True,
                     help="Keep only tokens with at least this fraction of the likeliest one's probability; 0 = no limit."),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
                     help="Above 1 discourages tokens the text already holds (HF's meaning); 1 = none."),
        click.option("--seed", type=int, default=None,
                     help="Same seed, same text; none or negative: a fresh seed, shown in the summary (run) "
                          "or when the session starts (chat)."),
        click.option("--stop", multiple=True, help="End the text where this string appears (it is not printed); "
                     "repeatable."),
        click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence tokens."),
        click.option("--max-context", type=int, default=None, help="Cap on prompt + new tokens (default: the model's)."),
        click.option("--chat-template", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="A Jinja chat template to use instead of the checkpoint's."),
        click.option("--system", default=None, help="The system prompt of the chat."),
        click.option("--no-graph", is_flag=True, help="Launch the GPU decode step kernel by kernel, without a CUDA graph."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main_group.command()
@click.argument("prompts", nargs=-1)
@click.option("--prompts-file", type=click.File("r", encoding="utf-8"), default=None,
              help="Read prompts from a file, one per line (blank lines skipped); - reads them from stdin.")
@click.option("--chat", "as_chat", is_flag=True,
              help="Each prompt is a user message, put in the model's chat template; the reply is printed.")
@generation_options
def run(prompts, prompts_file, as_chat, system, **options):
    """Generate continuations of PROMPTS.

    With neither PROMPT nor --prompts-file, stdin is the prompt when it is not a terminal, all of it
    (`echo "The capital of France is" | minifd run`). stdout carries only the generated text, streamed
    as it is produced; with several prompts each continuation is one line, in prompt order (newlines
    inside it written as \\n). A summary goes to stderr.
    """
    prompts = gather_prompts(prompts, prompts_file)
    if not as_chat and (system is not None or options["chat_template"] is not None):
        note("--system and --chat-template shape a chat, and without --chat there is none: they have no effect")
    engine, generation = load_engine(options)
    if as_chat:
        prompts = [engine.apply_chat_template(conversation_start(system) + [user_message(prompt)])
                   for prompt in prompts]
    writer = StreamWriter(len(prompts))
    result = engine.generate(prompts, on_text=writer.write, on_finish=writer.finish, **generation)
    click.echo(f"[minifd] {engine.device}: {result.stats.summary()}", err=True)


@main_group.command()
@generation_options
def chat(system, **options):
    """Talk with an instruct model, keeping the conversation.

    Each line typed is a user message and the reply streams back; the model sees the whole
    conversation through its chat template, and only what is new since the last reply is prefilled.
    /reset starts over, /system TEXT sets the system prompt (/system alone removes it), /quit ends;
    Ctrl-C stops a reply, Ctrl-D ends. From a pipe (`printf 'Hi\\nAnd now?\\n' | minifd chat`) each
    line is a message and stdout holds only the replies, one after another, each ending in a newline.
    """
    from minifd.sampling import draw_seed

    engine, generation = load_engine(options)
    engine.require_chat_template()  # before the first message, not at it
    if generation["temperature"] > 0:  # one seed for the session, said once, so it can be repeated
        generation["seed"] = draw_seed(generation["seed"])
        click.echo(f"[minifd] sampling seed {generation['seed']} (--seed {generation['seed']} repeats the session)",
                   err=True)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        click.echo(f"minifd chat with {engine.weights_dir} on {engine.device}: /reset starts over, /system TEXT "
                   "sets the system prompt, /quit ends; Ctrl-C stops a reply, Ctrl-D ends", err=True)
    messages = conversation_start(system)
    for line in user_lines(interactive):
        command, _, argument = line.partition(" ")
        if command == "/quit":
            break
        if command == "/reset":
            messages = conversation_start(system)
            continue
        if command == "/system":
            system = argument.strip() or None
            messages = conversation_start(system) + [m for m in messages if m["role"] != "system"]
            continue
        reply = chat_reply(engine, messages + [user_message(line)], generation, interactive)
        if reply is not None:
            messages += [user_message(line), {"role": "assistant", "content": reply}]


def conversation_start(system):
    """The messages a conversation opens with: the system prompt, if there is one."""
    return [] if system is None else [{"role": "system", "content": system}]


def user_message(text):
    return {"role": "user", "content": text}


def user_lines(interactive):
    """The user's messages, one per line, blank ones skipped; Ctrl-C while typing starts the line over."""
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except KeyboardInterrupt:
            click.echo("", err=True)
            continue
        except EOFError:
            return
        if not interactive and not line:
            return
        if line.strip():
            yield line.strip()


def chat_reply(engine, messages, generation, interactive):
    """Stream the reply to messages on stdout -> its text; None when it failed and, at a terminal, the
    session goes on (from a pipe the error ends it)."""
    cancel = threading.Event()

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        with interrupt_sets(cancel):
            reply = engine.chat(messages, on_text=write, cancel=cancel, **generation)
    except MinifdError as error:
        if not interactive:
            raise
        click.echo(f"minifd: error: {cli_message(error)}", err=True)
        return None
    write("\n")
    return reply


@contextmanager
def interrupt_sets(event):
    """Within it Ctrl-C sets event, which stops the reply after its current token, instead of raising
    KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, lambda signal_number, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def load_engine(options):
    """Check the generation settings among the command's options, then load the engine the others name
    -> (engine, the settings for generate() or chat())."""
    import minifd
    from minifd.engine import check_sampling

    weights, device, quantize, max_context, no_graph, chat_template = (
        options.pop(name) for name in ("weights", "device", "quantize", "max_context", "no_graph", "chat_template"))
    check_sampling(options["max_new_tokens"], options["temperature"], options["top_k"], options["top_p"],
                   options["min_p"], options["repetition_penalty"])
    if options["temperature"] == 0 and (options["top_k"] != 0 or options["top_p"] != 1.0 or options["min_p"] != 0):
        note("--top-k, --top-p and --min-p shape sampling, and --temperature 0 decodes greedily: they have no effect")
    engine = minifd.load(resolve_weights(weights), device=device, max_context=max_context, use_graph=not no_graph,
                         chat_template=chat_template, quantize=quantize)
    window = engine.config.max_position_embeddings
    if max_context is not None and max_context > window:
        note(f"--max-context {max_context} is above the model's window of {window} positions: using {window}")
    return engine, options


def gather_prompts(arguments, prompts_file):
    """The PROMPT arguments, then the lines of --prompts-file; with neither, all of stdin as one prompt
    when stdin is not a terminal."""
    prompts = list(arguments)
    if prompts_file is not None:
        prompts += [line.rstrip("\n") for line in prompts_file if line.strip()]
    elif not prompts and sys.stdin is not None and not sys.stdin.isatty():
        piped = sys.stdin.read().removesuffix("\n")  # the newline that ends echo's output is not the prompt's
        prompts = [piped] if piped else []
    if not prompts:
        raise MinifdError("no prompt given (pass PROMPT arguments or --prompts-file FILE, or pipe one into stdin)")
    return prompts


def note(message):
    """One line on stderr about a setting that does not do what it says; the run goes on."""
    click.echo(f"minifd: note: {message}", err=True)


def resolve_weights(weights):
    """--weights as given, else the SmolLM2 fixture when it has been prepared."""
    from minifd.fixture import fixture_dir, fixture_ready

    if weights is not None:
        return weights
    if fixture_ready():
        return fixture_dir()
    raise MinifdError("no --weights given and the SmolLM2 fixture is not prepared "
                      "(run: python scripts/prepare_smollm2.py)")


class StreamWriter:
    """Streams one prompt's text as it comes. Several prompts become one line each, in prompt order:
    a line is written once its prompt and every earlier one have finished."""

    def __init__(self, n_prompts):
        self.pieces = [[] for _ in range(n_prompts)]
        self.finished = [False] * n_prompts
        self.next_line = 0

    def write(self, index, text):
        if len(self.pieces) == 1:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            self.pieces[index].append(text.replace("\\", "\\\\").replace("\n", "\\n"))

    def finish(self, index):
        self.finished[index] = True
        if len(self.pieces) == 1:
            sys.stdout.write("\n")
        while self.next_line < len(self.pieces) and self.finished[self.next_line]:
            if len(self.pieces) > 1:
                sys.stdout.write("".join(self.pieces[self.next_line]) + "\n")
            self.next_line += 1
        sys.stdout.flush()


def comma_ints(text):
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MinifdError(f"expected comma-separated integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise MinifdError(f"expected positive comma-separated integers, not {text!r}")
    return values


@main_group.command()
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Benchmark this checkpoint (a model directory or a .gguf file) instead of random weights.")
@click.option("--shape", type=click.Choice(["llama2-7b", "llama3-8b"]), default="llama2-7b", show_default=True,
              help="Shape of the random weights (without --weights or --config).")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A config.json whose shape the random weights take.")
@quantize_option(QUANTIZE_HELP + " Without --weights: the random weights, quantized on the GPU.")
@click.option("--attention", "attention_method", type=click.Choice(["async", "sync"]), default="async",
              show_default=True, help="Unified-max softmax (async) or the synchronised running max (sync).")
@click.option("--prompts", "prompt_lengths", default="16,1024,4096", show_default=True, help="Prompt lengths.")
@click.option("--batches", default="1,2,4,8", show_default=True, help="Batch sizes.")
@click.option("--decode-steps", type=int, default=64, show_default=True)
@click.option("--no-hf", is_flag=True, help="Skip the Hugging Face transformers comparison.")
@click.option("--no-graph", is_flag=True, help="Decode without a CUDA graph.")
@click.option("--no-overlap", is_flag=True,
              help="Launch decode kernels one after another, without programmatic dependent launch.")
@click.option("--json", "out_json", type=click.Path(path_type=Path), default=Path("minifd-bench.json"), show_default=True)
@click.option("--png", "out_png", type=click.Path(path_type=Path), default=Path("minifd-bench.png"), show_default=True)
def bench(weights, shape, config_file, quantize, attention_method, prompt_lengths, batches, decode_steps, no_hf, no_graph,
          no_overlap, out_json, out_png):
    """Prefill and decode speed on the GPU against the bandwidth roofline (and HF transformers)."""
    from minifd.bench import SHAPES, run_bench

    shape_config = SHAPES[shape]
    if config_file is not None:
        try:
            shape_config = json.loads(config_file.read_text())
        except (OSError, ValueError) as error:
            raise MinifdError(f"--config {config_file}: not a readable JSON file ({error})") from None

    if decode_steps < 1:
        raise MinifdError(f"--decode-steps must be >= 1, not {decode_steps}")
    run_bench(comma_ints(prompt_lengths), comma_ints(batches), decode_steps, with_hf=not no_hf,
              use_graph=not no_graph, weights_dir=weights, out_json=out_json, out_png=out_png,
              log=lambda line: click.echo(line, err=False), shape_config=shape_config,
              attention_method=attention_method, overlap=False if no_overlap else None, quantize=quantize)


@main_group.command()
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Hugging Face Llama directory or .gguf file (default: the prepared SmolLM2 fixture).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@quantize_option(QUANTIZE_HELP)
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True,
              help="The most requests decoding together (slots of the KV pool).")
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True,
              help="The most requests waiting for a slot; more are answered 429.")
@click.option("--max-context", type=click.IntRange(1), default=None,
              help="Positions per request, prompt and completion (default: the model's window).")
@click.option("--api-key", default=None, help="Require `Authorization: Bearer KEY` on /v1 requests.")
@click.option("--served-model-name", default=None, help="The model's id in the API (default: the checkpoint's name).")
@click.option("--chat-template", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A Jinja chat template to use instead of the checkpoint's.")
@click.option("--grace", type=float, default=10.0, show_default=True,
              help="Seconds in-flight requests get to finish after SIGTERM before they are cancelled.")
def serve(weights, host, port, device, quantize, max_batch, max_queue, max_context, api_key, served_model_name,
          chat_template, grace):
    """An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health,
    /metrics) with continuous batching. Needs the serve extra: pip install 'minifd[serve]'."""
    import minifd

    try:
        import uvicorn

        from minifd.serve.app import Server
    except ImportError as error:
        raise MinifdError(f"minifd serve needs {error.name}: pip install 'minifd[serve]'") from None
    weights = resolve_weights(weights)
    engine = minifd.load(weights, device=device, quantize=quantize, chat_template=chat_template, max_context=max_context)
    name = served_model_name or Path(weights).name.removesuffix(".gguf")
    server = Server(engine, name, slots=max_batch, max_queue=max_queue, context=max_context, api_key=api_key)
    click.echo(f"minifd: serving {name} on http://{host}:{port}/v1 ({engine.device}, up to {max_batch} together)",
               err=True)
    # uvicorn stops taking requests on SIGTERM, lets in-flight ones finish for `grace` seconds (the app's
    # shutdown cancels the rest), then raises the signal again under the handler it found: this one, so
    # that a requested stop exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(server.app(), host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace)


@main_group.command()
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Also report the calibration table and the weight formats this checkpoint would use.")
@quantize_option("With --weights: report the formats and bytes --quantize would give.")
def info(weights, quantize):
    """Backend, GPU, library versions, kernel compile status, tuning and calibration tables in use, and a
    checkpoint's weight formats and bytes per decode step."""
    import numpy

    from minifd.backend import cupy_or_none
    from minifd.check import describe_platform
    from minifd.engine import weight_dtype
    from minifd.kernels import dispatch
    from minifd.tuning import dispatch_table_lines

    if quantize is not None and weights is None:
        raise MinifdError("--quantize describes a checkpoint's weights: give --weights")
    cupy = cupy_or_none()
    checkpoint_lines = []
    if weights is not None:  # a bad --weights stops us before any output
        checkpoint_lines = checkpoint_info_lines(weights, quantize, weight_dtype(cupy or numpy))
    click.echo(f"minifd {minifd_version()}, numpy {numpy.__version__}")
    if cupy is None:
        click.echo(f"backend: {describe_platform(numpy)['summary']}: CuPy is not installed or sees no GPU")
        device = dispatch.CPU_DEVICE_NAME
    else:
        click.echo(f"backend: {describe_platform(cupy)['summary']}")
        gpu = dispatch.gpu_properties()
        free, total = cupy.cuda.runtime.memGetInfo()
        click.echo(f"GPU: {gpu.multiprocessors} multiprocessors, L2 {gpu.l2_bytes / 2**20:.0f} MiB, "
                   f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
        for source, error in compile_every_kernel():
            click.echo(f"kernel {source}: " + ("compiles" if error is None else f"FAILED: {error}"))
        device = gpu.name
    for line in dispatch_table_lines(dispatch.table_path(), [device]):
        click.echo(line)
    for line in checkpoint_lines:
        click.echo(line)


def checkpoint_info_lines(weights, quantize, dtype):
    """The calibration in use, each projection's format and the bytes a decode step streams, as lines."""
    import numpy

    from minifd.engine import check_quantize
    from minifd.model.loader import open_checkpoint
    from minifd.model.weights import plain_bytes_per_step, projection_formats, streamed_bytes_per_step

    check_quantize(quantize)
    checkpoint = open_checkpoint(weights)
    formats = projection_formats(checkpoint, quantize, dtype)
    lines = [calibration_line(checkpoint), f"weights, held as on this machine ({numpy.dtype(dtype).name} "
             f"arrays){'' if quantize is None else ', with --quantize ' + quantize}:"]
    for f in formats:
        layers = f" x {f.count} layers" if f.count > 1 else ""
        lines.append(f"  {f.projection:<9} {list(f.shape)}{layers}: {f.format}, {f.bits_per_weight:g} bits/weight "
                     f"({f.description}), {f.nbytes / 1e6:.3g} MB")
    lines.append(f"bytes per decode step: {streamed_bytes_per_step(checkpoint, quantize, dtype) / 1e6:.3g} MB "
                 "(the projections above and the norms; the embedding table gives one row per token)")
    held_quantized = sorted({f.format for f in formats} & set(QUANTIZERS))
    if held_quantized and dtype == numpy.float16:
        lines.append(f"  (the GPU's GEMV and flat GEMM read the {' and '.join(held_quantized)} codes themselves; as "
                     f"float16 the same weights would stream {plain_bytes_per_step(checkpoint, dtype) / 1e6:.3g} MB "
                     "per step)")
    return lines


def calibration_line(checkpoint):
    """The unified max values phi the kernels use for this checkpoint, in one line."""
    from minifd.kernels.softmax_range import DEFAULT_SOFTMAX_RANGE, load_softmax_ranges

    config, path = checkpoint.config, checkpoint.softmax_ranges_path
    ranges = load_softmax_ranges(path, config.n_layers)
    if not path.is_file():
        default = DEFAULT_SOFTMAX_RANGE
        return (f"calibration: none ({path} does not exist): all {config.n_layers} layers use phi = {default.phi:.2f}, "
                f"safe window ({default.low:.0f}, {default.high:.0f}); `minifd calibrate` fits phi per layer")
    phis = [r.phi for r in ranges]
    return f"calibration: {path}: phi from {min(phis):.2f} to {max(phis):.2f} over {len(ranges)} layers"


def minifd_version():
    from minifd import __version__

    return __version__


def compile_every_kernel():
    """-> [(source name, None or the compiler's first error line)] for every kernel source, via NVRTC/HIPRTC."""
    from minifd.kernels.compile import KERNELS_DIR, load_module

    results = []
    for path in sorted(KERNELS_DIR.glob("*.cu")):
        try:
            load_module(path.name).compile()
            results.append((path.name, None))
        except Exception as error:
            lines = [line for line in str(error).splitlines() if "error" in line.lower()] or [str(error)]
            results.append((path.name, lines[0].strip()))
    return results


# Commands defined beside the code they drive.
main_group.add_command(calibrate_command)
main_group.add_command(check_command)
main_group.add_command(tune_command)


def main(argv=None):
    """Entry point: user errors print one line on stderr and exit 2, never a traceback (but with --debug)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        main_group.main(args=argv, prog_name="minifd", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("minifd: aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        click.echo(f"minifd: {error.format_message()}", err=True)
        sys.exit(2)
    except MinifdError as error:
        if debug:
            raise
        click.echo(f"minifd: error: {cli_message(error)}", err=True)
        sys.exit(2)


def cli_message(error):
    """A MinifdError as a CLI user reads it: the Python parameter it names becomes the flag that sets it."""
    if error.parameter is None:
        return str(error)
    flag = FLAG_OF_PARAMETER.get(error.parameter, "--" + error.parameter.replace("_", "-"))
    return re.sub(rf"\b{error.parameter}\b", flag, str(error))

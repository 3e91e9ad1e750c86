"""`g3export`: the command line. A thin layer: it parses options, calls library functions and turns
user errors into a one-line message and a non-zero exit (no traceback; `g3export --debug ...`
shows one). Options are checked where they are parsed (g3export.cli_types: finite, in range,
UTF-8). Heavy imports happen inside the commands, so `g3export --help` is instant.

    g3export run --reference --size 270m --prompt "What is the capital of France?"
    g3export build --size 270m --target onnx --out builds/270m
    g3export run builds/270m --prompt "What is the capital of France?"
    g3export inspect builds/270m
    g3export plan --size 12b --max-context 131072 --dtype bf16
    g3export bench builds/270m --prompt-len 512 --new-tokens 64
    g3export verify builds/270m
    g3export serve builds/270m --port 8000
    g3export triton-repo builds/270m --out repo
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from pathlib import Path

import click

from .cli_types import BATCH, REPEAT, SEED, TEMPERATURE, TEXT, TOKENS, TOP_K, TOP_P
from .dtypes import NAMES as DTYPE_NAMES
from .export.manifest import TARGETS
from .export.trt.options import ATTENTIONS, RTX_COMPUTE_CAPABILITIES
from .modeling.cache import DEFAULT_PREFILL_CHUNK
from .modeling.config import PRESETS


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def friendly(fn):
    """Bad input becomes `Error: <one line>` and exit 1 (click's usage errors exit 2): any
    g3export.errors.UserError (every module's error type derives from it, so there is no list to
    keep), and an OSError (a path the user gave that cannot be read or written; it names the file
    and the reason). `g3export --debug ...` re-raises instead, with the traceback."""
    from .errors import UserError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (UserError, OSError) as e:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and (ctx.find_root().params or {}).get("debug"):
                raise
            raise click.ClickException(_one_line(e)) from None
    return wrapper


SIZE = click.Choice(list(PRESETS), case_sensitive=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="g3export")
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of one line.")
def main(debug: bool) -> None:
    """Compile Gemma 3 to ONNX and TensorRT graphs and run them."""


# ---------------------------------------------------------------------------------------------
# model / prompt helpers shared by run, build, bench

def _load_model(size, checkpoint, weights, dtype="fp32", all_logits=False):
    from .api import load_model

    from .modeling.memory import require_weight_memory

    require_weight_memory(size, checkpoint, dtype)
    return load_model(size, checkpoint, weights, dtype, all_logits)


def _tokenizer_for(size, checkpoint, weights):
    """The tokenizer of a checkpoint, of the embedded 270M, or None (ids only)."""
    from .api import tokenizer_for

    return tokenizer_for(size, checkpoint, weights)


def _prompt_ids(tokenizer, prompt, prompt_ids, chat_template, config, crops_per_image=()):
    """Prompt ids from --prompt (template, image expansion) or --prompt-ids (used as given)."""
    from .runtimes.prompt import build_prompt_ids, check_prompt_image_tokens

    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt or --prompt-ids")
    if prompt_ids is not None:
        try:
            ids = [int(x) for x in prompt_ids.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise click.UsageError(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}")
        if config.has_vision:
            check_prompt_image_tokens(ids, config, sum(crops_per_image))
        return ids
    if tokenizer is None:
        raise click.UsageError("this checkpoint has no tokenizer; pass --prompt-ids 2,105,...")
    return build_prompt_ids(tokenizer, config, prompt, chat_template=chat_template,
                            images=list(crops_per_image))


def _sampling(greedy, temperature, top_k, top_p, seed):
    from .runtimes.sampling import SamplingConfig

    sampled = any(v is not None for v in (temperature, top_k, top_p))
    if greedy and sampled:
        raise click.UsageError("--greedy cannot be combined with --temperature/--top-k/--top-p")
    if not sampled:
        return SamplingConfig(greedy=True)
    return SamplingConfig(greedy=False, temperature=1.0 if temperature is None else temperature,
                          top_k=top_k or 0, top_p=1.0 if top_p is None else top_p, seed=seed)


def _generate_and_print(session, tokenizer, ids, max_new_tokens, sampling, as_json,
                        image_features=None, chunk_size=DEFAULT_PREFILL_CHUNK):
    from .runtimes.generate import generate

    stream = None
    if tokenizer is not None and not as_json:
        decoder = tokenizer.stream()

        def stream(tok):
            piece = decoder.feed(tok)
            if piece:
                click.echo(piece, nl=False)
                sys.stdout.flush()
    result = generate(session, ids, max_new_tokens, sampling, image_features=image_features,
                      on_token=stream, chunk_size=chunk_size)
    result.text = tokenizer.decode(result.token_ids) if tokenizer is not None else ""
    if as_json:
        click.echo(json.dumps({
            "prompt_token_ids": result.prompt_token_ids, "token_ids": result.token_ids,
            "text": result.text, "stop_reason": result.stop_reason,
            "time_to_first_token_s": result.time_to_first_token_s,
            "prefill_tokens_per_s": result.prefill_tokens_per_s,
            "decode_tokens_per_s": result.decode_tokens_per_s}))
    elif tokenizer is None:
        click.echo(",".join(map(str, result.token_ids)))
    else:
        click.echo(decoder.flush())
    return result


def sampling_options(fn):
    for opt in reversed([
        click.option("--max-new-tokens", type=TOKENS, default=128, show_default=True),
        click.option("--greedy", is_flag=True, help="Argmax decoding (the default when no sampling option is given)."),
        click.option("--temperature", type=TEMPERATURE, default=None, help="> 0 (finite)."),
        click.option("--top-k", type=TOP_K, default=None, help="Keep the k most likely (0: off)."),
        click.option("--top-p", type=TOP_P, default=None, help="In (0, 1]."),
        click.option("--seed", type=SEED, default=None, help=">= 0."),
        click.option("--prompt", type=TEXT, default=None, help="Prompt text (wrapped in the chat template)."),
        click.option("--prompt-ids", type=TEXT, default=None,
                     help="Comma-separated token ids, used exactly as given (no <bos>, no template)."),
        click.option("--no-chat-template", is_flag=True, help="Use --prompt as raw text (with <bos>)."),
        click.option("--image", "images", multiple=True, type=click.Path(),
                     help="An image for the prompt (repeatable)."),
        click.option("--pan-and-scan", is_flag=True,
                     help="Add crops of wide or tall images (HF's Pan & Scan defaults)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line."),
    ]):
        fn = opt(fn)
    return fn


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("build_dir", required=False, type=click.Path())
@click.option("--reference", is_flag=True, help="Run the PyTorch reference instead of a build.")
@click.option("--size", type=SIZE, default=None,
              help="With --reference: a preset size (with --checkpoint: checked against it).")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="With --reference: a HF directory or a .gguf file.")
@click.option("--weights", type=click.Choice(["checkpoint", "random"]), default="checkpoint",
              show_default=True)
@click.option("--max-context", type=TOKENS, default=None,
              help="With --reference: cache length (default: prompt + new tokens). A build's "
                   "context is fixed when it is built.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@sampling_options
@friendly
def run(build_dir, reference, size, checkpoint, weights, max_context, provider, max_new_tokens,
        greedy, temperature, top_k, top_p, seed, prompt, prompt_ids, no_chat_template, images,
        pan_and_scan, as_json):
    """Generate text from BUILD_DIR (or from the PyTorch reference with --reference)."""
    sampling = _sampling(greedy, temperature, top_k, top_p, seed)
    if reference:
        if build_dir:
            raise click.UsageError("--reference runs a checkpoint, not BUILD_DIR")
        if size is None and checkpoint is None:
            raise click.UsageError("--reference needs --size or --checkpoint (both: they must match)")
        from .runtimes.reference import TorchSession

        model = _load_model(size, checkpoint, weights)
        tokenizer = _tokenizer_for(size, checkpoint, weights)
        cfg = model.config
        pixels, crops = _images(cfg, images, pan_and_scan)
        ids = _prompt_ids(tokenizer, prompt, prompt_ids, not no_chat_template, cfg, crops)
        ctx = max_context or min(cfg.text.max_position_embeddings, len(ids) + max_new_tokens)
        if ctx > cfg.text.max_position_embeddings:
            raise click.UsageError(f"--max-context {ctx} is beyond the model's "
                                   f"{cfg.text.max_position_embeddings}")
        from .modeling.cache import kv_layout
        from .modeling.memory import require_memory

        require_memory(kv_layout(cfg.text, ctx, 1, "fp32").bytes, f"a KV cache of {ctx} tokens")
        session = TorchSession(model, max(ctx, 1))
    else:
        if not build_dir:
            raise click.UsageError("give BUILD_DIR, or --reference with --size/--checkpoint")
        if size or checkpoint or weights != "checkpoint":
            raise click.UsageError("--size/--checkpoint/--weights go with --reference; a build "
                                   "knows its model")
        if max_context is not None:
            raise click.UsageError("--max-context goes with --reference: a build's context is "
                                   "fixed when it is built (`g3export inspect BUILD_DIR` shows "
                                   "it); rebuild with `g3export build ... --max-context N`")
        from .runtimes.loader import open_build

        session, tokenizer = open_build(build_dir, provider=provider)
        cfg = session.config
        pixels, crops = _images(cfg, images, pan_and_scan)
        ids = _prompt_ids(tokenizer, prompt, prompt_ids, not no_chat_template, cfg, crops)
    feats = session.image_features(pixels) if pixels is not None else None
    _generate_and_print(session, tokenizer, ids, max_new_tokens, sampling, as_json, feats)


def _images(cfg, images, pan_and_scan):
    """(pixel values or None, crops per image); checked before any model work is done."""
    if not images:
        return None, []
    if not cfg.has_vision:
        raise click.UsageError(f"model {cfg.name!r} has no vision encoder; it cannot take --image")
    from .runtimes.images import prepare_images

    return prepare_images(images, cfg, pan_and_scan=pan_and_scan)


# ---------------------------------------------------------------------------------------------
@main.command()
@click.option("--size", type=SIZE, default=None)
@click.option("--checkpoint", type=click.Path(), default=None, help="A HF directory or a .gguf file.")
@click.option("--target", type=click.Choice(TARGETS), default="onnx", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help="Default: fp32 for onnx, bf16 for trt.")
@click.option("--max-context", type=TOKENS, default=None,
              help="KV-cache length (default: min(model maximum, 8192)).")
@click.option("--weights", type=click.Choice(["checkpoint", "random"]), default="checkpoint",
              show_default=True)
@click.option("--out", type=click.Path(), default=None, help="Build directory (default: builds/<name>-<target>-<dtype>).")
@click.option("--force", is_flag=True, help="Replace an existing build directory.")
@click.option("--all-logits", is_flag=True, help="Graphs return logits of every position.")
@click.option("--attention", type=click.Choice(list(ATTENTIONS)), default=None,
              help="trt/trt-rtx: attention as one TensorRT plugin node per layer (default) or as "
                   "standard ONNX Attention + TensorScatter (TensorRT's native layers).")
@click.option("--compute-capability", "compute_capabilities", multiple=True,
              type=click.Choice(list(RTX_COMPUTE_CAPABILITIES)),
              help="trt-rtx: GPU architectures the engine targets (repeatable; default: the "
                   "library's). Not 9.0: TensorRT-RTX does not target H100/H200.")
@click.option("--prefill-chunk", type=TOKENS, default=None,
              help="trt/trt-rtx: longest prefill chunk the engine accepts (default 512; native: "
                   "at most the sliding window).")
@click.option("--max-batch", type=BATCH, default=1, show_default=True,
              help="trt/trt-rtx: largest batch of the engine's profiles.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="trt only: TensorRT timing cache file, read and updated (faster rebuilds).")
@click.option("--components", type=TEXT, default=None, metavar="LIST",
              help="Comma-separated graphs to build: text, vision (default: every one the model "
                   "has). --components vision --weights random skips the text weights entirely.")
@click.option("--quant", type=click.Choice(["int4", "int8", "fp8"]), default=None,
              help="Quantize the decoder's linear layers (and the tied embedding / lm_head): "
                   "int4/int8 weight-only, block-wise; fp8 (trt/trt-rtx only, compute capability "
                   ">= 8.9): E4M3 weights and activations with static activation scales, the "
                   "embedding / lm_head kept. Default: none (the build dtype).")
@click.option("--quant-block", type=click.Choice(["32", "64", "128"]), default="32",
              show_default=True, help="int4/int8: elements per scale along the reduction dim.")
@click.option("--no-quant-embedding", is_flag=True,
              help="int4/int8: keep the tied embedding / lm_head in the build dtype.")
@click.option("--calibration", type=click.Path(), default=None,
              help="fp8: a UTF-8 text to calibrate activation scales on (its first 512 "
                   "tokens, at most --max-context; default: a short public-domain text shipped "
                   "with g3export).")
@friendly
def build(size, checkpoint, target, dtype, max_context, weights, out, force, all_logits,
          components, attention, compute_capabilities, prefill_chunk, max_batch, timing_cache,
          quant, quant_block, no_quant_embedding, calibration):
    """Export a Gemma 3 checkpoint to a build directory of compiled graphs."""
    from .api import OptionError, build as do_build

    comps = tuple(c.strip() for c in components.split(",") if c.strip()) if components else None
    try:
        path = do_build(size, checkpoint, target=target, dtype=dtype, max_context=max_context,
                        weights=weights, out=out, force=force, all_logits=all_logits,
                        components=comps, attention=attention,
                        compute_capabilities=compute_capabilities, prefill_chunk=prefill_chunk,
                        max_batch=max_batch, timing_cache=timing_cache, quant=quant,
                        quant_block=int(quant_block), quant_embedding=not no_quant_embedding,
                        calibration=calibration)
    except OptionError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"built {path}")


@main.command()
@click.argument("build_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
@friendly
def inspect(build_dir, as_json):
    """Components, I/O, dtypes and the KV layout of a build directory."""
    from .export.manifest import load_build

    b = load_build(build_dir)  # the same checks as every runtime makes
    m = b.manifest
    if as_json:
        click.echo(json.dumps(m.to_dict(), indent=2))
        return
    click.echo(f"{build_dir}: {m.model.name}  target={m.target}  dtype={m.dtype}  "
               f"max_context={m.max_context}  format={m.format_version}")
    for name, comp in m.components.items():
        click.echo(f"component {name}: {comp.file}")
        for io in comp.inputs:
            click.echo(f"  in   {io.name:<20} {io.dtype:<8} {list(io.shape)}")
        for io in comp.outputs:
            alias = f"  (in place of {io.aliases})" if io.aliases else ""
            click.echo(f"  out  {io.name:<20} {io.dtype:<8} {list(io.shape)}{alias}")
    q = m.quantization
    if q:
        cal = q.get("calibration")
        click.echo(f"quantization: {q['scheme']}" + (f" block={q['block']}" if q.get("block") else "")
                   + (f" format={q['format']}" if q.get("format") else "")
                   + f"  symmetric={q.get('symmetric')}  quantized: {'; '.join(q['quantized'])}"
                   + f"  kept: {', '.join(q['kept'])}"
                   + (f"  calibration: {cal['name']} (sha256 {cal['sha256'][:12]}, "
                      f"{cal.get('tokens', '?')} tokens)" if cal else ""))
    kv = b.kv_layout()
    click.echo(f"KV cache: {kv.bytes / 2**20:.1f} MiB for batch {kv.batch}")
    for lc in kv.layers:
        click.echo(f"  layer {lc.layer:>3} {lc.layer_type:<18} slots={lc.slots:<7} "
                   f"shape={list(lc.shape)}")


@main.command()
@click.option("--size", type=SIZE, required=True)
@click.option("--max-context", type=TOKENS, default=None, help="Default: the model's maximum.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="bf16", show_default=True)
@click.option("--batch", type=BATCH, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", type=click.Path(), default=None, help="Write a PNG of KV bytes against context.")
@friendly
def plan(size, max_context, dtype, batch, as_json, plot):
    """Parameters, weight and KV bytes, and the decode bound on H100/H200; no weights needed."""
    from .plan import plan as make_plan, plot_kv, format_plan

    p = make_plan(size, max_context, dtype, batch)
    if plot:
        plot_kv(plot, dtype=dtype, batch=batch)
    click.echo(json.dumps(p, indent=2) if as_json else format_plan(p))


@main.command()
@click.argument("build_dir", type=click.Path())
@click.option("--prompt-len", type=TOKENS, default=512, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2, TOKENS.max), default=64, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--repeat", type=REPEAT, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly
def bench(build_dir, prompt_len, new_tokens, provider, repeat, as_json):
    """Time to first token, prefill and decode tokens/s, peak memory, KV bytes."""
    from .runtimes.bench import bench as do_bench

    r = do_bench(build_dir, prompt_len, new_tokens, provider, repeat)
    if as_json:
        click.echo(json.dumps(r))
    else:
        for k, v in r.items():
            click.echo(f"{k:>28}: {v}")


@main.command()
@click.argument("build_dir", type=click.Path())
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly
def verify(build_dir, provider, as_json):
    """Run the built graphs and the PyTorch reference on the same inputs; fail beyond tolerance."""
    from .runtimes.verify import verify as do_verify

    report = do_verify(build_dir, provider=provider)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    if not report.ok:
        raise SystemExit(1)


@main.command("triton-repo")
@click.argument("build_dir", type=click.Path())
@click.option("--out", type=click.Path(), required=True, help="Model repository directory.")
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True,
              help="Sequences served at once (slots of the session's cache).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--build-path", default=None,
              help="The build's path as the server sees it (e.g. /build in a container); "
                   "default: BUILD_DIR's absolute path.")
@click.option("--copy-build", is_flag=True, help="Copy the build into the repository.")
@click.option("--force", is_flag=True, help="Replace an existing gemma3 model in OUT.")
@friendly
def triton_repo(build_dir, out, max_batch, provider, build_path, copy_build, force):
    """Write a Triton Inference Server model repository (model `gemma3`) serving BUILD_DIR."""
    from .serving.repo import write_repository

    path = write_repository(build_dir, out, max_batch=max_batch, provider=provider,
                            build_path=build_path, copy_build=copy_build, force=force)
    click.echo(f"wrote {path / 'gemma3'}")


@main.command()
@click.argument("build_dir", type=click.Path())
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--verbose", is_flag=True, help="Triton's verbose log.")
@friendly
def serve(build_dir, port, host, max_batch, provider, verbose):
    """Serve BUILD_DIR with Triton Inference Server (HTTP, generate / generate_stream)."""
    import signal
    from .serving.repo import write_repository
    from .serving.server import TritonServer, find_tritonserver

    install = find_tritonserver()  # says what to install before any work
    with tempfile.TemporaryDirectory(prefix="g3export-repo-") as repo:
        write_repository(build_dir, repo, max_batch=max_batch, provider=provider)
        server = TritonServer(repo, port=port, host=host, install=install, verbose=verbose,
                              log=None)

        def stop(*_):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, stop)
        try:
            server.start()
            click.echo(f"serving {build_dir} at {server.url}/v2/models/gemma3/generate_stream "
                       "(Ctrl-C stops)", err=True)
            server.proc.wait()
            raise click.ClickException(f"tritonserver exited ({server.proc.returncode}):\n"
                                       f"{server.log_tail()}")
        except KeyboardInterrupt:
            click.echo("stopping ...", err=True)
        finally:
            server.stop()


@main.command("eval")
@click.argument("build_dir", type=click.Path())
@click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None,
              help="A UTF-8 text (default: the short public-domain text shipped with g3export).")
@click.option("--reference", "reference_build", type=click.Path(), default=None,
              help="Another build of the same model to compare with (e.g. the fp32 build).")
@click.option("--reference-torch", is_flag=True,
              help="Compare with the PyTorch reference of --checkpoint / --size [--weights].")
@click.option("--size", type=SIZE, default=None)
@click.option("--checkpoint", type=click.Path(), default=None)
@click.option("--weights", type=click.Choice(["checkpoint", "random"]), default="checkpoint",
              show_default=True)
@click.option("--max-tokens", type=click.IntRange(2), default=None,
              help="Evaluate at most this many tokens (default: the text, up to max_context).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly
def eval_(build_dir, text_file, reference_build, reference_torch, size, checkpoint, weights,
          max_tokens, provider, as_json):
    """Perplexity on a text; with a reference: KL divergence, same top-1, max logit difference."""
    from .runtimes.evaluate import evaluate, format_table
    from .runtimes.loader import open_build
    from .export.quantize import default_text

    if reference_build and reference_torch:
        raise click.UsageError("give --reference BUILD or --reference-torch, not both")
    if reference_torch and not (size or checkpoint):
        raise click.UsageError("--reference-torch needs --checkpoint or --size (the same model "
                               "the build was made from)")
    path = Path(text_file) if text_file else default_text()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise click.ClickException(f"cannot read --text {path} as UTF-8 text ({e})") from None
    session, tokenizer = open_build(build_dir, provider=provider)
    if tokenizer is None:
        raise click.ClickException(f"{build_dir} has no tokenizer.json: eval needs one to turn "
                                   "the text into tokens (build from a checkpoint that has one)")
    ref, ref_name = None, None
    if reference_build:
        ref, _ = open_build(reference_build, provider=provider)
        ref_name = str(reference_build)
    elif reference_torch:
        from .runtimes.reference import TorchSession

        ref = TorchSession(_load_model(size, checkpoint, weights), session.max_context)
        ref_name = f"PyTorch reference ({checkpoint or size})"
    r = evaluate(session, tokenizer.encode(text), ref, max_tokens=max_tokens, progress=True)
    click.echo(json.dumps({"build": str(build_dir), "reference": ref_name, "text": str(path),
                           **r.to_dict()}) if as_json else format_table(r, str(build_dir), ref_name))


if __name__ == "__main__":
    main()

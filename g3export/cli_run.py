"""`g3export run` and `g3export eval`: a build (or the PyTorch reference) over a prompt or a text,
with the prompt, sampling and image helpers of `run`. Registered on the group by g3export.cli.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli_common import SIZE, friendly, load_model
from .cli_types import SEED, TEMPERATURE, TEXT, TOKENS, TOP_K, TOP_P
from .modeling.cache import DEFAULT_PREFILL_CHUNK


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


@click.command()
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

        model = load_model(size, checkpoint, weights)
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


@click.command("eval")
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

        ref = TorchSession(load_model(size, checkpoint, weights), session.max_context)
        ref_name = f"PyTorch reference ({checkpoint or size})"
    r = evaluate(session, tokenizer.encode(text), ref, max_tokens=max_tokens, progress=True)
    click.echo(json.dumps({"build": str(build_dir), "reference": ref_name, "text": str(path),
                           **r.to_dict()}) if as_json else format_table(r, str(build_dir), ref_name))

"""`g3export`: the command line. A thin layer: it parses options, calls library functions and turns
user errors into a one-line message and a non-zero exit (no traceback; `g3export --debug ...`
shows one). Options are checked where they are parsed (g3export.cli_types: finite, in range,
UTF-8). Heavy imports happen inside the commands, so `g3export --help` is instant.

The group and the commands that write or describe a build (build, inspect, plan, bench, verify)
are here; `run` and `eval` are in g3export.cli_run, `serve` and `triton-repo` in
g3export.cli_serve, what they share (the one-line error wrapper, --size) in g3export.cli_common.

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

import json

import click

from .cli_common import SIZE, friendly
from .cli_run import eval_, run
from .cli_serve import serve, triton_repo
from .cli_types import BATCH, REPEAT, TEXT, TOKENS
from .dtypes import NAMES as DTYPE_NAMES
from .export.manifest import TARGETS
from .export.trt.options import ATTENTIONS, RTX_COMPUTE_CAPABILITIES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="g3export")
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of one line.")
def main(debug: bool) -> None:
    """Compile Gemma 3 to ONNX and TensorRT graphs and run them."""


for _command in (run, eval_, serve, triton_repo):  # commands that live in their own modules
    main.add_command(_command)


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
              help="trt/trt-rtx: largest batch of the engine's optimization profile.")
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
@click.option("--quant-symmetric/--quant-asymmetric", "quant_symmetric", default=None,
              help="int4/int8: symmetric codes (the default), or unsigned codes with a zero "
                   "point per block (onnx target only: better int4 quality, slower on CPUs "
                   "without AVX-512).")
@friendly
def build(size, checkpoint, target, dtype, max_context, weights, out, force, all_logits,
          components, attention, compute_capabilities, prefill_chunk, max_batch, timing_cache,
          quant, quant_block, no_quant_embedding, calibration, quant_symmetric):
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
                        calibration=calibration, quant_symmetric=quant_symmetric)
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
                   + ("  symmetric" if q.get("symmetric", True) else "  asymmetric (zero points)")
                   + f"  quantized: {'; '.join(q['quantized'])}"
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


if __name__ == "__main__":
    main()

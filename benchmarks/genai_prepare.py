"""`compare_ort_genai.py --prepare`: the Hugging Face folder written from the embedded GGUF, and
ONNX Runtime GenAI's fp32 and int4 builds of it (compare_ort_genai.py's docstring says what and
why, and the two shims applied to the builder)."""

from __future__ import annotations

from pathlib import Path


def write_hf_folder(out: Path) -> None:
    import torch
    import transformers

    from g3export.modeling.embedded import embedded_gguf_path

    gguf = Path(embedded_gguf_path())
    print(f"[prepare] transformers {transformers.__version__}: {gguf} -> {out}", flush=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF's tensors are dequantized to plain fp32 on load, but transformers keeps a "gguf"
    # quantizer marker that makes save_pretrained refuse ("not serializable"); drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["Gemma3ForCausalLM"]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out))


def _flatten_gemma3_rope(config):
    """transformers 5 writes Gemma 3's RoPE as rope_parameters = {"full_attention": {...},
    "sliding_attention": {...}}; GenAI's Gemma3 builder reads the transformers 4 form
    (rope_parameters["rope_type"], rope_theta, rope_local_base_freq). Give it that form."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp and "rope_type" not in rp:
        full, local = rp["full_attention"], rp.get("sliding_attention", rp["full_attention"])
        if full.get("rope_type", "default") != "default" or local.get("rope_type", "default") != "default":
            raise SystemExit(f"unsupported RoPE for the GenAI builder: {rp}")
        config.rope_parameters = {"rope_type": "default", "rope_theta": full["rope_theta"]}
        config.rope_theta = full["rope_theta"]
        config.rope_local_base_freq = local["rope_theta"]
    return config


def run_genai_builder(hf_dir: Path, out: Path, cache_dir: Path, precision: str = "fp32") -> None:
    from onnxruntime_genai.models import builder

    orig = builder.AutoConfig

    class _AutoConfig:  # AutoConfig whose Gemma 3 config the builder can read
        @staticmethod
        def from_pretrained(*a, **k):
            return _flatten_gemma3_rope(orig.from_pretrained(*a, **k))

    builder.AutoConfig = _AutoConfig
    # same as: python -m onnxruntime_genai.models.builder -i HF -o OUT -p PRECISION -e cpu -c CACHE
    #              --extra_options prune_lm_head=true hf_remote=false
    # (int4: every other quantization option at the builder's default; module docstring)
    extra = builder.parse_extra_options(None, str(hf_dir), str(out), precision, "cpu",
                                        str(cache_dir), ["prune_lm_head=true", "hf_remote=false"])
    print(f"[prepare] GenAI builder: {hf_dir} -> {out} ({precision}, cpu, prune_lm_head=true)",
          flush=True)
    try:
        builder.create_model(None, str(hf_dir), str(out), precision, "cpu", str(cache_dir), **extra)
    finally:
        builder.AutoConfig = orig


def prepare(args) -> None:
    hf, gd = Path(args.hf_dir), Path(args.genai_dir)
    if not (hf / "config.json").exists() or args.force:
        write_hf_folder(hf)
    else:
        print(f"[prepare] {hf} exists; keeping it (--force rewrites)")
    for out, precision in ((gd, "fp32"), (Path(args.genai_int4_dir), "int4")):
        if not (out / "genai_config.json").exists() or args.force:
            run_genai_builder(hf, out, Path(args.cache_dir or (gd.parent / "genai_cache")),
                              precision)
        else:
            print(f"[prepare] {out} exists; keeping it (--force rebuilds)")

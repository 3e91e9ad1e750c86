"""TensorRT and TensorRT-RTX engines from the exported ONNX graph (issue 7, issue 12, DESIGN §3.2,
§5), by responsibility:

    library.py   which library a target uses, importing it (`require_tensorrt`), the
                 libtensorrt_rtx.so fix; imports no onnx/torch (the engine runtime uses it)
    options.py   engine options checked in ONE place (`check_options`, `plan_engines`), the
                 compute-capability table the CLI reads, `EnginePlan`
    graph.py     what the exporter writes for a TensorRT target (`EnginePlan.export_options`):
                 the embedding layout that keeps one copy in the engine, the graph passes
    engine.py    `build_engine`: parse the ONNX file by path, build, serialize (`EngineInfo`)
    child.py     running a build in a fresh isolated interpreter of this package
    step.py      the build directory's engine step (`build_text_engine`, the manifest section)

The names below are the package's API; import them from `g3export.export.trt`.
"""

from .engine import (DEFAULT_PLUGINS, TEXT_PROFILE, EngineBuildError, EngineInfo, Profile,
                     build_engine, text_profile)
from .graph import prepare_for_tensorrt, tensorrt_passes
from .library import (FLAVOURS, SonameFix, TensorRTMissing, ensure_rtx_soname, library_name,
                      require_tensorrt, rtx_env)
from .options import (DEFAULT_PREFILL_CHUNK, FP16_NOTE, RTX_COMPUTE_CAPABILITIES,
                      EngineOptionError, EnginePlan, check_options, plan_engines, smallest_ring)
from .step import build_text_engine, smallest_ring_from_io

__all__ = ["DEFAULT_PLUGINS", "TEXT_PROFILE", "EngineBuildError", "EngineInfo", "Profile",
           "build_engine", "text_profile", "prepare_for_tensorrt", "tensorrt_passes", "FLAVOURS",
           "SonameFix", "TensorRTMissing", "ensure_rtx_soname", "library_name", "require_tensorrt", "rtx_env",
           "DEFAULT_PREFILL_CHUNK", "FP16_NOTE", "RTX_COMPUTE_CAPABILITIES", "EngineOptionError",
           "EnginePlan", "check_options", "plan_engines", "smallest_ring", "build_text_engine",
           "smallest_ring_from_io"]

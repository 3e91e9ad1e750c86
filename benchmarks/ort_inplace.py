"""Does the in-place cache binding copy the cache per step? Build the same 6-layer 270M-shaped
model (random weights, vocab 2048) for max_context 1024 and 32768 (KV 7 MB vs 72 MB), decode
interleaved in one process (so machine load hits both alike), and read ScatterND's kernel time
from ORT's profile. A per-step copy of the cache would make the 32768 step slower by ~65 MB of
memory traffic and show up as ScatterND time growing 10x.

    python benchmarks/ort_inplace.py
"""
import dataclasses, time, json, collections, numpy as np, torch, os
from g3export.modeling.config import preset
from g3export.modeling.text import Gemma3Model
from g3export.export.build import build
from g3export.runtimes.ort_session import OrtSession
base = preset('270m')
cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_hidden_layers=6, vocab_size=2048,
        layer_types=base.text.layer_types[:6]))
import tempfile
tmp = tempfile.mkdtemp(prefix='g3inplace-')
sess = {}
for mc in (1024, 32768):
    torch.manual_seed(0)
    out = f"{tmp}/cc{mc}"
    if not os.path.exists(out):
        build(Gemma3Model(cfg).eval(), None, out, max_context=mc, progress=False, force=True)
    sess[mc] = OrtSession.from_build(out, threads=1, profile=f"{tmp}/prof{mc}")
ids = np.random.default_rng(0).integers(0, 2048, (1, 128))
for s in sess.values(): s.forward(ids, 0)
times = collections.defaultdict(list)
for i in range(60):
    for mc, s in sess.items():
        t = time.perf_counter(); s.forward(np.array([[5]]), 128 + i); times[mc].append(time.perf_counter() - t)
for mc, s in sess.items():
    f = s.sess.end_profiling(); ev = json.load(open(f)); os.remove(f)
    agg = collections.Counter()
    for e in ev:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            agg[e["args"]["op_name"]] += e["dur"]
    print(mc, "kv MB", s.kv_bytes/1e6, "decode median ms", round(1000*np.median(times[mc]), 3),
          "ScatterND us/step", round(agg["ScatterND"]/61, 1), "Slice us/step", round(agg["Slice"]/61, 1))
import shutil; shutil.rmtree(tmp, ignore_errors=True)

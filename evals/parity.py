import os, sys, json, numpy as np
os.environ["LLAMA_CPP_LIB_PATH"] = sys.argv[3] if len(sys.argv) > 3 else "/tmp/llama-work/build/bin"
import llama_cpp
from slim_edge.checkpoint import load_quantized
from slim_edge.evals.backends import TorchLM
from slim_edge.evals.corpora import get_text
from slim_edge.evals.kld import token_stats, concat_stats, summarize
ck, gg = sys.argv[1], sys.argv[2]
from pathlib import Path
if (Path(ck)/"quant_config.json").exists():
    m, t = load_quantized(ck)
else:
    from slim_edge.models import load_model
    m, t, _ = load_model(ck)
lm = TorchLM(m, t)
text = get_text("lee", "eval").text
ids = lm.tokenize(text)[:512]
a = lm.logits(ids)
llm = llama_cpp.Llama(gg, logits_all=True, n_ctx=512, n_batch=512, n_threads=2, verbose=False)
llm.eval(ids); b = np.array(llm.scores[:512], np.float32)
s = summarize(concat_stats([token_stats(a, b, np.array(ids[1:] + [0]))]))
print(json.dumps({"ckpt": ck, "gguf": gg, "mean_kld": s["mean_kld"], "same_top_pct": s["same_top_pct"]}))
